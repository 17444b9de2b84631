"""Where a member's record could live, measured with py-lmdb alone (issue 11's next step):

    .venv/bin/python bench/member_layouts.py [--cards 20000] [--rounds 30] [--card-size 128]
                                             [--member-size 64] [--wide-size 176]

Each layout holds ``--cards`` card records and applies the same groups of 1,000 purchases (three
groups a write transaction, as a checkpoint's), each purchase as the writer's LMDB work on its
card: the card record read and written back (``getmulti``/``putmulti`` in key order), a card
history key added, and the member's record read and written where the layout keeps it:

- ``separate``: today's, ``member_cards`` a sub-database of its own (16-byte card id keys);
- ``beside``: in the cards' sub-database under the card id and one more byte (adjacent keys:
  the card's page is read and dirtied anyway);
- ``in card``: no member record; the card record ``--wide-size`` bytes (the member's counters in
  it, written by the same put: a card record v2);
- ``none``: no member record at all (the floor).

Layouts take turns within each round (the order alternating), CPU time per group
(``time.process_time``), medians printed with each layout's cost over ``none`` per purchase.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import lmdb

GROUP_OPS, GROUPS_PER_TXN = 1000, 3
HISTORY_VALUE = bytes(16)


class Layout:
    """One LMDB environment holding the cards (and the members, as the layout keeps them)."""

    def __init__(self, folder: str, ids: list[bytes], card_size: int,
                 member_size: int | None, beside: bool) -> None:
        self.env = lmdb.open(folder, map_size=1 << 31, max_dbs=4, sync=False)
        self.cards = self.env.open_db(b"cards")
        self.history = self.env.open_db(b"card_entries")
        self.members = None if member_size is None else (
            self.cards if beside else self.env.open_db(b"member_cards"))
        self.suffix = b"m" if beside else b""
        with self.env.begin(write=True) as txn:
            txn.cursor(db=self.cards).putmulti([(k, bytes(card_size)) for k in ids])
            if self.members is not None:
                txn.cursor(db=self.members).putmulti(
                    [(k + self.suffix, bytes(member_size)) for k in ids])
        self.seq = 0

    def apply(self, groups: list[list[bytes]]) -> float:
        """The groups in one write transaction; CPU seconds a group."""
        t0 = time.process_time()
        with self.env.begin(write=True) as txn:
            for keys in groups:
                cards = txn.cursor(db=self.cards)
                cards.putmulti(cards.getmulti(keys))
                if self.members is not None:
                    members = txn.cursor(db=self.members)
                    members.putmulti(members.getmulti([k + self.suffix for k in keys]))
                self.seq += 1
                seq = self.seq.to_bytes(8, "big")
                txn.cursor(db=self.history).putmulti([(k + seq, HISTORY_VALUE) for k in keys])
        return (time.process_time() - t0) / len(groups)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--card-size", type=int, default=128, help="today's card record (bytes)")
    ap.add_argument("--member-size", type=int, default=64, help="today's member record (bytes)")
    ap.add_argument("--wide-size", type=int, default=176,
                    help="a card record holding the member's counters (bytes)")
    args = ap.parse_args()
    rng = random.Random(7)
    ids = sorted(os.urandom(16) for _ in range(args.cards))
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {
            "separate": Layout(os.path.join(tmp, "a"), ids, args.card_size, args.member_size,
                               False),
            "beside": Layout(os.path.join(tmp, "b"), ids, args.card_size, args.member_size, True),
            "in card": Layout(os.path.join(tmp, "c"), ids, args.wide_size, None, False),
            "none": Layout(os.path.join(tmp, "d"), ids, args.card_size, None, False),
        }
        times: dict[str, list[float]] = {name: [] for name in layouts}
        try:
            for r in range(args.rounds):
                groups = [sorted({rng.choice(ids) for _ in range(GROUP_OPS)})
                          for _ in range(GROUPS_PER_TXN)]
                names = list(layouts)
                for name in names if r % 2 == 0 else names[::-1]:
                    times[name].append(layouts[name].apply(groups))
        finally:
            for layout in layouts.values():
                layout.env.close()
    none = statistics.median(times["none"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:9s} {m * 1e3:6.2f} ms a group of {GROUP_OPS:,} purchases (median of "
              f"{args.rounds}); over none: {(m - none) * 1e6 / GROUP_OPS:+.2f} µs a purchase")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
