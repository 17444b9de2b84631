"""Routing cards to card shards (``cardcore.shards``) and reports merged over card shards
(``daytotals.merge_reports``), in-process on real ledgers in temp folders: a chain split over two
card shards reports what one ledger holding everything reports."""
from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cardcore import daytotals, members
from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.shards import (SLOTS, RoutesInvalid, basket_elsewhere, card_shards_of,
                             decode_routes, encode_routes, slot_of, spread)
from conftest import examples
from test_ledger import NOW, add_operator, cid, op, open_op


def test_a_slot_is_the_ids_first_two_bytes_mod_4096_and_a_new_table_spreads_them():
    assert slot_of(bytes([0x00, 0x05]) + bytes(14)) == 5
    assert slot_of(bytes([0x10, 0x00]) + bytes(14)) == 0       # 4096 mod 4096
    assert slot_of(bytes([0xFF, 0xFF]) + bytes(14)) == 4095
    table = spread([2, 5, 7])
    assert len(table) == SLOTS and table[:4] == [2, 5, 7, 2]
    assert [table.count(s) for s in (2, 5, 7)] == [1366, 1365, 1365]
    assert decode_routes(encode_routes(table)) == table
    assert card_shards_of(table) == [2, 5, 7]


@pytest.mark.parametrize("stored", [b"", b"{}", b'{"slots": 4096, "shards": [1]}',
                                    b'{"slots": 8, "shards": [1, 1, 1, 1, 1, 1, 1, 1]}',
                                    encode_routes(spread([1])).replace(b"1", b"-1", 1),
                                    encode_routes(spread([1])).replace(b",1", b",true", 1)])
def test_a_stored_table_that_is_not_one_is_refused(stored):
    with pytest.raises(RoutesInvalid):
        decode_routes(stored)


# (card, kind, amount, staff) steps; cards 0..5, each on the shard its id's slot is routed to;
# kind 0: an admin entry; BASKET: a split-tender basket, card pays what it can of amount, the card
# three on pays half of it
BASKET = -1
STEP = st.tuples(st.integers(0, 5), st.sampled_from([L.OP_TOP_UP, L.OP_PURCHASE, 0, BASKET]),
                 st.integers(1, 50_000), st.integers(0, 3))
TABLE = spread([1, 2])


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=40))
def test_reports_merged_over_two_card_shards_are_the_one_ledgers(tmp_path_factory, steps):
    """The same groups (each at the same time) on one ledger, and split by card over two card
    shards that each also apply every admin entry (as relayed: an operator added now and then):
    the chain's, a store's and the by-store report with staff, a store's day and the member
    report with its dormant members page by page, merged, are the one ledger's, entries
    included (an admin entry counted once; a split-tender basket paid on both shards counted
    once, its later payment marked as a front marks it: BASKET_ELSEWHERE once one was made on
    the other shard); each shard verifies clean."""
    folder = tmp_path_factory.mktemp("shards")
    whole = Ledger(os.path.join(folder, "whole"))
    shards = {s: Ledger(os.path.join(folder, f"s{s}")) for s in (1, 2)}
    numbers = [f"62258800000{k:05d}" for k in range(6)]
    try:
        at, n = NOW, itertools.count()
        for k, number in enumerate(numbers):
            at += 1
            opened = open_op(f"o{k}", number, at=at)
            assert whole.apply_group([opened], at)[0].reason == L.R_OK
            shard = TABLE[slot_of(cid(number))]
            assert shards[shard].apply_group([opened], at)[0].reason == L.R_OK
        prelude = [(card, kind, amount, 0) for _ in range(3) for card in (0, 1, 5)  # (both
                   for kind, amount in ((L.OP_TOP_UP, 1_000), (L.OP_PURCHASE, 100))]  # shards)
        for card, kind, amount, staff in prelude + steps:  # (3 purchases each at first: every
            at += 1  # member is dormant 61 days on; times a µs apart, as the ledger's clock
            #          moves at most an hour a group)
            if kind == BASKET:  # two payments, each its own group on the whole and its shard
                tag, made_on = next(n) + 1, None
                for number, gross in ((numbers[card], amount),
                                      (numbers[(card + 3) % 6], amount // 2 + 1)):
                    pay = op(f"s{next(n)}", L.OP_PURCHASE, number, gross, at=at, staff_id=staff,
                             basket_tag=tag, op_flags=L.ALLOW_PARTIAL)
                    shard = TABLE[slot_of(cid(number))]
                    sent = basket_elsewhere(pay) if made_on not in (None, shard) else pay
                    got = whole.apply_group([pay], at)[0].reason
                    assert shards[shard].apply_group([sent], at)[0].reason == got
                    if got == L.R_OK and made_on is None:
                        made_on = shard
                    at += 1
                continue
            if kind == 0:  # an admin entry, which every card shard holds
                k = next(n)
                admin = add_operator(f"a{k}", f"op-{k}", 1, at=at)
                got = [ledger.apply_group([admin], at)[0].reason
                       for ledger in (whole, *shards.values())]
                assert got == [L.R_OK] * 3
                continue
            step = op(f"s{next(n)}", kind, numbers[card], amount, at=at, staff_id=staff)
            shard = TABLE[slot_of(cid(numbers[card]))]
            assert (whole.apply_group([step], at)[0].reason
                    == shards[shard].apply_group([step], at)[0].reason)
        day, last = NOW // L.DAY_US, at // L.DAY_US + 1
        for read, args in (("read_report", (None, day - 1, last, daytotals.GRANULARITY_DAY,
                                            True)),
                           ("read_report", (3, day - 1, last, daytotals.GRANULARITY_DAY,
                                            True)),
                           ("read_by_store", (day - 1, last, lambda s: True, "chain",
                                              daytotals.GRANULARITY_DAY, True))):
            merged = daytotals.merge_reports([getattr(ledger, read)(*args)
                                              for ledger in shards.values()])
            assert merged == getattr(whole, read)(*args), read
        for d in range(day - 1, last + 1):  # a store's day, as CloseDay answers it
            assert daytotals.merge_days([ledger.read_day(3, d) for ledger in shards.values()],
                                        None) == whole.read_day(3, d)
        # the member figures, and the dormant members page by page (as of a day past their
        # quiet days), two at a time
        month = members.month_of_day(last)
        as_of = last + members.DORMANT_QUIET_DAYS + 1
        after = b""
        while True:
            reads = [ledger.read_members(month - 1, month, as_of, 2, after)
                     for ledger in shards.values()]
            merged = members.merge_reads(reads, 2)
            assert merged == whole.read_members(month - 1, month, as_of, 2, after)
            after = merged[1]["next"]
            if not after:
                break
        for ledger in shards.values():
            report = ledger.verify()
            assert report["ok"], report["problems"]
    finally:
        for ledger in (whole, *shards.values()):
            ledger.close()
