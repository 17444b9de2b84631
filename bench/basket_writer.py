"""The basket's cost in the writer alone, in-process: bench/programs.py's two sides (a 5-line
basket with its own coupon offering 500 points, and a plain purchase), and between them the
basket without its coupon, applied to one ledger on the supermarket program, in CPU time:

    .venv/bin/python bench/basket_writer.py [--rounds 5] [--cards 20000] [--coupons-held 12]
        [--base REV_OR_FILE ...] [--profile basket|plain] [--stat] [--pages] [--no-aggregates]

Cards opened, topped up, given points (one large purchase each) and ``--coupons-held`` coupons
each (the coupons bench/programs.py's cards hold by its third round: the sub-database a basket
writes its coupon in); then each round applies plain, no coupon and basket in turn (the order
alternating), SPANS spans of GROUPS_PER_SPAN groups of 1,000 on random cards each, a span one
write transaction committed with sync on (as a checkpoint's transaction spans groups: 2,000
operations is what a 100 ms checkpoint holds at 20,000/s). A basket's coupon is bought just
before its round, as bench/programs.py does. Per operation: the CPU of applying
(``time.process_time``) and of the commit; medians of the rounds, and plain / the others.

``--base``: a revision's core/ledger.py (or a file) timed too, its spans taking turns with this
tree's on the same ledger (A/B in one process: a shared machine moves both alike).
``--no-aggregates``: a ledger that keeps no day totals and no member metrics (what the
per-operation glue costs, without them). ``--profile``: cProfile of that side's spans in the last
round. ``--stat``: each sub-database's
records and pages at the end. ``--pages``: the same run again under strace (installed),
counting the pages each commit writes (``/proc/self/io`` cannot: its write_bytes counts several
times what LMDB writes); its CPU figures are strace's, not to be compared.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
import cProfile  # noqa: E402  (the standard library's: bench/profile.py shares its name)
import pstats  # noqa: E402

sys.path.insert(0, HERE)
import aggregates_writer  # noqa: E402  (card ids and request keys, the opening and top-ups)
from daytotals_stores import base_module  # noqa: E402  (a revision's module, loaded)

from cardcore import layout as L  # noqa: E402
from cardcore.idempotency import PendingOp  # noqa: E402
from cardcore.ledger import Ledger, _Group  # noqa: E402

PROGRAM = os.path.join(os.path.dirname(HERE), "examples", "programs", "supermarket.toml")
FRESH, GROCERY, TOBACCO = 1, 2, 3
FRESH_10_OFF, COUPON_POINTS = 2, 500
GROUP_OPS, GROUPS_PER_SPAN, SPANS = aggregates_writer.GROUP_OPS, 2, 4
SIDES = ("plain", "no coupon", "basket")  # "no coupon": the basket's lines and points alone
PIN_DEV = L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET  # a development server's purchase: no PIN


class Run:
    def __init__(self, ledger: Ledger, ids: list[bytes], rng, key, ts: int) -> None:
        self.ledger, self.ids, self.rng, self.key, self.ts = ledger, ids, rng, key, ts

    def group(self, ops: list[PendingOp]) -> list:
        self.ts += 1000
        return self.ledger.apply_group(ops, self.ts)

    def op(self, prefix: str, kind: int, cid: bytes, amount: int, **kw) -> PendingOp:
        kw.setdefault("store_id", 3)
        return PendingOp.build(self.key(prefix), kind, cid, amount, pin_flags=PIN_DEV,
                               client_time_us=self.ts + 1000, **kw)

    def earn(self) -> None:
        for start in range(0, len(self.ids), GROUP_OPS):
            outcomes = self.group([self.op("e", L.OP_PURCHASE, cid, 10**9)
                                   for cid in self.ids[start:start + GROUP_OPS]])
            assert all(o.reason == L.R_OK for o in outcomes)

    def coupons(self, cards: list[bytes]) -> list[int]:
        """A "fresh 10 % off" coupon bought with points for each of ``cards``: the serials."""
        serials = []
        for start in range(0, len(cards), GROUP_OPS):
            outcomes = self.group([self.op("c", L.OP_COUPON_ISSUE, cid, 0, ref_id=FRESH_10_OFF,
                                           redeem_points=COUPON_POINTS)
                                   for cid in cards[start:start + GROUP_OPS]])
            assert all(o.reason == L.R_OK for o in outcomes)
            serials.extend(int.from_bytes(o.entry[8:16], "little") for o in outcomes)  # seq
        return serials

    def baskets(self, cards: list[bytes], serials: list[int]) -> list[PendingOp]:
        r, ops = self.rng, []
        for cid, serial in zip(cards, serials):
            lines = [L.LINE.pack(c, 0, 1, r.randrange(100, 5_000), 0, 0, 0,
                                 f"SKU-{r.randrange(10**6)}".encode())
                     for c in (FRESH, GROCERY, FRESH, GROCERY, TOBACCO)]
            gross = sum(L.LINE.unpack(x)[3] for x in lines)
            ops.append(self.op("b", L.OP_PURCHASE, cid, gross, lines=b"".join(lines),
                               redeem_points=500, ref_id=serial,
                               store_id=r.randrange(1, 200), terminal_id=r.randrange(1, 5000)))
        return ops

    def plain(self, cards: list[bytes]) -> list[PendingOp]:
        r = self.rng
        return [self.op("p", L.OP_PURCHASE, cid, r.randrange(500, 25_000),
                        store_id=r.randrange(1, 200), terminal_id=r.randrange(1, 5000))
                for cid in cards]

    def spans(self, ops: list[PendingOp], side: str, groups: dict, profiler=None,
              marks: bool = False) -> dict[str, tuple[float, float]]:
        """Apply ``ops`` in spans (one write transaction each, committed with sync), the spans
        taking turns among ``groups`` (name -> a ledger module's ``_Group``: this tree's, a
        revision's); per name, (apply CPU µs, commit CPU µs) per operation."""
        env, ledger = self.ledger.env, self.ledger
        took = {name: [0.0, 0.0, 0] for name in groups}
        per_span = GROUP_OPS * GROUPS_PER_SPAN
        names = list(groups)
        for k, start in enumerate(range(0, len(ops), per_span)):
            name = names[k % len(names)]
            t0 = time.process_time()
            txn = env.begin(write=True)
            if profiler:
                profiler.enable()
            for g in range(start, min(start + per_span, len(ops)), GROUP_OPS):
                self.ts += 1000
                group = groups[name](ledger, ops[g:g + GROUP_OPS], self.ts)
                outcomes = group.apply(txn)
                group.adopt()
                assert all(o.reason == L.R_OK for o in outcomes), {o.reason for o in outcomes}
            t1 = time.process_time()
            if marks:  # for strace: what LMDB writes between two marks is this commit's
                os.write(2, f"commit {side}\n".encode())
            txn.commit()
            if marks:
                os.write(2, b"committed\n")
            if profiler:
                profiler.disable()
            t2 = time.process_time()
            t = took[name]
            t[0], t[1] = t[0] + t1 - t0, t[1] + t2 - t1
            t[2] += min(per_span, len(ops) - start)
        return {name: (a * 1e6 / n, c * 1e6 / n) for name, (a, c, n) in took.items() if n}


def base_group(rev: str):
    """Revision ``rev``'s core/ledger.py (or the file ``rev`` names) loaded beside this
    tree's: its ``_Group``."""
    return base_module(rev, "core/ledger.py")._Group


def print_stat(ledger: Ledger) -> None:
    """Each sub-database's records and pages (the ones a random write can dirty)."""
    from cardcore.ledger import DB_NAMES
    with ledger.env.begin() as txn:
        for name in DB_NAMES:
            db = getattr(ledger, name)
            if db is None:
                continue
            st = txn.stat(db)
            if st["entries"]:
                print(f"  {name:20s} {st['entries']:9,} records  {st['leaf_pages']:7,} leaf "
                      f"{st['branch_pages']:5,} branch {st['overflow_pages']:5,} overflow pages, "
                      f"depth {st['depth']}")


# LMDB writes a lone dirty page with pwrite, a run of adjacent ones with lseek and writev; the
# meta page through its own descriptor (counted too: one a commit); fds 1 and 2 are not LMDB's
WRITE_RE = re.compile(r"^\d+\s+(?:pwrite64|pwritev|writev)\((?![12],)\d+,.*= (\d+)$")


def pages_written(argv: list[str]) -> int:
    """This benchmark again under strace with ``--marks``: the 4 KiB pages each commit wrote,
    per operation and side (every pwrite and pwritev between a commit's two marks)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.txt")
        subprocess.run(["strace", "-f", "-e", "trace=pwrite64,pwritev,writev,write", "-o", trace,
                        sys.executable, os.path.abspath(__file__), *argv, "--marks"],
                       check=True, stderr=subprocess.DEVNULL)  # (the marks: traced, not shown)
        pages: dict[str, list[int]] = {}
        side, wrote = None, 0
        with open(trace) as f:
            for row in f:
                if 'write(2, "commit ' in row:
                    side, wrote = row.split('"commit ', 1)[1].split("\\n", 1)[0], 0
                elif 'write(2, "committed' in row:
                    pages.setdefault(side, []).append(wrote)
                    side = None
                elif side and (m := WRITE_RE.match(row)):
                    wrote += int(m.group(1))
    per_span = GROUP_OPS * GROUPS_PER_SPAN
    for side, spans in pages.items():
        print(f"{side:9s} {statistics.mean(spans) / 4096 / per_span:.2f} pages written an "
              f"operation ({len(spans)} commits of {per_span:,}: "
              f"{', '.join(str(w // 4096) for w in spans)} pages)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--coupons-held", type=int, default=12, help="bought before (a card)")
    ap.add_argument("--profile", choices=("basket", "plain"))
    ap.add_argument("--base", action="append", default=[],
                    help="a git revision whose core/ledger.py (or a file) to time too, span by "
                    "span in turn with this tree's (same ledger, same operations' kind); again "
                    "for more")
    ap.add_argument("--stat", action="store_true", help="each sub-database's pages at the end")
    ap.add_argument("--no-aggregates", action="store_true",
                    help="keep no day totals and no member metrics")
    ap.add_argument("--marks", action="store_true",
                    help="a line on stderr around each commit, for strace to count its writes")
    ap.add_argument("--pages", action="store_true",
                    help="run again under strace (installed) and count the pages commits write")
    args = ap.parse_args()
    if args.pages:
        return pages_written([a for a in sys.argv[1:] if a != "--pages"])
    rng, ids, key = aggregates_writer.cards_and_keys(args.cards)
    with open(PROGRAM, encoding="utf-8") as f:
        program = f.read()
    groups = {"this tree": _Group}
    for rev in args.base:
        groups[os.path.basename(rev)] = base_group(rev)
    rows: dict[tuple[str, str], list[tuple]] = {}
    profiler = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(os.path.join(tmp, "ledger"), initial_program=program, sync=True,
                        day_totals=not args.no_aggregates,
                        member_metrics_kept=not args.no_aggregates)
        try:
            ts = aggregates_writer.seed([ledger], ids, key, time.time_ns() // 1000)
            run = Run(ledger, ids, rng, key, ts)
            run.earn()
            # the coupons bench/programs.py's cards hold by its last round (a round buys 120,000:
            # what 30,000/s would use), used ones among them: the sub-database a basket writes in
            held = [c for c in ids for _ in range(args.coupons_held)]
            rng.shuffle(held)
            run.coupons(held)
            n = GROUP_OPS * GROUPS_PER_SPAN * SPANS * len(groups)
            for r in range(args.rounds):
                for side in SIDES[::1 if r % 2 == 0 else -1]:
                    cards = [rng.choice(ids) for _ in range(n)]
                    ops = (run.baskets(cards, run.coupons(cards)) if side == "basket"
                           else run.baskets(cards, [0] * n) if side == "no coupon"
                           else run.plain(cards))
                    last = profiler if side == args.profile and r == args.rounds - 1 else None
                    order = groups if r % 2 == 0 else dict(reversed(groups.items()))
                    for name, got in run.spans(ops, side, order, last, args.marks).items():
                        rows.setdefault((side, name), []).append(got)
            if args.stat:
                print_stat(ledger)
        finally:
            ledger.close()
    for (side, name), got in sorted(rows.items()):
        a, c = (statistics.median(x[i] for x in got) for i in range(2))
        print(f"{side:9s} {name:10s} apply {a:5.1f} µs (min {min(x[0] for x in got):5.1f})  "
              f"commit {c:5.1f} µs (min {min(x[1] for x in got):5.1f}) an operation, medians "
              f"of {len(got)} rounds")
    for name in groups:
        for side in SIDES[1:]:
            ratio = statistics.median((p[0] + p[1]) / (b[0] + b[1]) for p, b in
                                      zip(rows["plain", name], rows[side, name]))
            print(f"{name}: plain / {side} writer CPU (apply + commit) {ratio:.2f}x (median of "
                  "the rounds)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
