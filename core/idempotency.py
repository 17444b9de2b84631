"""Idempotency: a request_id's record, its payload digest, and the outcome it answers with.

A mutating request is applied at most once per request_id: its record in the
``requests`` sub-database (layout.IDEM) holds the payload digest, the outcome
and the journal entry it made. A retry with the same payload is answered from
the record; another payload is refused (REASON_DUPLICATE_REQUEST_MISMATCH).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

from cardcore import layout as L

NO_PIN = bytes(32)


class InvariantError(RuntimeError):
    """The ledger would write, or has read, something that breaks an invariant.

    Raised inside the write transaction (which is then aborted), never
    caught: the writer stops rather than write a half-truth. Explicit raises,
    not ``assert``: they must hold under ``python -O`` too.
    """


def request_tag(request_key: bytes) -> bytes:
    """The 8-byte tag a journal entry carries to link it to its request."""
    return hashlib.blake2b(request_key, digest_size=L.REQUEST_TAG_SIZE).digest()


@dataclasses.dataclass(slots=True)
class PendingOp:
    """A validated mutation, packed by the request handler before the writer sees it."""
    request_key: bytes        # the request_id, ASCII; empty for internal operations
    card_id: bytes            # 16 bytes (admin operations: their subject)
    packed: bytes             # layout.OP, 128 bytes
    digest: bytes             # BLAKE2b-128 of the payload, PIN fields left out: the idempotency digest
    profile: bytes | None = None  # OPEN only: the JSON profile to store
    ksn_counter: int = 0      # from a terminal: its DUKPT transaction counter (op's terminal_id)
    sealed: bytes | None = None   # OPEN only: the card number sealed under the current data key
    payload: bytes | None = None  # admin and internal operations: what to store

    @classmethod
    def build(cls, request_key: bytes, op: int, card_id: bytes, amount_minor: int = 0,
              store_id: int = 0, terminal_id: int = 0, staff_id: int = 0, tier: int = 0,
              home_store_id: int = 0, profile: bytes | None = None, *, operator_id: int = 0,
              pin_flags: int = 0, pin_check: bytes = NO_PIN, new_pin_check: bytes = NO_PIN,
              ksn_counter: int = 0, sealed: bytes | None = None) -> "PendingOp":
        packed = L.OP.pack(op, tier, pin_flags, 0, home_store_id, amount_minor, store_id,
                           terminal_id, staff_id, operator_id, request_tag(request_key), card_id,
                           bytes(8), pin_check, new_pin_check)
        # Not the PIN check values: a re-send with another PIN must get the original answer,
        # never "another payload", or the answer would tell a right guess from a wrong one.
        h = hashlib.blake2b(packed[:L.OP_DIGEST_SIZE], digest_size=16)
        if profile is not None:
            h.update(profile)
        return cls(request_key, card_id, packed, h.digest(), profile, ksn_counter, sealed)

    @classmethod
    def admin(cls, request_key: bytes, op: int, subject: bytes, payload: bytes, operator_id: int,
              digest_payload: bytes | None = None) -> "PendingOp":
        """An admin operation; ``digest_payload`` (default: payload) is what a retry must repeat."""
        assert L.OP_ADMIN_MIN <= op and len(subject) == L.CARD_ID_SIZE
        packed = L.OP.pack(op, 0, 0, 0, 0, 0, 0, 0, 0, operator_id, request_tag(request_key),
                           subject, bytes(8), NO_PIN, NO_PIN)
        digest = hashlib.blake2b(packed + (payload if digest_payload is None else digest_payload),
                                 digest_size=16).digest()
        return cls(request_key, subject, packed, digest, payload=payload)


class Outcome(NamedTuple):
    """What became of one operation: the reply is built from this."""
    reason: int                 # layout.R_* / cardcore.v1.Reason
    replayed: bool              # answered from an earlier identical request
    op: int                     # layout.OP_*
    entry: bytes | None         # the journal entry (applied), or the kernel's declined entry
    available_minor: int = 0    # for INSUFFICIENT_FUNDS
    count: int = 0              # internal operations: items changed (card numbers re-sealed)


def replay(txn, journal_db, idem: bytes, digest: bytes) -> Outcome:
    """The original outcome of a request, from its idempotency record; another payload is a
    mismatch."""
    _, op_type, reason, _, stored_digest, seq, available, _ = L.IDEM.unpack(idem)
    if stored_digest != digest:
        return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, op_type, None, 0)
    entry = txn.get(L.SEQ_KEY.pack(seq), db=journal_db) if seq else None
    if reason == L.R_OK and entry is None:
        raise InvariantError("idempotency record points at no journal entry")
    return Outcome(reason, True, op_type, entry, available)

def repeat(first: Outcome, same_payload: bool) -> Outcome:
    if not same_payload:
        return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, first.op, None, 0)
    return first._replace(replayed=True)

