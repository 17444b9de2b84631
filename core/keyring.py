"""Keys kept outside LMDB: one JSON file, mode 0600, never logged.

- ``index_key`` (32 B): HMAC-SHA256 key that turns card numbers into card ids.
  Never rotated in place: every card is found by it. Back it up.
- ``pin_key`` (32 B): HMAC-SHA256 key of the stored PIN verification values,
  so a stolen data folder cannot be brute-forced over the small PIN space.
- ``bdk`` (16 B) with its 4-byte ``bdk_id``: the chain's AES-128 DUKPT base
  derivation key; every terminal's initial key derives from it.
- ``data_keys``: AES-256-GCM keys by version for the stored card numbers;
  ``data_key_current`` seals new ones. ``rotate_data_key`` adds a version;
  old versions stay until nothing is sealed under them.

The embedded default creates the file in the data folder on first start and
says loudly that production keeps it elsewhere (``--keyring`` or
``CARDCORE_KEYRING``). A data folder of the first release (``card-index.key``
beside the ledger) keeps its index key. Changes are written to a new file and
renamed over the old one, so a crash leaves one whole keyring.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("cardcore.keyring")

FORMAT = "cardcore-keyring/1"
INDEX_KEY_SIZE = PIN_KEY_SIZE = DATA_KEY_SIZE = 32
BDK_SIZE, BDK_ID_SIZE = 16, 4
DATA_KEY_VERSIONS_MAX = 1000
NONCE_SIZE = 12
# Sealed card number: u16 key version | 12-byte nonce | AES-256-GCM(number) with its 16-byte tag.
SEAL_HEAD = struct.Struct("<H")
SEALED_SIZE_MAX = SEAL_HEAD.size + NONCE_SIZE + 19 + 16
LEGACY_INDEX_KEY = "card-index.key"


# A cluster host's file (cardcore cluster-config --keyring): the index key alone, all a replica
# uses (its member index and the profiles' key come from it); the PIN key, the BDK and the data
# keys stay on the hosts that run the gRPC process.
INDEX_FORMAT = "cardcore-index-key/1"


def index_fingerprint(index_key: bytes) -> str:
    """Names an index key without revealing it (HMAC of a fixed label): replicas of a shard
    must hold the same one, or none (docs/cluster.md, determinism)."""
    import hashlib
    import hmac

    return hmac.new(index_key, b"cardcore keyring fingerprint/1", hashlib.sha256).hexdigest()[:32]


def load_index_key(path: str) -> bytes:
    """The index key of a keyring file or of an index-key file (INDEX_FORMAT); ValueError if it
    is neither (OSError if it cannot be read)."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") == FORMAT:
            return Keyring.load(path).index_key
        if doc.get("format") == INDEX_FORMAT:
            key = bytes.fromhex(doc["index_key"])
            if len(key) == INDEX_KEY_SIZE:
                return key
    except (AttributeError, KeyError, TypeError, json.JSONDecodeError):
        pass
    raise ValueError(f"{path} is neither a cardcore keyring nor an index-key file")


def write_index_key(path: str, index_key: bytes) -> None:
    """An index-key file (INDEX_FORMAT), 0600."""
    _write_private(path, {"format": INDEX_FORMAT, "index_key": index_key.hex()})


def _write_private(path: str, doc: dict) -> None:
    """``doc`` as JSON at ``path``, mode 0600: written to a new file, synced, renamed over the
    old one, the folder synced (a crash leaves one whole file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.new"
    try:
        os.unlink(tmp)  # a leftover of a crash mid-save
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path`` (made 0600 if absent) while the block runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SealError(Exception):
    """A sealed card number does not open: unknown key version, or tampered (no detail)."""


@dataclasses.dataclass
class Keyring:
    path: str
    index_key: bytes
    pin_key: bytes
    bdk: bytes
    bdk_id: bytes
    data_keys: dict[int, bytes]
    data_key_current: int

    def __post_init__(self) -> None:
        sizes = ((self.index_key, INDEX_KEY_SIZE), (self.pin_key, PIN_KEY_SIZE), (self.bdk, BDK_SIZE),
                 (self.bdk_id, BDK_ID_SIZE))
        if any(len(k) != n for k, n in sizes) or self.data_key_current not in self.data_keys:
            raise ValueError(f"keyring {self.path} is damaged (a key of the wrong size, or no "
                             "current data key)")
        if any(len(k) != DATA_KEY_SIZE or not 1 <= v <= 0xFFFF for v, k in self.data_keys.items()):
            raise ValueError(f"keyring {self.path}: data keys are 32 bytes, versions 1..65535")
        self._aead = {v: AESGCM(k) for v, k in self.data_keys.items()}

    def index_fingerprint(self) -> str:
        return index_fingerprint(self.index_key)

    def __repr__(self) -> str:  # never print a key
        return f"Keyring({self.path!r}, data key versions {sorted(self.data_keys)})"

    # ---- card numbers at rest ------------------------------------------------------

    def seal(self, card_id: bytes, number: str) -> bytes:
        """The card number under the current data key, bound to its card id."""
        version = self.data_key_current
        head = SEAL_HEAD.pack(version)
        nonce = os.urandom(NONCE_SIZE)
        return head + nonce + self._aead[version].encrypt(nonce, number.encode("ascii"), card_id + head)

    def unseal(self, card_id: bytes, sealed: bytes) -> str:
        if len(sealed) < SEAL_HEAD.size + NONCE_SIZE + 16:
            raise SealError()
        head = sealed[:SEAL_HEAD.size]
        aead = self._aead.get(SEAL_HEAD.unpack(head)[0])
        if aead is None:
            raise SealError()
        nonce = sealed[SEAL_HEAD.size:SEAL_HEAD.size + NONCE_SIZE]
        try:
            return aead.decrypt(nonce, sealed[SEAL_HEAD.size + NONCE_SIZE:], card_id + head).decode("ascii")
        except (InvalidTag, UnicodeDecodeError):
            raise SealError() from None

    @staticmethod
    def sealed_version(sealed: bytes) -> int:
        return SEAL_HEAD.unpack_from(sealed)[0]

    # ---- rotation and storage ------------------------------------------------------

    def _file_lock(self):
        """The lock beside the file that a rotation's re-read and saves hold."""
        return _locked(self.path + ".lock")

    def fingerprint(self, version: int) -> bytes:
        """8 bytes that tell a data key version's key from another made with the same number
        (a keyed hash of a fixed label: nothing of the key can be learnt from it)."""
        return hmac.new(self.data_keys[version], b"cardcore data key fingerprint",
                        hashlib.sha256).digest()[:8]

    def reload(self) -> bool:
        """Adopt the data keys of the file as it is now (another process rotated, and the
        operator copied its file here): every version it holds, and its current one if newer
        than ours (True then). The other keys must be the same (another chain's keyring is
        refused: ValueError), and data key versions we hold must not change or go."""
        disk = Keyring.load(self.path)
        if (disk.index_key, disk.pin_key, disk.bdk, disk.bdk_id) != (
                self.index_key, self.pin_key, self.bdk, self.bdk_id):
            raise ValueError(f"keyring {self.path} now holds another chain's keys: not adopted")
        if any(disk.data_keys.get(v) != k for v, k in self.data_keys.items()):
            raise ValueError(f"keyring {self.path} lost or changed a data key version: not "
                             "adopted")
        self._aead.update({v: AESGCM(k) for v, k in disk.data_keys.items()
                           if v not in self.data_keys})
        self.data_keys.update(disk.data_keys)
        if disk.data_key_current <= self.data_key_current:
            return False
        self.data_key_current = disk.data_key_current
        return True

    def rotate_data_key(self) -> int:
        """Add a data key version and make it current (both saved); the new version."""
        version = self.add_data_key()
        self.make_current(version)
        return version

    def add_data_key(self) -> int:
        """A rotation's first step: a new data key version saved, not current (nothing is
        sealed under it before ``make_current``; a rotation the ledger refuses drops it). On disk
        first: nothing may be sealed under a key the keyring file does not hold. Refused
        (ValueError) when the file no longer holds what this object read: another process
        rotated it (saving over it would lose that key); under a lock beside the file, so that
        two processes sharing it cannot both rotate."""
        if len(self.data_keys) >= DATA_KEY_VERSIONS_MAX:
            raise ValueError("too many data key versions: retire old ones first")
        with self._file_lock():
            disk = Keyring.load(self.path)
            if (disk.data_keys, disk.data_key_current) != (self.data_keys, self.data_key_current):
                raise ValueError(f"the keyring file {self.path} changed since this process read "
                                 "it (another process rotated): nothing rotated; this process "
                                 "re-reads it when the rotation reaches its ledger")
            version = max(self.data_keys) + 1
            key = os.urandom(DATA_KEY_SIZE)
            self.save({**self.data_keys, version: key}, self.data_key_current)
        self.data_keys[version] = key
        self._aead[version] = AESGCM(key)
        return version

    def make_current(self, version: int) -> None:
        """Seal new numbers under ``version`` (held), saved first."""
        assert version in self.data_keys, version
        with self._file_lock():
            self.save(self.data_keys, version)
        self.data_key_current = version

    def drop_data_key(self, version: int) -> None:
        """A version added but never made current (its rotation refused): gone, file first."""
        assert version != self.data_key_current and version in self.data_keys, version
        with self._file_lock():
            self.save({v: k for v, k in self.data_keys.items() if v != version},
                      self.data_key_current)
        del self.data_keys[version]
        del self._aead[version]

    def save(self, data_keys: dict[int, bytes] | None = None, current: int | None = None) -> None:
        data_keys = self.data_keys if data_keys is None else data_keys
        doc = {"format": FORMAT, "index_key": self.index_key.hex(), "pin_key": self.pin_key.hex(),
               "bdk": self.bdk.hex(), "bdk_id": self.bdk_id.hex(),
               "data_keys": {str(v): k.hex() for v, k in sorted(data_keys.items())},
               "data_key_current": self.data_key_current if current is None else current}
        _write_private(self.path, doc)

    @classmethod
    def load(cls, path: str) -> "Keyring":
        with open(path) as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                log.warning("keyring %s is readable by others: chmod 600 it", path)
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a cardcore keyring")
        return cls(path, bytes.fromhex(doc["index_key"]), bytes.fromhex(doc["pin_key"]),
                   bytes.fromhex(doc["bdk"]), bytes.fromhex(doc["bdk_id"]),
                   {int(v): bytes.fromhex(k) for v, k in doc["data_keys"].items()},
                   int(doc["data_key_current"]))

    @classmethod
    def load_or_create(cls, path: str, data_dir: str | None = None) -> "Keyring":
        """Read the keyring, or create it (0600) with fresh keys on first start."""
        try:
            return cls.load(path)
        except FileNotFoundError:
            pass
        index_key = os.urandom(INDEX_KEY_SIZE)
        legacy = os.path.join(data_dir, LEGACY_INDEX_KEY) if data_dir else None
        if legacy and os.path.exists(legacy):
            with open(legacy, "rb") as f:
                index_key = f.read()
            log.warning("copied the card index key of %s into the new keyring; delete %s once "
                        "the keyring is backed up", legacy, legacy)
        ring = cls(path, index_key, os.urandom(PIN_KEY_SIZE), os.urandom(BDK_SIZE),
                   os.urandom(BDK_ID_SIZE), {1: os.urandom(DATA_KEY_SIZE)}, 1)
        ring.save()
        log.warning("created a new keyring at %s (0600). Production keeps the keyring outside "
                    "the data folder (--keyring or CARDCORE_KEYRING) and backs it up: without "
                    "it no card can be found, no PIN checked, no card number read", path)
        return ring
