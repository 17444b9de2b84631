"""The member lookup index (rule 17): a member's cards found by phone or name, kept keyed.

``members`` holds ``kind | digest | card_id`` keys (``layout.MEMBER_KEY``), where
``digest = HMAC-SHA256(lookup_key, kind | normalised value)[:16]``: a stolen data
folder does not list the members' phones or names, and a guessed phone costs
a keyed hash the thief cannot compute without the keyring.

The lookup key is derived from the keyring's ``index_key`` (never rotated in
place, like the card ids it makes), so the keyring file keeps its format and a
restored data folder finds its members with the keyring it already needs.

One function (``MemberIndex.keys``) turns a stored profile into its index keys:
the writer uses it at opening, the ledger to fill the index once for cards
opened before it, and ``verify`` to rebuild it from the profiles.
"""
from __future__ import annotations

import hashlib
import hmac

from cardcore import layout as L
from cardcore.cards import PreparedHmac
from cardcore.rules import normalise_name, normalise_phone

LOOKUP_KEY_LABEL = b"cardcore/v1 member lookup key"


def lookup_key(index_key: bytes) -> bytes:
    """The 32-byte key of the member index, derived from the card index key (domain-separated:
    a member digest is never a card id)."""
    return hmac.digest(index_key, LOOKUP_KEY_LABEL, hashlib.sha256)


class MemberIndex(PreparedHmac):
    """Keyed digests of normalised phones and names."""

    __slots__ = ()

    def prefix(self, kind: int, normalised: str) -> bytes:
        """The 17-byte key prefix of one normalised phone or name (``kind``: MEMBER_BY_*)."""
        digest = self.digest(bytes((kind,)) + normalised.encode("utf-8"))[:L.MEMBER_DIGEST_SIZE]
        return L.MEMBER_PREFIX.pack(kind, digest)

    def phone_prefix(self, phone: str) -> bytes | None:
        digits = normalise_phone(phone)
        return self.prefix(L.MEMBER_BY_PHONE, digits) if digits else None

    def name_prefix(self, name: str) -> bytes | None:
        folded = normalise_name(name)
        return self.prefix(L.MEMBER_BY_NAME, folded) if folded else None

    def keys(self, card_id: bytes, profile: dict) -> list[bytes]:
        """The index keys of a card's profile (opened: ``profiles.ProfileBox.open``): none for a
        profile with neither a usable phone nor a name."""
        phone, name = str(profile.get("phone") or ""), str(profile.get("name") or "")
        prefixes = (self.phone_prefix(phone), self.name_prefix(name))
        return [p + card_id for p in prefixes if p is not None]

    def items(self, profiles) -> list[tuple[bytes, bytes]]:
        """The whole index of ``profiles`` ((card_id, opened profile) pairs), sorted, values
        empty."""
        return sorted((key, b"") for card_id, profile in profiles
                      for key in self.keys(card_id, profile))
