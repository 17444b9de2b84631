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
NO_COUPONS = array("I", [L.SLOT_NONE] * GROUP_OPS)


def _inputs():
    rng = random.Random(7)
    program = rules.DEFAULT_PROGRAM.packed(1)
    pin = bytes(range(32))  # every card has a PIN; every purchase presents the right one
    records = b"".join(L.CARD.pack(1, 1, rng.randrange(3), 0, L.CARD_PIN_SET, 10**9, 10**6, 0, 0, 0,
                                   1, 0, 0, 0, pin, bytes(24)) for _ in range(SLOTS))
    slots = array("I", [rng.randrange(SLOTS) for _ in range(GROUP_OPS)])
    ops = b"".join(L.OP.pack(L.OP_PURCHASE, 0, L.PIN_PRESENTED | L.PIN_REQUIRED, L.CALLER_TERMINAL,
                             0, rng.randrange(1, 100_000), 1, 2, 3, 0, i.to_bytes(8, "little"),
                             bytes(16), 1_700_000_000_000_000, pin, bytes(32), 2, 0, 0, 0, 0,
                             0, bytes(6), 0, bytes(16)) for i in range(GROUP_OPS))
    return program, ops, slots, records


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_apply_1000_purchases(benchmark, impl):
    program, ops, slots, records = _inputs()
    benchmark.extra_info["ops_per_round"] = GROUP_OPS

    def one_group():
        recs = bytearray(records)
        impl(program, ops, bytearray(), slots, recs, bytearray(len(recs)), NO_COUPONS, bytearray(),
             bytearray(GROUP_OPS * L.JOURNAL_SIZE), bytearray(SLOTS), bytearray(), 1, 1)

    benchmark(one_group)


def test_host_swipe_crypto_1000(benchmark):
    """What the server does per PIN-verified swipe before the writer, in a tight loop: the DUKPT
    working keys (the terminal's key path kept), the card data, the PIN block, the keyed card id
    and PIN check. Inside the busy server the same work costs about twice as much."""
    from cardcore import cards, dukpt, pin
    from cardcore.dukpt import KeyUsage, Ksn
    from cardcore.carddata import decrypt_card_data
    from cardcore.terminal import Terminal, TerminalKeys

    bdk, ikid, number = bytes(range(16)), bytes(range(8)), "6225880000001231"
    terminal = Terminal(TerminalKeys(1, 1, dukpt.initial_key(bdk, ikid), ikid))
    swipes = [terminal.purchase(f"r{i}", number, "482916", 100) for i in range(GROUP_OPS)]
    index, checker = cards.CardIndex(bytes(32)), pin.PinChecker(bytes(32))
    benchmark.extra_info["ops_per_round"] = GROUP_OPS

    def host():
        path = dukpt.KeyPath(dukpt.initial_key(bdk, ikid), ikid)
        for req in swipes:
            secure = req.card.secure
            ksn = Ksn.parse(secure.ksn)
            data_key, pin_key = path.working_keys(ksn.counter, KeyUsage.DATA_ENCRYPTION,
                                                  KeyUsage.PIN_ENCRYPTION)
            card = decrypt_card_data(data_key, secure.ksn, secure.encrypted_card)
            checker.check(index.card_id(card), pin.decipher(pin_key, req.pin_block, card))

    benchmark(host)


def _basket_inputs():
    """1,000 purchases of 5 lines (3 categories, tobacco among them) with a coupon ("fresh 10 %
    off", one issued to each purchase) offering 500 points, under the supermarket example
    program, over 1,000 cards holding points: the full purchase of the card programs issue."""
    import os

    from cardcore.program import parse_program

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "examples", "programs", "supermarket.toml")) as f:
        program = parse_program(f.read()).packed(1)
    rng = random.Random(8)
    pin = bytes(range(32))
    records = b"".join(L.CARD.pack(1, 1, rng.randrange(3), 0, L.CARD_PIN_SET, 10**9, 10**6, 10**6,
                                   0, 0, 1, 0, 0, 0, pin, bytes(24)) for _ in range(SLOTS))
    slots = array("I", [rng.randrange(SLOTS) for _ in range(GROUP_OPS)])
    ops, lines = [], []
    coupons = b"".join(L.COUPON.pack(L.COUPON_VERSION, L.COUPON_ISSUED, 2, 0, 0, L.INT64_MAX,
                                     i + 1, 0, 0, bytes(16)) for i in range(GROUP_OPS))
    for i in range(GROUP_OPS):
        mine = [L.LINE.pack(c, 0, 1, rng.randrange(100, 5_000), 0, 0, 0, b"SKU")
                for c in (1, 2, 1, 2, 3)]
        lines.extend(mine)
        ops.append(L.OP.pack(L.OP_PURCHASE, 0, L.PIN_PRESENTED | L.PIN_REQUIRED, L.CALLER_TERMINAL,
                             0, sum(L.LINE.unpack(x)[3] for x in mine), 1, 2, 3, 0,
                             i.to_bytes(8, "little"), bytes(16), 1_700_000_000_000_000, pin,
                             bytes(32), 2, 0, 0, i + 1, 0, 5, bytes(6), 500, bytes(16)))
    return program, b"".join(ops), b"".join(lines), slots, records, coupons


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch],
                         ids=["kernel-5-lines", "reference-5-lines"])
def test_apply_1000_basket_purchases(benchmark, impl):
    program, ops, lines, slots, records, coupons = _basket_inputs()
    benchmark.extra_info["ops_per_round"] = GROUP_OPS
    coupon_slots = array("I", range(GROUP_OPS))

    def one_group():
        recs = bytearray(records)
        impl(program, ops, bytearray(lines), slots, recs, bytearray(len(recs)), coupon_slots,
             bytearray(coupons), bytearray(GROUP_OPS * L.JOURNAL_SIZE), bytearray(SLOTS),
             bytearray(GROUP_OPS), 1, 1)

    benchmark(one_group)
