"""Points lots: where a card's points came from and when, so expiry (and, later, refunds) are
exact.

Every point a card holds sits in a lot: (card, the day it was earned) -> points left (and
earned), layout.POINTS_LOT in ``points_lots``, with ``lots_by_day`` (day | card) as the expiry
sweep's order. The rule, for every journal entry that moves points (one definition, used by the
writer, the upgrade of an older ledger and verify; for the runs its C glue takes, the writer moves
the lots of redemptions with ``writerglue.move_lots``, this rule in C, held to ``Lots.apply`` by
tests/test_writerglue.py):

- its ``gain`` (points earned: ``points_delta + points_redeemed`` when positive) goes into the
  lot of the day of its group time (UTC days since 1970-01-01);
- its ``loss`` (points redeemed or spent, points expired) comes out of the card's lots oldest
  first, the loss before the gain (so a purchase redeems from what was there before it).

So the lots of a card always add up to its points; when a refund left the card owing points
(rule 12, a program whose ``refund_points_shortfall`` is "owe"), its lots hold nothing: the loss
takes what the lots hold and the rest is the debt, and a later gain pays the debt first, its
lots getting only what is left over it. The lots add up to max(points, 0). A lot earned on day D expires at the start
of day D + ``points_expire_days`` (the program's; 0 = never): the writer sweeps expired lots in
every group, up to EXPIRY_CARDS_MAX cards a group, and journals one points-expired entry per
card (ref_id: the newest day it expires).

A replacement (rule 16) moves points without earning or spending them: its two entries are left
out of the rule, and every lot of the old card becomes the new card's, on the same day (``move``),
so points keep their expiry.
"""
from __future__ import annotations

import struct

from cardcore import layout as L

EXPIRY_CARDS_MAX = 64  # cards whose lots one group expires at most


def day_of(ts_us: int) -> int:
    """UTC days since 1970-01-01 of a time in Unix microseconds."""
    return ts_us // L.DAY_US


# layout.JOURNAL: points_delta (64), points_after (88), points_redeemed (176)
_MOVE = struct.Struct("<64xq16xq80xq")


def movement(entry: bytes, offset: int = 0) -> tuple[int, int]:
    """(gain, loss) of the lots of the applied journal entry at ``offset`` (layout.JOURNAL):
    its points' unless the card owes points before or after it (then what the lots hold pays
    the loss, and the gain pays the debt first)."""
    points_delta, after, taken = _MOVE.unpack_from(entry, offset)
    gain, loss = points_delta + taken, taken
    if gain < 0:
        gain, loss = 0, loss - gain
    before = after - points_delta
    if after >= 0 and 0 <= loss <= before:  # the lots hold what it takes (every case but "owe")
        return gain, loss
    from_lots = min(loss, max(before, 0))
    debt = max(-before, 0) + loss - from_lots
    return max(gain - debt, 0), from_lots


class Lots:
    """The lots of many cards in a mapping ``(card id, day) -> [left, earned]`` (an LMDB view in
    the writer, a dict when rebuilt from the journal): moves points by the rule above."""

    def __init__(self, store) -> None:
        self.store = store  # get(card, day) / put(card, day, left, earned, new) / delete / oldest

    def apply(self, card_id: bytes, ts_us: int, gain: int, loss: int) -> None:
        store = self.store
        while loss:
            oldest = store.oldest(card_id)
            if oldest is None:
                raise ValueError("points spent beyond the card's lots")
            day, left, earned = oldest
            taken = min(left, loss)
            loss -= taken
            if taken == left:
                store.delete(card_id, day)
            elif gain and day == day_of(ts_us):  # (then loss is 0) the gain goes into this
                # same lot, today's: one write of it, not a write, a read and a write
                store.put(card_id, day, left - taken + gain, earned + gain, False)
                return
            else:
                store.put(card_id, day, left - taken, earned, False)
        if gain:
            day = day_of(ts_us)
            have = store.get(card_id, day)
            left, earned = have if have is not None else (0, 0)
            store.put(card_id, day, left + gain, earned + gain, have is None)

    def move(self, old_id: bytes, new_id: bytes) -> int:
        """A replacement: the old card's lots become the new card's (which has none), day by day;
        the points moved."""
        store, moved = self.store, 0
        while (oldest := store.oldest(old_id)) is not None:
            day, left, earned = oldest
            if store.get(new_id, day) is not None:
                raise ValueError("a replacement onto a card that holds lots")
            store.delete(old_id, day)
            store.put(new_id, day, left, earned, True)
            moved += left
        return moved


class DictLots:
    """Lots in memory: ``{card id: {day: [left, earned]}}`` (verify, the upgrade's rebuild)."""

    def __init__(self) -> None:
        self.cards: dict[bytes, dict[int, list[int]]] = {}

    def get(self, card_id: bytes, day: int):
        lot = self.cards.get(card_id, {}).get(day)
        return None if lot is None else tuple(lot)

    def put(self, card_id: bytes, day: int, left: int, earned: int, new: bool) -> None:
        self.cards.setdefault(card_id, {})[day] = [left, earned]

    def delete(self, card_id: bytes, day: int) -> None:
        del self.cards[card_id][day]

    def oldest(self, card_id: bytes):
        lots = self.cards.get(card_id)
        if not lots:
            return None
        day = min(lots)
        return (day, *lots[day])

    def records(self) -> dict[bytes, bytes]:
        """Every lot as the ``points_lots`` sub-database holds it (key -> value)."""
        return {L.LOT_KEY.pack(cid, day): L.POINTS_LOT.pack(*lot)
                for cid, lots in self.cards.items() for day, lot in lots.items()}


def rebuild(journal_cursor) -> DictLots:
    """Every card's lots from the journal alone (key, entry pairs in sequence order)."""
    lots = DictLots()
    rule = Lots(lots)
    replaced = b""
    for _, entry in journal_cursor:
        if entry[1] in L.ADMIN_OPS or entry[1] == L.OP_PIN_FAILED:
            continue
        if entry[1] == L.OP_CARD_REPLACED:
            replaced = entry[16:32]
            continue
        if entry[1] == L.OP_REPLACEMENT_OPENED:  # right after its card's CARD_REPLACED
            rule.move(replaced, entry[16:32])
            continue
        gain, loss = movement(entry)
        if gain or loss:
            rule.apply(entry[16:32], L.JOURNAL.unpack_from(entry)[17], gain, loss)
    return lots
