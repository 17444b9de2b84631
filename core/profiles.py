"""Member profiles at rest: the member's name, phone and birthday sealed, the masked card number
in clear.

A stored profile (LMDB ``profiles``, key: card id) is, since this format::

    0   u8   2 (the format)
    1   u8   n, the masked number's length (at most MASKED_LEN_MAX)
    2   n    the masked card number, ASCII (first 6 and last 4 digits): receipts and GetCard show
             it without a key
    2+n 12   the nonce (stored: how it is chosen may change and a record still opens)
    ... the profile's JSON (name, phone, birthday, home store, masked number) under
        AES-256-GCM with the profile key, its 16-byte tag last; associated data: the format
        byte, the card id and the masked number, so a sealed profile moved to another card, or
        given another masked number, does not open

The nonce is derived, not drawn: the first 12 bytes of HMAC-SHA256, under a key derived from
the profile key, of everything sealed (the head with the masked number, the card id, the JSON).
Replicas of a shard apply the same groups and must store the same bytes (docs/cluster.md,
"Determinism rules"), so no sealing may draw randomness. Why it is safe: AES-GCM breaks when
one nonce seals two *different* messages under one key. Here a nonce repeats only for the same
(card, masked number, document), which seals to the very same bytes (nothing leaks but that the
profile is unchanged, which the same stored bytes say anyway); two different inputs share a
nonce only by a collision of a PRF truncated to 96 bits, the same odds as random nonces
(about n^2 / 2^97 for n sealings). This is the synthetic-IV construction (as in AES-SIV and
AES-GCM-SIV): it needs no counter, seq or uniqueness from the caller.

Profiles stored before it are their JSON (a first byte ``{``): read as they are, and sealed by
the first writer that has the key (``Ledger``). The profile key is derived from the keyring's
index key, like the member lookup key: the index key is never rotated in place (every card id
depends on it), so sealed profiles never need re-sealing, and a restored data folder opens with
the keyring it already needs. It is sealed where the request is built (the gRPC process), so the
bytes are part of the group the writer applies and every ledger that applies the same groups
stores the same profile.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PROFILE_KEY_LABEL = b"cardcore/v1 member profile key"
FORMAT_SEALED = 2
MASKED_LEN_MAX = 23  # 19 digits, and room to spare
NONCE_SIZE = 12


class ProfileError(Exception):
    """A stored profile that does not open (tampered, or another card's): no detail."""


def profile_key(index_key: bytes) -> bytes:
    """The 32-byte AES key of the stored profiles, derived from the card index key (domain-
    separated from the card ids and the member lookup digests)."""
    return hmac.digest(index_key, PROFILE_KEY_LABEL, hashlib.sha256)


def encode(doc: dict) -> bytes:
    """A profile's JSON, canonical (sorted keys, no spaces): the same document, the same bytes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def masked_of(raw: bytes | None) -> str:
    """The masked card number of a stored profile, no key needed ("" when there is none)."""
    if not raw:
        return ""
    if raw[0] == FORMAT_SEALED:
        return raw[2:2 + raw[1]].decode("ascii")
    try:
        return str(json.loads(raw).get("masked", ""))
    except (ValueError, AttributeError):
        return ""


class ProfileBox:
    """Seals and opens stored profiles with the profile key; without one (``key`` None: tools
    without the keyring) it opens only legacy JSON, and of a sealed profile the masked number."""

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None
        self._nonce_key = (hmac.digest(key, b"cardcore/v1 profile nonces", hashlib.sha256)
                           if key is not None else b"")

    @property
    def keyed(self) -> bool:
        return self._aead is not None

    def seal(self, card_id: bytes, doc: dict) -> bytes:
        """``doc`` sealed for ``card_id``, under a nonce derived from what is sealed (see the
        module's docstring): the same card and document, the same bytes, wherever it is sealed
        (a replica re-sealing in its apply or at open stores what its peers store)."""
        assert self._aead is not None, "sealing needs the profile key"
        masked = str(doc.get("masked", "")).encode("ascii")
        if len(masked) > MASKED_LEN_MAX:
            raise ValueError("masked number too long")
        head = bytes((FORMAT_SEALED, len(masked))) + masked
        assert len(card_id) == 16  # the nonce's input below is unambiguous because it is fixed
        plain = encode(doc)
        # head (format, length, masked number) | 16-byte card id | plaintext: unambiguous
        nonce = hmac.digest(self._nonce_key, head + card_id + plain, hashlib.sha256)[:NONCE_SIZE]
        return head + nonce + self._aead.encrypt(nonce, plain, head[:1] + card_id + masked)

    def open(self, card_id: bytes, raw: bytes | None) -> dict:
        """The profile as a dict ({} when there is none)."""
        if not raw:
            return {}
        if raw[0] != FORMAT_SEALED:
            doc = json.loads(raw)  # stored before profiles were sealed
            return doc if isinstance(doc, dict) else {}
        n = raw[1]
        masked = raw[2:2 + n]
        if self._aead is None:
            return {"masked": masked.decode("ascii")}
        nonce, sealed = raw[2 + n:2 + n + NONCE_SIZE], raw[2 + n + NONCE_SIZE:]
        try:
            return json.loads(self._aead.decrypt(nonce, sealed, raw[:1] + card_id + masked))
        except InvalidTag:
            raise ProfileError("a stored profile does not open") from None

    def is_sealed(self, raw: bytes | None) -> bool:
        return bool(raw) and raw[0] == FORMAT_SEALED
