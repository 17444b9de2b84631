"""AES DUKPT (ANSI X9.24-3-2017) key derivation on cryptography's AES: small and separate.

No package on the registry implements AES DUKPT (``dukpt`` and ``pydukpt`` are
the TDES scheme of X9.24-1), so this follows the standard's own description:

- A terminal's key serial number (KSN) is 12 bytes: the 8-byte initial key ID
  (IKID: 4-byte BDK ID + 4-byte derivation ID) and a 32-bit transaction
  counter with at most 16 one-bits (the largest valid counter is 0xFFFF0000).
- Every derivation step is AES-ECB of 16 bytes of derivation data under the
  current key: version 01 | key block counter | key usage (2 B) | algorithm
  (2 B) | key length in bits (2 B) | 8 bytes, which are the IKID for the
  initial key and otherwise the IKID's low 4 bytes followed by the counter.
- Host side: initial key = derive(BDK, usage 8001, IKID); then for every set
  bit of the counter, most significant first, an intermediate key with usage
  8000 over the counter built so far; then the working key for the usage needed.

Checked against the standard's test values (tests/test_dukpt.py). The AES
itself is OpenSSL's, called through ``cardcore.ext.aes`` (one C call per step). Keys never
leave as text: callers hold bytes and must not log them.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from cardcore.ext.aes import dukpt_walk, ecb_encrypt

KSN_SIZE = 12
IKID_SIZE = 8
COUNTER_MAX = 0xFFFF0000
COUNTER_ONE_BITS_MAX = 16


class KeyUsage(enum.IntEnum):
    KEY_ENCRYPTION = 0x0002
    PIN_ENCRYPTION = 0x1000
    MAC_GENERATION = 0x2000
    MAC_VERIFICATION = 0x2001
    MAC_BOTH = 0x2002
    DATA_ENCRYPTION = 0x3000
    DATA_DECRYPTION = 0x3001
    DATA_BOTH = 0x3002
    KEY_DERIVATION = 0x8000
    INITIAL_KEY = 0x8001


class KeyType(enum.Enum):
    """(algorithm indicator, key length in bits) of the derivation data."""
    AES128 = (0x0002, 128)
    AES192 = (0x0003, 192)
    AES256 = (0x0004, 256)


# version 01 | key block counter | usage | algorithm | length in bits | 8 bytes (see above)
_DERIVATION_DATA = struct.Struct(">BBHHH8s")
_DERIVATION_DATA_COUNTER = struct.Struct(">BBHHH4sI")


def _derivation_data(usage: KeyUsage, key_type: KeyType, ikid: bytes, counter: int) -> bytearray:
    """The 16 bytes of derivation data; the key block counter (byte 1) is set per block."""
    algorithm, bits = key_type.value
    if usage == KeyUsage.INITIAL_KEY:
        return bytearray(_DERIVATION_DATA.pack(1, 1, usage, algorithm, bits, ikid))
    return bytearray(_DERIVATION_DATA_COUNTER.pack(1, 1, usage, algorithm, bits, ikid[4:8], counter))


def _derive(key: bytes, key_type: KeyType, data: bytearray) -> bytes:
    """One derivation step: as many AES blocks as the derived key needs."""
    bits = key_type.value[1]
    out = b""
    for block_counter in range(1, (bits + 127) // 128 + 1):
        data[1] = block_counter
        out += ecb_encrypt(key, bytes(data))
    return out[:bits // 8]


class Ksn(NamedTuple):
    ikid: bytes
    counter: int

    @classmethod
    def parse(cls, ksn: bytes) -> "Ksn":
        """Split a 12-byte KSN; refuse a counter the scheme can never produce."""
        if len(ksn) != KSN_SIZE:
            raise ValueError("a KSN is 12 bytes")
        counter = int.from_bytes(ksn[IKID_SIZE:], "big")
        if counter == 0 or counter > COUNTER_MAX or counter.bit_count() > COUNTER_ONE_BITS_MAX:
            raise ValueError("KSN counter out of range")
        return cls(bytes(ksn[:IKID_SIZE]), counter)


def initial_key(bdk: bytes, ikid: bytes, key_type: KeyType = KeyType.AES128) -> bytes:
    """The key injected into a terminal: derived from the chain's BDK and the terminal's IKID."""
    if len(ikid) != IKID_SIZE:
        raise ValueError("an initial key ID is 8 bytes")
    return _derive(bdk, key_type, _derivation_data(KeyUsage.INITIAL_KEY, key_type, ikid, 0))


def derivation_key(ik: bytes, ikid: bytes, counter: int,
                   key_type: KeyType = KeyType.AES128) -> bytes:
    """The intermediate derivation key for ``counter``, walked down from the initial key."""
    key = ik
    working = 0
    mask = 0x80000000
    while mask:
        if counter & mask:
            working |= mask
            key = _derive(key, key_type,
                          _derivation_data(KeyUsage.KEY_DERIVATION, key_type, ikid, working))
        mask >>= 1
    return key


def working_key(ik: bytes, ksn: Ksn, usage: KeyUsage, key_type: KeyType = KeyType.AES128,
                working_type: KeyType = KeyType.AES128) -> bytes:
    """The transaction key for ``usage`` (PIN, MAC, data) at ``ksn``, from the initial key."""
    key = derivation_key(ik, ksn.ikid, ksn.counter, key_type)
    return _derive(key, working_type, _derivation_data(usage, working_type, ksn.ikid, ksn.counter))


def host_working_key(bdk: bytes, ksn: Ksn, usage: KeyUsage,
                     key_type: KeyType = KeyType.AES128,
                     working_type: KeyType = KeyType.AES128) -> bytes:
    """What the server does per swipe: BDK + KSN -> the transaction's working key."""
    return working_key(initial_key(bdk, ksn.ikid, key_type), ksn, usage, key_type, working_type)


def next_counter(counter: int) -> int:
    """The next valid transaction counter after ``counter`` (X9.24-3: skip counters with more
    than 16 one-bits by adding their lowest set bit); raises once the key is used up."""
    counter += 1
    while counter.bit_count() > COUNTER_ONE_BITS_MAX:
        counter += counter & -counter
    if counter > COUNTER_MAX:
        raise ValueError("this terminal's DUKPT key is used up: enroll the till under a new id")
    return counter


class KeyPath:
    """Working keys of one initial key, remembering the last derivation path.

    A counter's derivation key is reached through one intermediate key per set
    bit, most significant first. Consecutive counters share most of that path,
    so keeping it turns ~16 AES derivations per transaction into ~2. Used by
    the host (one per terminal) and by the terminal library alike.
    """

    __slots__ = ("ikid", "_low", "_path")

    def __init__(self, ik: bytes, ikid: bytes):
        if len(ik) != 16 or len(ikid) != IKID_SIZE:
            raise ValueError("an AES-128 initial key is 16 bytes, its ID 8")
        self.ikid = ikid
        self._low = ikid[4:8]
        self._path: list[tuple[int, bytes]] = [(0, ik)]  # (counter so far, key)

    def working_keys(self, counter: int, *usages: KeyUsage) -> list[bytes]:
        """The AES-128 working key for each usage at ``counter`` (a valid counter)."""
        path = self._path
        # The set bits above the highest bit where counter and the last path differ are
        # shared: their intermediate keys are path[1..shared]. The rest is walked in C
        # (cardcore.ext.aes.dukpt_walk, held to working_key() by a test).
        top = (counter ^ path[-1][0]).bit_length()
        del path[(counter >> top).bit_count() + 1:]
        entries, keys = dukpt_walk(path[-1][1], self._low, counter >> top << top, counter, usages)
        path.extend(entries)
        return keys
