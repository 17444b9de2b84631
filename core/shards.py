"""Cluster: which card shard holds a card (docs/cluster.md, "Several shards").

A card's *slot* is fixed by its id and never changes: the first two bytes of the id (a keyed hash
of the card number, so slots are evenly used), big-endian, mod ``SLOTS``. A *routing table* maps
each slot to a card shard. The table, not a formula, is what fronts agree on, so that a slot can
later move to another shard (a table with that one entry changed, and the slot's cards copied)
without moving any other card. A new table spreads the slots round-robin over the card shards in
the order given.

The table is stored once per cluster (``jetlog.ROUTES_KEY``, made only if absent by the first
front over several card shards) as JSON: ``{"slots": SLOTS, "shards": [shard of slot 0, of
slot 1, ...]}``.
"""
from __future__ import annotations

import dataclasses
import json
import struct

from cardcore import layout as L
from cardcore.idempotency import PendingOp, request_key

SLOTS = 4096          # fixed from day one: a table of this many entries
CARD_SHARDS_MAX = 64  # card shards one front routes over (each is a follower process of its own)
SHARD_NUMBER_MAX = 4095  # a shard's number (cardcore replica --shard; its NATS names, certificates)


class RoutesInvalid(ValueError):
    """A stored routing table that is not one (the message says why): a setting to fix."""


def slot_of(card_id: bytes) -> int:
    """The card's slot: its id's first two bytes (big-endian) mod SLOTS."""
    assert len(card_id) >= 2, card_id
    return ((card_id[0] << 8) | card_id[1]) % SLOTS


def spread(card_shards: list[int]) -> list[int]:
    """A new table: slot ``s`` to ``card_shards[s % len(card_shards)]``."""
    assert 0 < len(card_shards) <= CARD_SHARDS_MAX and len(set(card_shards)) == len(card_shards)
    return [card_shards[s % len(card_shards)] for s in range(SLOTS)]


def encode_routes(table: list[int]) -> bytes:
    assert len(table) == SLOTS
    return json.dumps({"slots": SLOTS, "shards": table}, separators=(",", ":")).encode()


def decode_routes(data: bytes) -> list[int]:
    """The table stored; RoutesInvalid if it is not a table of SLOTS shard numbers."""
    try:
        doc = json.loads(data)
        table = doc["shards"]
        ok = (doc["slots"] == SLOTS and isinstance(table, list) and len(table) == SLOTS
              and all(type(s) is int and s >= 0 for s in table))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RoutesInvalid(f"the stored routing table is not a table of {SLOTS} shard numbers")
    return table


def card_shards_of(table: list[int]) -> list[int]:
    """The card shards a table routes to, ascending."""
    return sorted(set(table))


# ---- two cards on two card shards (docs/cluster.md, "Two cards on two card shards") -----------

def marked(op: PendingOp, flag: int) -> PendingOp:
    """A copy of ``op`` with route flag ``flag`` set (layout.OP route_flags: outside its digest,
    so a retry through any front is the same request)."""
    at = L.OP_OFF_ROUTE_FLAGS
    packed = op.packed[:at] + bytes((op.packed[at] | flag,)) + op.packed[at + 1:]
    return dataclasses.replace(op, packed=packed)


def referrer_elsewhere(op: PendingOp) -> PendingOp:
    """Opening ``op`` marked REFERRER_ELSEWHERE: its card shard's writer puts the referrer's
    bonus in its outbox instead of looking for the referrer among its own cards."""
    assert op.packed[0] in L.OPENINGS
    return marked(op, L.REFERRER_ELSEWHERE)


def basket_elsewhere(op: PendingOp) -> PendingOp:
    """Split-tender payment ``op`` marked BASKET_ELSEWHERE: its basket has a payment made on
    another card shard, so its entry counts no sale of the basket (BASKET_BEGUN_ELSEWHERE)."""
    assert op.packed[0] == L.OP_PURCHASE
    return marked(op, L.BASKET_ELSEWHERE)


def outbox_bonus(shard: int, record: tuple) -> PendingOp:
    """The referral bonus an outbox record of card shard ``shard`` owes (layout.OUTBOX), to be
    applied on its referrer's card shard: caller SYSTEM ``shard`` + 1 (the system's own keys use
    0), request id the opening's seq, so that every front may deliver it and a delivery sent
    again is answered as the first was; its entry's link_seq that seq, ref_id ``shard`` + 1.
    Its client time is the opening's group time: once that is older than the request window
    there (its request record may be pruned), a delivery is refused (REQUEST_TOO_OLD), never
    paid a second time."""
    _, _, seq, referrer, points, made_us = record
    return PendingOp.build(request_key(L.CALLER_SYSTEM, shard + 1, b"referral-bonus:%d" % seq),
                           L.OP_REFERRAL_BONUS, referrer, points, client_time_us=made_us,
                           link_seq=seq, ref_id=shard + 1)


def forward(card_id: bytes, shard: int) -> PendingOp:
    """Card ``card_id``'s number forwarded to card shard ``shard`` (OP_CARD_FORWARDED), on the
    card shard its slot routes to: a replacement on ``shard`` may then make that card there."""
    return PendingOp.internal(L.OP_CARD_FORWARDED, L.FORWARD_PAYLOAD.pack(shard), subject=card_id)


def outbox_done(seqs: list[int]) -> PendingOp:
    """The outbox records of these seqs taken out (delivered, their outcomes settled)."""
    assert 0 < len(seqs) <= L.OUTBOX_DONE_MAX
    return PendingOp.internal(L.OP_OUTBOX_DONE, struct.pack(f"<{len(seqs)}Q", *seqs))
