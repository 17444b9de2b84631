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
