"""The benchmarks' inputs still match the layouts (they are not run by make test otherwise)."""
import os
import sys
from array import array

from cardcore import layout as L
from cardcore.ext import kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_kernel  # noqa: E402


def test_kernel_benchmark_purchases_all_apply():
    program, ops, slots, records = bench_kernel._inputs()
    n = len(ops) // L.OP_SIZE
    journal = bytearray(n * L.JOURNAL_SIZE)
    nxt = kernel.apply_batch(program, ops, bytearray(), array("I", slots), bytearray(records),
                             bytearray(len(records)), array("I", [L.SLOT_NONE] * n), bytearray(),
                             journal, bytearray(len(records) // L.CARD_SIZE), bytearray(), 0, 1)
    assert nxt == n + 1  # every purchase applied: the benchmark measures the real path


def test_kernel_benchmark_baskets_all_apply_redeem_and_use_their_coupon():
    program, ops, lines, slots, records, coupons = bench_kernel._basket_inputs()
    n = len(ops) // L.OP_SIZE
    journal, used = bytearray(n * L.JOURNAL_SIZE), bytearray(n)
    nxt = kernel.apply_batch(program, ops, bytearray(lines), array("I", slots), bytearray(records),
                             bytearray(len(records)), array("I", range(n)), bytearray(coupons),
                             journal, bytearray(len(records) // L.CARD_SIZE), used, 1, 1)
    assert nxt == n + 1
    # every one redeemed points and its coupon took something off: the full path is measured
    assert all(L.JOURNAL_PROGRAM.unpack_from(journal, k * L.JOURNAL_SIZE + L.JOURNAL_OFF_PROGRAM)[0]
               and L.JOURNAL_COUPON_OFF.unpack_from(journal, k * L.JOURNAL_SIZE
                                                    + L.JOURNAL_OFF_COUPON)[0]
               for k in range(n))
    assert all(used)  # each coupon marked used


def test_writer_benchmark_baskets_use_their_coupon_and_redeem(tmp_path):
    """bench/basket_writer.py's sides measure what they say: a basket's coupon (bought just
    before) takes something off and is used, every basket redeems points, a plain purchase
    has no lines."""
    import aggregates_writer
    import basket_writer
    from cardcore.ledger import Ledger

    rng, ids, key = aggregates_writer.cards_and_keys(20)
    with open(basket_writer.PROGRAM, encoding="utf-8") as f:
        ledger = Ledger(str(tmp_path / "ledger"), initial_program=f.read(), sync=False)
    try:
        run = basket_writer.Run(ledger, ids, rng, key,
                                aggregates_writer.seed([ledger], ids, key, 1_796_000_000_000_000))
        run.earn()
        cards = ids[:10] + ids[:5]  # a card twice: its second basket uses its second coupon
        baskets = run.baskets(cards, run.coupons(cards))
        bare = run.baskets(cards, [0] * len(cards))
        plain = run.plain(cards)
        outcomes = run.group(baskets + bare + plain)
    finally:
        ledger.close()
    assert [o.reason for o in outcomes] == [L.R_OK] * len(outcomes)
    n = len(cards)
    off = [L.JOURNAL_COUPON_OFF.unpack_from(o.entry, L.JOURNAL_OFF_COUPON)[0] for o in outcomes]
    redeemed = [L.JOURNAL_PROGRAM.unpack_from(o.entry, L.JOURNAL_OFF_PROGRAM)[1] for o in outcomes]
    assert all(x > 0 for x in off[:n]) and not any(off[n:])
    assert all(r > 0 for r in redeemed[:2 * n]) and not any(redeemed[2 * n:])
    assert all(o.lines for o in outcomes[:2 * n]) and not any(o.lines for o in outcomes[2 * n:])
