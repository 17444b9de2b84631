"""Kernel vs pure-Python reference: one group of 1,000 PIN-verified purchases over 1,000 card records.

Run with ``make bench`` (pytest-benchmark); ops/s = 1,000 / mean time; the ratio
is printed by bench/e2e.py from the JSON this writes.
"""
from __future__ import annotations

import random
from array import array

import pytest

from cardcore import layout as L
from cardcore import reference, rules
from cardcore.ext import kernel

GROUP_OPS = 1_000
SLOTS = 1_000


def _inputs():
    rng = random.Random(7)
    program = rules.DEFAULT_PROGRAM.packed()
    pin = bytes(range(32))  # every card has a PIN; every purchase presents the right one
    records = b"".join(L.CARD.pack(1, 1, rng.randrange(3), 0, L.CARD_PIN_SET, 10**9, 10**6, 0, 0, 0,
                                   1, 0, 0, 0, pin, bytes(24)) for _ in range(SLOTS))
    slots = array("I", [rng.randrange(SLOTS) for _ in range(GROUP_OPS)])
    ops = b"".join(L.OP.pack(L.OP_PURCHASE, 0, L.PIN_PRESENTED | L.PIN_REQUIRED, 0, 0,
                             rng.randrange(1, 100_000), 1, 2, 3, 0, i.to_bytes(8, "little"),
                             bytes(16), bytes(8), pin, bytes(32)) for i in range(GROUP_OPS))
    return program, ops, slots, records


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_apply_1000_purchases(benchmark, impl):
    program, ops, slots, records = _inputs()
    benchmark.extra_info["ops_per_round"] = GROUP_OPS

    def one_group():
        recs = bytearray(records)
        impl(program, ops, slots, recs, bytearray(GROUP_OPS * L.JOURNAL_SIZE), bytearray(SLOTS), 1, 1)

    benchmark(one_group)
