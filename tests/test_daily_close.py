"""The daily close and reports (issue 11), against the real server on loopback: the figures of a
closed day never change, a late operation lands in the next open day, the closes of every store
add up to the journal (replayed here, independently of cardcore.daytotals), the clearing table
nets to zero and follows the home-of-the-money rule, a report over a range is the sum of its
days, and the liability at a past date is the journal replayed to it."""
from __future__ import annotations

import csv
import io
import os
import random
import time

import grpc
import lmdb
import pytest

from cardcore import daytotals
from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.program import DEFAULT_PROGRAM_TOML
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, ServerProcess, bearer, failure_of, journal_entries, new_card_number,
                      operator_cli, rid, sent_at, verify)
from cardcore.verify import verify as verify_ledger
from test_holds import authorize, capture, void
from test_ledger import op, open_op

ROLE = cpb.OperatorRole
DAY_US = 86_400_000_000
STORES = (1, 2, 3)
# layout.JOURNAL, unpacked: the fields the replay reads
J_OP, J_SEQ, J_CARD, J_AMOUNT, J_DISCOUNT, J_DP, J_DB, J_DPTS = 1, 7, 8, 9, 10, 11, 12, 13
J_P_AFTER, J_TS, J_STORE, J_STAFF, J_VERSION = 14, 17, 18, 20, 23
J_LINK = 28


def day_of(ts_us: int, offset_min: int = 480, cutoff_h: int = 4) -> int:
    """The business day, written out here again (not imported): the tests' own reading of it."""
    return (ts_us + offset_min * 60_000_000 - cutoff_h * 3_600_000_000) // DAY_US


def date_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def till(store: int, staff: int = 0) -> cpb.Till:
    return cpb.Till(store_id=store, terminal_id=store, staff_id=staff)


def open_card(stub, store: int) -> str:
    number = new_card_number()
    request_id = rid()
    stub.OpenCard(pb.OpenCardRequest(request_id=request_id, client_time_us=sent_at(request_id),
                                     card=cpb.CardRef(card_number=number),
                                     profile=pb.MemberProfile(), till=till(store)))
    return number


def top_up(stub, number: str, amount: int, store: int, staff: int = 0, request_id=None):
    request_id = request_id or rid()
    return stub.TopUp(pb.TopUpRequest(request_id=request_id, client_time_us=sent_at(request_id),
                                      card=cpb.CardRef(card_number=number), amount_minor=amount,
                                      till=till(store, staff)))


def purchase(stub, number: str, gross: int, store: int, staff: int = 0, request_id=None):
    request_id = request_id or rid()
    return stub.Purchase(pb.PurchaseRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), gross_amount_minor=gross, till=till(store, staff)))


def close(admin: Admin, store: int, day: int, request_id=None, metadata=None):
    request_id = request_id or rid()
    return admin.stub.CloseDay(apb.CloseDayRequest(
        request_id=request_id, client_time_us=sent_at(request_id), store_id=store,
        business_day=date_text(day)), metadata=metadata or admin.metadata)


def report(admin: Admin, first: int, last: int, store: int | None = None, by: int = 1,
           staff: bool = False, metadata=None):
    return admin.stub.GetReport(apb.GetReportRequest(
        store_id=store or 0, chain=store is None, from_day=date_text(first),
        to_day=date_text(last), granularity=by, staff=staff), metadata=metadata or admin.metadata)


def ops_of(figures) -> dict[int, tuple[int, int]]:
    return {o.operation_type: (o.count, o.amount_minor) for o in figures.operations}


def replayed(entries, day_of_entry) -> dict[tuple[int, int], dict]:
    """Per (store, business day): what the journal entries moved, added up here."""
    out: dict[tuple[int, int], dict] = {}
    for e in entries:
        s = out.setdefault((e[J_STORE], day_of_entry(e)), {
            "entries": 0, "ops": {}, "p_in": 0, "p_out": 0, "b_in": 0, "b_out": 0, "gross": 0,
            "discount": 0, "pts_in": 0, "pts_out": 0})
        s["entries"] += 1
        count, amount = s["ops"].get(e[J_OP], (0, 0))
        s["ops"][e[J_OP]] = (count + 1, amount + e[J_AMOUNT])
        s["p_in"] += max(e[J_DP], 0)
        s["p_out"] += max(-e[J_DP], 0)
        s["b_in"] += max(e[J_DB], 0)
        s["b_out"] += max(-e[J_DB], 0)
        s["pts_in"] += max(e[J_DPTS], 0)
        s["pts_out"] += max(-e[J_DPTS], 0)
        if e[J_OP] == L.OP_PURCHASE:
            s["gross"] += e[J_AMOUNT]
            s["discount"] += e[J_DISCOUNT]
    return out


def as_replayed(f) -> dict:
    return {"entries": f.entries, "ops": ops_of(f), "p_in": f.principal_in_minor,
            "p_out": f.principal_out_minor, "b_in": f.bonus_in_minor, "b_out": f.bonus_out_minor,
            "gross": f.sales_gross_minor, "discount": f.discount_minor, "pts_in": f.points_in,
            "pts_out": f.points_out}


def clearing_model(entries) -> dict[tuple[int, int], int]:
    """The clearing rule, written out here again: (debtor, creditor) -> what it owes, net."""
    home: dict[bytes, int] = {}
    owed: dict[tuple[int, int], int] = {}
    moving = 0

    def clear(debtor, creditor, amount):
        owed[(debtor, creditor)] = owed.get((debtor, creditor), 0) + amount
        owed[(creditor, debtor)] = owed.get((creditor, debtor), 0) - amount

    for e in entries:
        op, card, dp, store = e[J_OP], e[J_CARD], e[J_DP], e[J_STORE]
        if op == L.OP_CARD_REPLACED:
            moving = home.get(card, 0)
        elif op == L.OP_REPLACEMENT_OPENED:
            home[card] = moving
        elif op == L.OP_TOP_UP and dp > 0:
            before = e[J_P_AFTER] - dp
            if home.get(card, 0) != store and before:
                clear(home.get(card, 0), store, before)
            home[card] = store
        elif dp and home.get(card, 0) != store:
            clear(home.get(card, 0), store, -dp)
    return {k: v for k, v in owed.items() if v}


@pytest.fixture
def chain(server):
    """(card stub, chain admin)"""
    return server.stub, Admin(server.channel, server.admin_token)


def today_of(result) -> int:
    return day_of(result.applied_at_us)


def test_the_liability_counts_money_taken_after_an_early_close_on_its_own_day(server, chain):
    """Store 2 closes today early; a top-up there after the close lands in tomorrow's figures,
    but the chain owed it to the member from today: the liability at the end of today holds it."""
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 5_000, 1))
    request_id = rid()  # a store with no entry yet closes once it is registered
    admin.stub.PutStore(apb.PutStoreRequest(request_id=request_id, store_id=2, name="Two",
                                            client_time_us=sent_at(request_id)),
                        metadata=admin.metadata)
    close(admin, 2, today)
    late = top_up(stub, number, 7_000, 2)
    assert day_of(late.applied_at_us) == today
    rows = report(admin, today, today + 1).rows
    stores = report(admin, today, today + 1, store=2).rows
    assert [ops_of(r.figures).get(L.OP_TOP_UP) for r in stores] == [None, (1, 7_000)]
    assert [r.liability_principal_minor for r in rows] == [12_000, 12_000]
    assert [r.figures.principal_in_minor for r in rows] == [5_000, 7_000]  # where they landed
    # a report that starts tomorrow carries today's liability in from before its range
    assert report(admin, today + 1, today + 1).rows[0].liability_principal_minor == 12_000
    # records kept before these figures existed (meta 1: no own-day figures) are filled again
    server.stop()
    env = lmdb.open(os.path.join(server.data_dir, "ledger"), max_dbs=64)
    with env.begin(write=True) as txn:
        chain_db = env.open_db(b"day_chain", txn=txn)
        for key, value in list(txn.cursor(db=chain_db)):
            old = bytearray(value)
            L.DAY_TOTALS.pack_into(old, 0, *(L.DAY_TOTALS.unpack(value)[:1 + daytotals.F_OWN_P]
                                             + (0, 0) + L.DAY_TOTALS.unpack(value)[
                                                 1 + daytotals.F_OWN_B + 1:]))
            txn.put(key, bytes(old), db=chain_db)
        txn.put(b"day_totals", b"\x01", db=env.open_db(b"meta", txn=txn))
    env.close()
    again = ServerProcess(server.data_dir)
    try:
        refilled_rows = report(Admin(again.channel, again.admin_token), today, today + 1).rows
        assert [r.liability_principal_minor for r in refilled_rows] == [12_000, 12_000]
        assert "day totals filled from" in again.log()
    finally:
        again.stop()


def test_holds_outstanding_belong_to_the_store_that_placed_them(server, chain):
    """Holds placed at stores 1, 2 and 3, then captured, reversed and (after store 1 closed
    its day) voided: each store's close and report carry what its holds still hold, landed as
    its figures are; the chain's rows, by own business day, what all of them hold; both equal
    the journal replayed here."""
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 90_000, 1))
    a = stub.Authorize(authorize(number, 6_000, store_id=1))
    b_request = authorize(number, 2_500, store_id=2)
    stub.Authorize(b_request)
    c = stub.Authorize(authorize(number, 4_000, store_id=1))
    stub.Authorize(authorize(number, 1_000, store_id=3))
    stub.Capture(capture(number, a.seq, 4_500, store_id=1))  # pays 4,500: the 6,000 released
    undo_id = rid()
    stub.Reverse(pb.ReverseRequest(
        request_id=undo_id, client_time_us=sent_at(undo_id), card=cpb.CardRef(card_number=number),
        original_request_id=b_request.request_id, till=till(2)))
    closed = close(admin, 1, today)
    assert closed.holds_outstanding_minor == 4_000
    late = stub.VoidHold(void(number, c.seq, store_id=1))  # lands in store 1's next day
    assert day_of(late.applied_at_us) == today
    assert close(admin, 1, today).holds_outstanding_minor == 4_000  # the closed day stays
    by_store = {s: [r.holds_outstanding_minor for r in report(admin, today, today + 1,
                                                                store=s).rows]
                for s in STORES}
    assert by_store == {1: [4_000, 0], 2: [0, 0], 3: [1_000, 1_000]}
    assert [r.holds_outstanding_minor for r in report(admin, today, today + 1).rows] == \
        [1_000, 1_000]  # by own day: the void was today
    assert report(admin, today + 1, today + 1, store=3).rows[0].holds_outstanding_minor == 1_000
    entries = journal_entries(server.data_dir)  # the journal replayed: what each store's holds hold
    by_seq = {e[J_SEQ]: e for e in entries}
    held: dict[int, int] = {}
    for e in entries:
        link = by_seq.get(e[J_LINK])
        if e[J_OP] == L.OP_HOLD:
            held[e[J_STORE]] = held.get(e[J_STORE], 0) + e[J_AMOUNT]
        elif link is not None and link[J_OP] == L.OP_HOLD and e[J_OP] in (
                L.OP_PURCHASE, L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED, L.OP_REVERSAL):
            gone = link[J_AMOUNT] if e[J_OP] == L.OP_PURCHASE else e[J_AMOUNT]
            held[link[J_STORE]] -= gone
    assert {s: v for s, v in held.items() if v} == {3: 1_000}
    assert verify(server.data_dir)["ok"]


def test_closing_a_day_twice_gives_the_same_figures(server, chain):
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 50_000, 1))
    sale = purchase(stub, number, 12_345, 1, staff=7)
    request_id = rid()
    first = close(admin, 1, today, request_id)
    assert not first.closed_before and first.closed_seq > sale.seq
    assert first.business_day == date_text(today)
    assert first.figures.sales_gross_minor == 12_345
    assert first.figures.principal_in_minor == 50_000
    assert first.figures.principal_out_minor == 12_345 - sale.discount_minor
    assert first.figures.tender_principal_minor == sale.paid_minor
    assert ops_of(first.figures)[L.OP_PURCHASE] == (1, 12_345)
    assert first.figures.points_issued == sale.points_earned
    again = close(admin, 1, today)  # another request: closed before, the same figures
    assert again.closed_before and again.closed_seq == first.closed_seq
    assert again.figures == first.figures and again.clearing == first.clearing
    retry = close(admin, 1, today, request_id)  # the first request again: its own answer
    assert not retry.closed_before and retry.figures == first.figures
    closes = [e for e in journal_entries(server.data_dir) if e[J_OP] == L.OP_CLOSE_DAY]
    assert [e[J_SEQ] for e in closes] == [first.closed_seq, closes[1][J_SEQ]]  # both journaled
    assert {e[J_CARD][:8] for e in closes} == {(1).to_bytes(4, "little") + today.to_bytes(4, "little")}
    report_of = verify(server.data_dir)
    assert report_of["ok"], report_of["problems"]
    staff = report(admin, today, today, store=1, staff=True).staff
    assert [(s.staff_id, s.sales, s.sales_minor) for s in staff] == [
        (7, 1, 12_345 - sale.discount_minor)]


def test_a_late_operation_lands_in_the_next_open_day_with_its_own_time(server, chain):
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 90_000, 1))
    purchase(stub, number, 10_000, 2)
    closed = close(admin, 2, today)
    late = purchase(stub, number, 3_000, 2)  # store 2's day is closed: it lands in tomorrow
    assert day_of(late.applied_at_us) == today  # its own time, in the journal, is today's
    entry = next(e for e in journal_entries(server.data_dir) if e[J_SEQ] == late.seq)
    assert entry[J_TS] == late.applied_at_us
    assert close(admin, 2, today).figures == closed.figures  # the closed day did not move
    assert ops_of(closed.figures)[L.OP_PURCHASE] == (1, 10_000)
    days = report(admin, today, today + 1, store=2).rows
    assert [ops_of(r.figures).get(L.OP_PURCHASE) for r in days] == [(1, 10_000), (1, 3_000)]
    assert [r.days_closed for r in days] == [1, 0]
    # clearing: money topped up at store 1 spent at store 2; the late part in the day both have open
    assert [(c.counterparty_store_id, c.owes_minor) for c in closed.clearing] == [(1, -10_000)]
    store1 = report(admin, today, today + 1, store=1).rows
    assert [r.figures.clearing_owes_minor for r in store1] == [10_000, 3_000]
    assert [r.figures.clearing_owed_minor for r in days] == [10_000, 3_000]


def test_a_replacement_carries_the_home_of_the_money_and_a_refund_clears_back(server, chain):
    """Topped up at store 1, replaced at store 2 (the money moves card to card: no clearing),
    spent at store 3 with the new card (store 1 owes store 3), part refunded there (store 3
    owes some back); topped up again at store 3, which becomes the home and is owed what the
    card still held by store 1."""
    stub, admin = chain
    old, new = open_card(stub, 1), new_card_number()
    today = today_of(top_up(stub, old, 10_000, 1))
    request_id = rid()
    stub.ReplaceCard(pb.ReplaceCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=old), new_card=cpb.CardRef(card_number=new), till=till(2)),
        metadata=bearer(server.admin_token))
    sale = purchase(stub, new, 4_000, 3)
    request_id = rid()
    stub.Refund(pb.RefundRequest(request_id=request_id, client_time_us=sent_at(request_id),
                                 card=cpb.CardRef(card_number=new), original_seq=sale.seq,
                                 amount_minor=1_500, till=till(3)),
               metadata=admin.metadata)  # money back: an operator's
    top_up(stub, new, 500, 3)
    closes = {s: close(admin, s, today) for s in (1, 2, 3)}
    lines = {s: [(c.counterparty_store_id, c.owes_minor) for c in closes[s].clearing]
             for s in closes}
    held = 10_000 - 4_000 + 1_500  # what the card held when store 3 became its home
    assert lines == {1: [(3, 4_000 - 1_500 + held)], 2: [], 3: [(1, -(4_000 - 1_500 + held))]}
    replaced = closes[2].figures
    assert ops_of(replaced) == {L.OP_CARD_REPLACED: (1, 10_000),
                                L.OP_REPLACEMENT_OPENED: (1, 10_000)}
    assert replaced.principal_in_minor == replaced.principal_out_minor == 10_000
    assert closes[3].figures.refunds == 1 and closes[3].figures.principal_in_minor == 2_000
    assert verify(server.data_dir)["ok"]


def test_closes_of_every_store_equal_the_journal_after_a_randomised_day(server, chain):
    stub, admin = chain
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    cards: list[str] = []
    sales: list[tuple[str, int, int]] = []   # (card, seq, store)
    requests: list[tuple[str, str, int]] = []  # (card, request id, store) of top-ups and sales
    today = None
    for _ in range(160):
        kind = rng.random()
        store = rng.choice(STORES)
        try:
            if not cards or kind < 0.1:
                cards.append(open_card(stub, store))
            elif kind < 0.4:
                number, request_id = rng.choice(cards), rid()
                r = top_up(stub, number, rng.randrange(100, 80_000), store,
                           staff=rng.choice((0, 11, 12)), request_id=request_id)
                requests.append((number, request_id, store))
                today = today_of(r)
            elif kind < 0.8:
                number, request_id = rng.choice(cards), rid()
                r = purchase(stub, number, rng.randrange(100, 30_000), store,
                             staff=rng.choice((0, 11, 12)), request_id=request_id)
                sales.append((number, r.seq, store))
                requests.append((number, request_id, store))
            elif kind < 0.92 and sales:
                number, seq, _ = rng.choice(sales)
                request_id = rid()
                stub.Refund(pb.RefundRequest(
                    request_id=request_id, client_time_us=sent_at(request_id),
                    card=cpb.CardRef(card_number=number), original_seq=seq,
                    amount_minor=rng.choice((0, 100)), till=till(store)),
                    metadata=admin.metadata)  # money back: an operator's
            elif sales:
                number = rng.choice(sales)[0]
                original = next((q for q in requests if q[0] == number), None)
                if original is not None:
                    request_id = rid()
                    stub.Reverse(pb.ReverseRequest(
                        request_id=request_id, client_time_us=sent_at(request_id),
                        card=cpb.CardRef(card_number=number), original_request_id=original[1],
                        original_client_time_us=sent_at(original[1]), till=till(store)))
        except grpc.RpcError:
            pass  # insufficient funds, refunded already, reversed: declined, nothing moved
    assert today is not None
    entries = journal_entries(server.data_dir)
    stores = sorted({e[J_STORE] for e in entries} - {0}) + [0]
    closes = {s: close(admin, s, today) for s in stores}  # store 0 last: it holds the closes
    entries = journal_entries(server.data_dir)  # now with the closes
    assert {e[J_OP] for e in entries} >= {L.OP_TOP_UP, L.OP_PURCHASE, L.OP_CLOSE_DAY,
                                          L.OP_REFUND, L.OP_REVERSAL}
    assert all(day_of(e[J_TS]) == today for e in entries), "the test crossed a business day"
    expected = replayed(entries, lambda e: day_of(e[J_TS]))
    assert {s: as_replayed(c.figures) for s, c in closes.items()} == {
        s: expected[(s, today)] for s in stores}
    chain_day = report(admin, today, today).rows[0].figures
    assert chain_day.entries == len(entries)
    assert chain_day.principal_in_minor - chain_day.principal_out_minor == sum(
        e[J_DP] for e in entries)
    # the clearing table: nets to zero, each line is the other side's, and follows the rule
    assert sum(c.figures.clearing_owes_minor for c in closes.values()) == sum(
        c.figures.clearing_owed_minor for c in closes.values())
    table = {(s, line.counterparty_store_id): line.owes_minor
             for s, c in closes.items() for line in c.clearing}
    assert all(table[(b, a)] == -x for (a, b), x in table.items())
    assert table == clearing_model(entries)
    assert verify(server.data_dir)["ok"]
    assert chain_day.clearing_owes_minor == chain_day.clearing_owed_minor
    # staff: every sale and top-up credited to a staff id, as the journal has them
    staff = {s.staff_id: (s.sales, s.sales_minor, s.top_ups, s.top_up_minor)
             for s in report(admin, today, today, staff=True).staff}
    want: dict[int, list[int]] = {}
    for e in entries:
        if e[J_STAFF] and e[J_OP] in (L.OP_PURCHASE, L.OP_TOP_UP):
            w = want.setdefault(e[J_STAFF], [0, 0, 0, 0])
            if e[J_OP] == L.OP_PURCHASE:
                w[0] += 1
                w[1] += e[J_AMOUNT] - e[J_DISCOUNT]
            else:
                w[2] += 1
                w[3] += e[J_AMOUNT]
    assert staff == {k: tuple(v) for k, v in want.items()}
    # the C loop and the entry-by-entry reference fill the same records as the live writer did
    server.stop()
    ledger = Ledger(os.path.join(server.data_dir, "ledger"))
    try:
        live = day_records(ledger)
        assert live["day_totals"] and live["store_days"] and live["day_clearing"]
        assert refilled(ledger, native=True) == refilled(ledger, native=False) == live
        with ledger.env.begin(write=True) as txn:  # a tampered figure: verify finds it
            key, record = live["day_totals"][0]
            entries = int.from_bytes(record[8:16], "little") + 1
            txn.put(key, record[:8] + entries.to_bytes(8, "little") + record[16:],
                    db=ledger.day_totals)
    finally:
        ledger.close()
    report_of = verify(server.data_dir)
    assert not report_of["ok"] and report_of["problems"] == [
        "the day totals' day_totals are not what the journal's entries make"]


def day_records(ledger, txn=None) -> dict[str, list]:
    if txn is None:
        with ledger.env.begin() as txn:
            return day_records(ledger, txn)
    return {name: list(txn.cursor(db=getattr(ledger, name))) for name in daytotals.DB_NAMES}


def refilled(ledger, native: bool) -> dict[str, list]:
    """The day totals made anew from the whole journal (in a transaction then aborted); native:
    every run through the C loop, however short (the writer's groups here are small)."""
    run_min = daytotals.NATIVE_RUN_MIN
    daytotals.NATIVE_RUN_MIN = 1
    try:
        return _refilled(ledger, native)
    finally:
        daytotals.NATIVE_RUN_MIN = run_min


def _refilled(ledger, native: bool) -> dict[str, list]:
    with ledger.env.begin(write=True) as txn:
        for name in daytotals.DB_NAMES:
            txn.drop(getattr(ledger, name), delete=False)
        totals = daytotals.DayTotals(txn, ledger, {})
        totals.add_all([entry for _, entry in txn.cursor(db=ledger.journal)], native=native)
        totals.write()
        records = day_records(ledger, txn)
        txn.abort()
    return records


SETTINGS_STEP_MIN = 5  # the offsets tried: a day's last 10 minutes are never the only choice


def settings_for(day: int, now_us: int) -> tuple[int, int]:
    """Business day settings (UTC offset minutes, cutoff hour) under which the next 10 minutes
    are all in ``day``."""
    for offset in range(-720, 841, SETTINGS_STEP_MIN):
        for cutoff in range(24):
            if day_of(now_us, offset, cutoff) == day == day_of(now_us + 600_000_000, offset,
                                                                   cutoff):
                return offset, cutoff
    raise AssertionError(f"no settings put now in day {day}")


def reachable_days(now_us: int) -> list[int]:
    """The business days some settings put now (and the next 10 minutes) in: the offsets and
    cutoffs span 49 hours, so always three days in a row, whatever the time of day (the default
    settings' day is one of them, not always the middle one)."""
    days = sorted({day_of(now_us, offset, cutoff)
                   for offset in range(-720, 841, SETTINGS_STEP_MIN) for cutoff in range(24)
                   if day_of(now_us, offset, cutoff) == day_of(now_us + 600_000_000, offset,
                                                                cutoff)})
    assert len(days) >= 3 and days[2] == days[0] + 2, days
    return days


def load_settings(admin: Admin, offset: int, cutoff: int) -> None:
    request_id = rid()
    admin.stub.LoadProgram(apb.LoadProgramRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        document=f"business_day_utc_offset_minutes = {offset}\n"
                 f"business_day_cutoff_hour = {cutoff}\n" + DEFAULT_PROGRAM_TOML),
        metadata=admin.metadata)


def test_reports_over_three_days_sum_their_days_and_the_liability_is_the_journal(server, chain):
    """Three business days in one run: the chain's business day moved by program versions (their
    settings), each day's operations under its own."""
    stub, admin = chain
    rng = random.Random(7)
    now = time.time_ns() // 1000
    base = reachable_days(now)[1]  # the middle of three days settings can put now in
    versions = {1: (480, 4)}
    cards = [open_card(stub, s) for s in STORES]
    for shift in (-1, 0, 1):
        offset, cutoff = settings_for(base + shift, time.time_ns() // 1000)
        load_settings(admin, offset, cutoff)
        versions[max(versions) + 1] = (offset, cutoff)
        for _ in range(12):
            number, store = rng.choice(cards), rng.choice(STORES)
            try:
                if rng.random() < 0.5:
                    top_up(stub, number, rng.randrange(1_000, 20_000), store)
                else:
                    purchase(stub, number, rng.randrange(100, 9_000), store)
            except grpc.RpcError:
                pass
    entries = journal_entries(server.data_dir)

    def day_of_entry(e):
        return day_of(e[J_TS], *versions.get(e[J_VERSION], (480, 4)))

    first, last = base - 1, base + 1
    assert {day_of_entry(e) for e in entries} >= {first, base, last}
    daily = report(admin, first, last)
    assert [r.period for r in daily.rows] == [date_text(d) for d in (first, base, last)]
    monthly = report(admin, first, last, by=2)
    yearly = report(admin, first, last, by=3)
    assert monthly.total == daily.total == yearly.total
    for row in monthly.rows:  # a month's row is the sum of its days'
        days = [r.figures for r in daily.rows if r.period.startswith(row.period)]
        assert row.figures.entries == sum(f.entries for f in days)
        assert row.figures.sales_gross_minor == sum(f.sales_gross_minor for f in days)
        assert row.figures.principal_out_minor == sum(f.principal_out_minor for f in days)
        assert ops_of(row.figures) == {op: (sum(ops_of(f).get(op, (0, 0))[0] for f in days),
                                            sum(ops_of(f).get(op, (0, 0))[1] for f in days))
                                       for op in ops_of(row.figures)}
    expected = replayed(entries, day_of_entry)
    for store in (0, *STORES):
        rows = report(admin, first, last, store=store).rows
        for day, row in zip((first, base, last), rows):
            want = expected.get((store, day))
            assert as_replayed(row.figures) == (want or as_replayed(apb.DayFigures()))
    for day, row in zip((first, base, last), daily.rows):  # the liability at each past date
        upto = [e for e in entries if day_of_entry(e) <= day]
        assert row.liability_principal_minor == sum(e[J_DP] for e in upto)
        assert row.liability_bonus_minor == sum(e[J_DB] for e in upto)
    assert daily.rows[0].liability_principal_minor > 0
    # a ledger made before the day totals fills them from its journal: the same report
    server.stop()
    env = lmdb.open(os.path.join(server.data_dir, "ledger"), max_dbs=64)
    with env.begin(write=True) as txn:
        for name in daytotals.DB_NAMES:  # as made before the day totals: none of them
            txn.drop(env.open_db(name.encode(), txn=txn), delete=True)
        txn.delete(b"day_totals", db=env.open_db(b"meta", txn=txn))
    env.close()
    again = ServerProcess(server.data_dir)
    try:
        admin2 = Admin(again.channel, again.admin_token)
        assert report(admin2, first, last) == daily
        assert "day totals filled from" in again.log()
    finally:
        again.stop()


def test_the_figures_survive_kill_9_through_the_group_log(server, chain):
    """Operations answered from the group log but not yet checkpointed, a close between them,
    then kill -9: the restart replays the log, and the figures are the journal's again (verify
    recomputes them), the late sale in the next day."""
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 30_000, 1))
    purchase(stub, number, 1_000, 2)
    closed = close(admin, 2, today)
    late = [purchase(stub, number, 700, 2) for _ in range(3)]
    server.kill()
    again = ServerProcess(server.data_dir)
    try:
        admin2 = Admin(again.channel, again.admin_token)
        rows = report(admin2, today, today + 1, store=2).rows
        assert rows[0].figures == closed.figures
        assert ops_of(rows[1].figures)[L.OP_PURCHASE] == (3, 2_100)
        assert all(day_of(r.applied_at_us) == today for r in late)
        assert close(admin2, 2, today).closed_before
    finally:
        again.stop()
    report_of = verify(server.data_dir)
    assert report_of["ok"], report_of["problems"]


def test_bad_input_is_refused_with_a_reason_and_changes_nothing(server, chain):
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 1_000, 1))
    manager = bearer(admin.add_operator("li.manager", ROLE.OPERATOR_ROLE_STORE_MANAGER, [1]))
    cashier = bearer(admin.add_operator("wu.cashier", ROLE.OPERATOR_ROLE_CASHIER, [1]))
    before = len(journal_entries(server.data_dir))
    refusals = []
    for call, metadata in (
            (lambda m: close(admin, 1, today + 1, metadata=m), admin.metadata),
            (lambda m: close(admin, 2, today, metadata=m), manager),
            (lambda m: close(admin, 1, today, metadata=m), cashier),
            (lambda m: report(admin, today, today, metadata=m), manager),
            (lambda m: report(admin, today, today - 1, metadata=m), admin.metadata),
            (lambda m: report(admin, today - 3660, today, metadata=m), admin.metadata),
            (lambda m: admin.stub.CloseDay(apb.CloseDayRequest(
                request_id=rid(), client_time_us=sent_at(rid()), store_id=1,
                business_day="2026-02-30"), metadata=m), admin.metadata),
            (lambda m: admin.stub.GetReport(apb.GetReportRequest(
                store_id=1, from_day="20261130", to_day="2026-11-30"), metadata=m), manager)):
        with pytest.raises(grpc.RpcError) as err:
            call(metadata)
        fail = failure_of(err.value)
        refusals.append((err.value.code(), cpb.Reason.Name(fail.reason), fail.field))
    assert refusals == [
        (grpc.StatusCode.FAILED_PRECONDITION, "REASON_DAY_NOT_STARTED", ""),
        (grpc.StatusCode.PERMISSION_DENIED, "REASON_PERMISSION_DENIED", "authorization"),
        (grpc.StatusCode.PERMISSION_DENIED, "REASON_PERMISSION_DENIED", "authorization"),
        (grpc.StatusCode.PERMISSION_DENIED, "REASON_PERMISSION_DENIED", "authorization"),
        (grpc.StatusCode.INVALID_ARGUMENT, "REASON_REPORT_RANGE_INVALID", "to_day"),
        (grpc.StatusCode.INVALID_ARGUMENT, "REASON_REPORT_RANGE_INVALID", "to_day"),
        (grpc.StatusCode.INVALID_ARGUMENT, "REASON_INVALID_ARGUMENT", "business_day"),
        (grpc.StatusCode.INVALID_ARGUMENT, "REASON_INVALID_ARGUMENT", "from_day")]
    assert len(journal_entries(server.data_dir)) == before  # nothing journaled
    # a store manager closes and reports on their own store
    assert close(admin, 1, today, metadata=manager).figures.principal_in_minor == 1_000
    assert report(admin, today, today, store=1, metadata=manager).total.entries >= 2


def test_the_cli_closes_a_day_and_prints_reports_as_tables_and_csv(server, chain):
    stub, _ = chain
    number = open_card(stub, 5)
    today = today_of(top_up(stub, number, 20_000, 5))
    purchase(stub, number, 4_321, 6)
    code, out = operator_cli(server, "close-day", "6", date_text(today))
    assert code == 0, out
    assert "sales (gross)       43.21" in out and "owes store 5" in out
    code, out = operator_cli(server, "report", "--chain", "--from", date_text(today - 1), "--to",
                             date_text(today), "--csv")
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["period"] for r in rows] == [date_text(today - 1), date_text(today)]
    assert rows[1]["sales_gross_minor"] == "4321" and rows[1]["top_up_minor"] == "20000"
    assert rows[1]["liability_principal_minor"] == str(20_000 - 4_321)
    assert rows[1]["clearing_owes_minor"] == rows[1]["clearing_owed_minor"] == "4321"
    code, out = operator_cli(server, "report", "--store", "6", "--from", date_text(today),
                             "--to", date_text(today), "--by", "month")
    assert code == 0, out
    assert out.splitlines()[1].split()[:3] == [date_text(today)[:7], "1", "43.21"]
    code, out = operator_cli(server, "report", "--store", "6", "--from", date_text(today),
                             "--to", date_text(today), "--staff")  # no sale credited to staff
    assert code == 0 and "no sale or top-up credited to a staff member" in out, out
    code, out = operator_cli(server, "report", "--from", "2026-11-01", "--to", "2026-11-02")
    assert code == 2 and "--store S or --chain" in out
    code, out = operator_cli(server, "close-day", "6", "2026-11-31")
    assert code == 2 and "not a calendar date" in out


def test_the_numbers_agree_with_the_proto():
    assert (L.OP_CLOSE_DAY, L.R_DAY_NOT_STARTED) == (cpb.OPERATION_TYPE_DAY_CLOSED,
                                                      cpb.REASON_DAY_NOT_STARTED)
    assert (daytotals.GRANULARITY_DAY, daytotals.GRANULARITY_MONTH, daytotals.GRANULARITY_YEAR) == (
        apb.REPORT_GRANULARITY_DAY, apb.REPORT_GRANULARITY_MONTH, apb.REPORT_GRANULARITY_YEAR)
    assert daytotals.REPORT_DAYS_MAX == 3660  # the proto's and the reason's wording


def test_the_c_loop_adds_any_entries_as_the_reference_does(tmp_path, monkeypatch):
    """Synthetic journal entries of every kind the figures read (split tenders, coupons, points
    redeemed and expired, replacements, refunds), at a few stores and cards: the C loop's
    records equal the entry-by-entry reference's, and written group by group they are the
    records one pass over them makes (a ledger kept live and one filled from its journal).
    ``apart``: store 3 on a clock of its own (its entries' day the one before the others') and
    store 2's day closed (its entries and clearings land in the day after): a run's stores on
    two days, and landing past a close. A group that is one run on one open day is folded in C
    (``native.fold``): the same records as landed in Python (``FOLD_NATIVE`` off)."""
    from hypothesis import example, given, settings, strategies as st
    from cardcore import stores as chain_stores

    ledger = Ledger(str(tmp_path / "ledger"), sync=False)
    ops = st.sampled_from((L.OP_TOP_UP, L.OP_PURCHASE, L.OP_POINTS_EXPIRED, L.OP_REFUND,
                           L.OP_REVERSAL, L.OP_CARD_STATUS, L.OP_COUPON_ISSUE,
                           L.OP_POINTS_EXCHANGE, L.OP_PACKAGE_SELL, L.OP_CARD_REPLACED,
                           L.OP_PIN_FAILED))  # a replacement: its two entries (below)
    money = st.integers(-10**9, 10**9)
    principal = st.sampled_from((-200, -100, 0, 100, 200))  # small: clearings that cancel out
    stores = st.sampled_from((0, 1, 2, 3, 2**31 + 7, 2**32 - 1))  # ids past 2**31 too (review)
    entry = st.tuples(ops, stores, st.sampled_from((0, 1, 2, 3)), money, money,
                      principal, money, money, st.integers(0, 10**6), st.integers(0, 10**6),
                      st.sampled_from((0, 0, 7)), st.sampled_from((0, L.PARTIAL_PAYMENT)),
                      st.integers(0, 10**6), st.sampled_from((0, 0, 11)))

    def packed(k, f):
        op, store, card, amount, discount, dp, db, dpts, redeemed_pts, redeemed_minor, item, \
            flags, coupon_off, staff = f
        e = bytearray(L.JOURNAL.pack(
            L.JOURNAL_VERSION, op, 0, 1, 0, 0, 0, k + 1, bytes([card]) * 16, amount, discount, dp,
            db, dpts, abs(dp) * 3, 0, 0, 1_796_000_000_000_000, store, 0, staff, 0, bytes(8), 1, 0,
            bytes(3), 0, 0, 0, 0, 0, 0, bytes(48), bytes(32)))
        L.JOURNAL_PROGRAM.pack_into(e, L.JOURNAL_OFF_PROGRAM, redeemed_pts, redeemed_minor, 0,
                                    0, item)
        L.JOURNAL_PURCHASE_FLAGS.pack_into(e, L.JOURNAL_OFF_PURCHASE_FLAGS, flags)
        L.JOURNAL_COUPON_OFF.pack_into(e, L.JOURNAL_OFF_COUPON, coupon_off)
        return bytes(e)

    ts_us = 1_796_000_000_000_000  # the entries' time (packed above)
    day = daytotals.business_day(ts_us, 480, 4)  # the program's clock (the default)
    assert daytotals.business_day(ts_us, -600, 4) == day - 1  # store 3's, apart

    def records(entries, native, cuts=(), apart=False):
        """The records the entries make, written group by group (cut at ``cuts``)."""
        with ledger.env.begin(write=True) as txn:
            if apart:
                txn.put(daytotals._U32_KEY.pack(3), chain_stores.store_record(
                    3, "apart", 0, (-600, 4), ts_us, 0), db=ledger.chain_stores)
                txn.put(L.DAY_KEY.pack(2, day), L.STORE_DAY.pack(
                    L.STORE_DAY_VERSION, L.DAY_CLOSED, 0, 1, ts_us, 0), db=ledger.store_days)
            for start, end in zip((0, *cuts), (*cuts, len(entries))):
                totals = daytotals.DayTotals(txn, ledger, {})
                totals.add_all(entries[start:end], native=native)
                totals.write()
            out = day_records(ledger, txn)
            txn.abort()
        return out

    big = (L.OP_TOP_UP, 1, 0, 0, 0, 2**61 + 1, 0, 0, 0, 0, 0, 0, 0, 0)  # 8 of them pass int64
    # a figure made of several amounts whose exact sum passes int64: the reference caps the
    # exact sum once (the C loop summed in int64 first, so it wrapped before capping)
    sale = (L.OP_PURCHASE, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    split = sale[:11] + (L.PARTIAL_PAYMENT,) + sale[12:]
    issued = sale[:7] + (2**62, 2**62) + sale[9:]  # points earned + redeemed
    till = split[:3] + (2**62, -(2**62)) + split[5:]  # gross - discount, the till's part
    till_back = split[:3] + (-(2**62), 2**62) + split[5:]  # ... at INT64_MIN, then back
    bonus_min = sale[:6] + (-(2**63),) + sale[7:]  # bonus out: -(INT64_MIN)
    expired_min = (L.OP_POINTS_EXPIRED,) + sale[1:7] + (-(2**63),) + sale[8:]

    @settings(max_examples=60, deadline=None)
    @given(st.lists(entry, min_size=1, max_size=40), st.lists(st.integers(1, 39), max_size=4),
           st.booleans())
    @example([big[:2] + (c % 4,) + big[3:] for c in range(8)], [4], False)  # the fold's review:
    @example([(big[0], 1 + 2 * (c % 2), c % 4) + big[3:] for c in range(8)], [4], True)  # 2 days
    @example([issued], [], False)
    @example([till, issued], [], False)
    @example([till_back, till, issued], [], False)  # (uncut: a saturated sum depends on cuts)
    @example([bonus_min, bonus_min], [], False)
    @example([expired_min, issued], [], True)
    @example([(L.OP_TOP_UP if k % 3 == 0 else L.OP_PURCHASE, 7 + k, k % 4, 0, 0,
               100 if k % 3 == 0 else -100) + sale[6:] for k in range(600)], [301], False)
    # (a run at 600 stores, its cards' homes moving: past the C loop's old 512-store limit)
    def check(fields, cuts, apart):  # own-day nets from capped columns depended on grouping
        entries = []
        for f in fields:  # a replacement's new card's entry right after the old card's
            entries.append(packed(len(entries), f))
            if f[0] == L.OP_CARD_REPLACED:
                entries.append(packed(len(entries), (L.OP_REPLACEMENT_OPENED, f[1], (f[2] + 1) % 4,
                                                     f[3], 0, -f[5], -f[6], -f[7], 0, 0, 0, 0, 0,
                                                     0)))
        cuts = sorted({c for c in cuts if c < len(entries)  # (the writer never splits those)
                       and entries[c][1] != L.OP_REPLACEMENT_OPENED})
        run_min = daytotals.NATIVE_RUN_MIN
        daytotals.NATIVE_RUN_MIN = 1
        try:
            once = records(entries, True, apart=apart)
            assert once == records(entries, False, apart=apart)
            monkeypatch.setattr(daytotals, "FOLD_NATIVE", False)
            assert records(entries, True, apart=apart) == once
            assert records(entries, True, cuts, apart) == once
            monkeypatch.setattr(daytotals, "FOLD_NATIVE", True)
            assert once == records(entries, True, cuts, apart) == records(entries, False, cuts,
                                                                           apart)
            if apart and any(f[1] in (2, 3) for f in fields):  # their entries on other days
                assert once["day_totals"] != records(entries, True)["day_totals"]
        finally:
            daytotals.NATIVE_RUN_MIN = run_min

    folded = []
    fold = daytotals.DayTotals._folded
    monkeypatch.setattr(daytotals.DayTotals, "_folded",
                        lambda self: folded.append(1) or fold(self))
    try:
        check()
    finally:
        ledger.close()
    assert len(folded) > 20  # the fold was what most of the groups went through


def test_a_runs_stores_and_moving_cards_are_indexed_in_c_as_python_says():
    """``native.index_run`` (the C loop's slots) against the rule in Python: stores numbered in
    order of first appearance; the cards whose principal moves (or that a replacement names)
    numbered in key order, every other entry none; up to more distinct stores than a hash
    bucket's first guess, stores past 2**31, cards that differ in their last byte only, and
    random ids (the sort's buckets by first byte: runs of 64 or more)."""
    from array import array

    from hypothesis import example, given, settings, strategies as st

    ops = st.sampled_from((L.OP_PURCHASE, L.OP_TOP_UP, L.OP_POINTS_EXPIRED, L.OP_CARD_REPLACED,
                           L.OP_REPLACEMENT_OPENED, L.OP_PIN_FAILED))
    stores = st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1))
    cards = st.sampled_from([bytes(15) + bytes([k]) for k in range(5)] + [b"\xff" * 16]) \
        | st.binary(min_size=16, max_size=16)
    entry = st.tuples(ops, stores, cards, st.sampled_from((0, 0, 1, -1, 2**40)))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(entry, max_size=300))
    @example([(L.OP_PURCHASE, k % 7, bytes([k % 3]) + bytes(14) + bytes([k * 37 % 256]), -1)
              for k in range(200)])  # 3 of the sort's buckets, each out of order (a mutant that
    # left the buckets unsorted passed the strategy alone)
    def check(fields):
        buf = bytearray(L.JOURNAL_SIZE * len(fields))
        for k, (kind, store, card, dp) in enumerate(fields):
            e = memoryview(buf)[k * L.JOURNAL_SIZE:(k + 1) * L.JOURNAL_SIZE]
            e[1] = kind
            e[16:32] = card
            e[48:56] = dp.to_bytes(8, "little", signed=True)
            e[104:108] = store.to_bytes(4, "little")
        n = len(fields)
        slot_of, card_of = array("I", bytes(4 * n)), array("I", bytes(4 * n))
        by_slot, card_ids = daytotals.native.index_run(bytes(buf), slot_of, card_of)
        assert by_slot == list(dict.fromkeys(f[1] for f in fields))
        assert list(slot_of) == [by_slot.index(f[1]) for f in fields]
        moving = [dp != 0 or kind in (L.OP_CARD_REPLACED, L.OP_REPLACEMENT_OPENED)
                  for kind, _, _, dp in fields]
        assert card_ids == sorted({f[2] for f, m in zip(fields, moving) if m})
        assert list(card_of) == [card_ids.index(f[2]) if m else 0xFFFFFFFF
                                 for f, m in zip(fields, moving)]

    check()


def test_day_figures_past_int64_saturate_and_the_writer_goes_on(server):
    """Two cards topped up to int64's limit at one store on one day: the day's top-ups would
    pass int64. They stay at the limit (entry by entry, as here, and in the C loop alike), the
    writer goes on serving, and verify finds the stored figures what the journal makes."""
    from conftest import Client

    c = Client(server.stub)
    numbers = [new_card_number() for _ in range(2)]
    for number in numbers:
        c.open(number)
        assert c.top_up(number, daytotals.INT64_MAX).balance_after.principal_minor == \
            daytotals.INT64_MAX
    assert c.card(numbers[0]).balance.principal_minor == daytotals.INT64_MAX  # still serving
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
    a = [0] * daytotals.WIDTH
    daytotals._add(a, daytotals.F_P_IN, daytotals.INT64_MAX)
    daytotals._add(a, daytotals.F_P_IN, 5)
    assert a[daytotals.F_P_IN] == daytotals.INT64_MAX


def split_tender(server):
    """A food basket of 200.00 on the cafe program: a silver card pays what it has and leaves
    the rest, a second card pays the rest (same basket_id). (the first's answer, the second's)"""
    from conftest import Client
    from test_service_programs import FOOD, purchase, silver_card

    client = Client(server.stub)
    first = silver_card(client, 10_000)
    second = new_card_number()
    client.open(second)
    client.top_up(second, 10_000)
    paid = server.stub.Purchase(purchase(first, (FOOD, 20_000, 1, ""), partial=True, basket="B-1"))
    rest = server.stub.Purchase(purchase(second, (FOOD, paid.remainder_due_minor, 1, ""),
                                         basket="B-1"))
    return paid, rest


def test_a_split_tender_is_one_sale_and_its_tenders_add_up_to_what_was_due(cafe):
    """A basket of 200.00 (10.00 off): the first card pays 120.00 and leaves 70.00, a second
    card pays the 70.00 (same basket_id). One sale of 200.00; tenders 190.00, none at the till."""
    from conftest import Admin

    server = cafe
    admin = Admin(server.channel, server.admin_token)
    paid, rest = split_tender(server)
    assert rest.remainder_due_minor == 0
    today = day_of(int(time.time() * 1e6))
    f = report(admin, today, today, store=1).rows[0].figures
    assert f.sales_gross_minor == 20_000
    due = f.sales_gross_minor - f.discount_minor
    assert f.tender_till_minor == 0
    assert (f.tender_principal_minor + f.tender_bonus_minor + f.tender_points_minor
            + f.tender_till_minor) == due == paid.paid_minor + rest.paid_minor
    assert verify(server.data_dir)["ok"]


# ---- nets of both signs, older records, a close's holds (found by a review) --------------------

def test_nets_past_int64_wrap_alike_group_by_group_and_in_verify(tmp_path):
    """The own-day liability and the clearing are nets of amounts of both signs: past int64 they
    wrap round (daytotals.wrapped), so the writer's group-by-group records and verify's whole
    journal agree, which saturating at the limit would not (MAX - 100, then +10 and -20)."""
    ledger = Ledger(str(tmp_path / "ledger"), sync=False)
    now = time.time_ns() // 1000  # a new ledger's clock starts at the real one: not before it
    try:
        ledger.apply_group([open_op("oa", "4000000000000002"), open_op("ob", "4000000000000010"),
                            open_op("oc", "4000000000000028"),
                            op("tc", L.OP_TOP_UP, "4000000000000028", 100)], now)
        MAX = daytotals.INT64_MAX
        assert ledger.apply_group([op("ta", L.OP_TOP_UP, "4000000000000002", MAX - 100)],
                                  now + 1)[0].reason == L.R_OK
        assert [o.reason for o in ledger.apply_group(
            [op("tb", L.OP_TOP_UP, "4000000000000010", 10),
             op("pc", L.OP_PURCHASE, "4000000000000028", 20)], now + 2)] == [L.R_OK, L.R_OK]
        with ledger.env.begin() as txn:
            assert daytotals.check(txn, ledger) == []
        day = daytotals.business_day(now, 480, 4)
        principal, _, _ = ledger._read(lambda txn: daytotals.liability(txn, ledger, day))
        assert principal == daytotals.wrapped(MAX - 10)  # 100 + (MAX - 100) + 10 - 20
    finally:
        ledger.close()


def test_verify_leaves_older_day_totals_to_the_next_writer(tmp_path):
    """Records of an older version (meta 1: before the own-day figures) are filled again when a
    writer opens the ledger; verify, read-only, does not call them corrupt meanwhile."""
    path = str(tmp_path / "ledger")
    now = time.time_ns() // 1000  # a new ledger's clock starts at the real one: not before it
    ledger = Ledger(path, sync=False)
    ledger.apply_group([open_op("oa", "4000000000000002"),
                        op("ta", L.OP_TOP_UP, "4000000000000002", 5000)], now)
    ledger.close()
    env = lmdb.open(path, max_dbs=64)
    with env.begin(write=True) as txn:
        chain_db = env.open_db(b"day_chain", txn=txn)
        for key, value in list(txn.cursor(db=chain_db)):
            f = list(L.DAY_TOTALS.unpack(value))
            f[1 + daytotals.F_OWN_P] = f[1 + daytotals.F_OWN_B] = 0
            txn.put(key, L.DAY_TOTALS.pack(*f), db=chain_db)
        txn.put(b"day_totals", b"\x01", db=env.open_db(b"meta", txn=txn))
    env.close()
    readonly = Ledger(path, sync=False, readonly=True)
    try:
        got = verify_ledger(readonly)
        assert got["ok"], got["problems"]
    finally:
        readonly.close()
    again = Ledger(path, sync=False)  # the writer fills them again
    try:
        day = daytotals.business_day(now, 480, 4)
        assert again._read(lambda txn: daytotals.liability(txn, again, day))[0] == 5000
        assert verify_ledger(again)["ok"]
    finally:
        again.close()


def test_a_closed_days_holds_outstanding_stay_as_its_close_answered(server, chain):
    """A new program moves the business day back: a later void's own day is the day before the
    closed one, which is open, so it lands there; the closed day still answers what its close
    did (kept in the close's record), in CloseDay and in reports."""
    stub, admin = chain
    number = open_card(stub, 1)
    today = today_of(top_up(stub, number, 9_000, 1))
    hold = stub.Authorize(authorize(number, 4_000, store_id=1))
    assert close(admin, 1, today).holds_outstanding_minor == 4_000
    offset, cutoff = settings_for(today - 1, time.time_ns() // 1000)
    load_settings(admin, offset, cutoff)
    late = stub.VoidHold(void(number, hold.seq, store_id=1))
    assert day_of(late.applied_at_us, offset, cutoff) == today - 1
    rows = report(admin, today - 1, today, store=1).rows
    assert [(r.days_closed, r.holds_outstanding_minor) for r in rows] == [(0, -4_000), (1, 4_000)]
    assert close(admin, 1, today).holds_outstanding_minor == 4_000
    assert verify(server.data_dir)["ok"]


def test_holds_outstanding_past_int64_wrap_and_are_answered(server, chain):
    """Two holds of int64's maximum at one store on two days: the sum wraps round (the rule
    for nets) and the report still answers (it once failed encoding a figure past int64)."""
    stub, admin = chain
    MAX = daytotals.INT64_MAX
    a, b = open_card(stub, 1), open_card(stub, 1)
    today = today_of(top_up(stub, a, MAX, 1))
    stub.Authorize(authorize(a, MAX, store_id=1))
    now = time.time_ns() // 1000
    other = today - 1 if today - 1 in reachable_days(now) else today + 1  # next to it
    load_settings(admin, *settings_for(other, now))
    top_up(stub, b, MAX, 1)
    stub.Authorize(authorize(b, MAX, store_id=1))
    rows = report(admin, min(today, other), max(today, other), store=1).rows
    assert [r.holds_outstanding_minor for r in rows] == [MAX, daytotals.wrapped(2 * MAX)]
    assert verify(server.data_dir)["ok"]


def test_holds_released_by_expiry_and_by_a_capture_in_a_long_group(tmp_path):
    """Through the ledger's own apply_group (the group's time chosen): a capture in a group long
    enough for the C loop releases its whole hold at the hold's store, the writer's sweep
    releases an expired one, and the figures are the journal's (check)."""
    from cardcore.ledger import PendingOp
    from test_ledger import cid, key

    number = "4000000000000002"
    now = time.time_ns() // 1000  # a new ledger's clock starts at the real one: not before it
    ledger = Ledger(str(tmp_path / "ledger"), sync=False)

    def hold(request: str, amount: int, store: int, minutes: int) -> PendingOp:
        return PendingOp.build(key(request), L.OP_HOLD, cid(number), amount, store_id=store,
                               ref_id=minutes, client_time_us=now)
    try:
        ledger.apply_group([open_op("o", number), op("t", L.OP_TOP_UP, number, 100_000)], now)
        last = max(L.SEQ_KEY.unpack(k)[0] for k, _ in ledger.dump()["journal"])
        assert all(o.reason == L.R_OK for o in ledger.apply_group(
            [hold("h1", 1_000, 1, 2), hold("h2", 2_000, 2, 60)], now + 1))
        capture_op = PendingOp.build(
            key("c2"), L.OP_PURCHASE, cid(number), 1_500, store_id=2, link_seq=last + 2,
            op_flags=L.CAPTURE, pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET,
            client_time_us=now)
        assert all(o.reason == L.R_OK for o in ledger.apply_group(
            [capture_op, hold("h3", 4_000, 3, 60), op("x1", L.OP_TOP_UP, number, 5),
             op("x2", L.OP_TOP_UP, number, 5), op("x3", L.OP_TOP_UP, number, 5)], now + 2))
        ledger.apply_group([op("t2", L.OP_TOP_UP, number, 1)], now + 3 * 60_000_000)
        assert L.OP_HOLD_EXPIRED in [e[1] for _, e in ledger.dump()["journal"]]
        day = daytotals.business_day(now + 3 * 60_000_000, 480, 4)  # the sweep's
        assert {s: ledger.read_day(s, day)[3] for s in (1, 2, 3)} == {1: 0, 2: 0, 3: 4_000}
        assert ledger.read_report(None, day, day, 1)["rows"][0][7] == 4_000
        with ledger.env.begin() as txn:
            assert daytotals.check(txn, ledger) == []
    finally:
        ledger.close()


def test_homes_of_the_wrong_size_are_refused_even_when_their_sizes_add_up(tmp_path):
    """(found by a review) The homes of the money read in one go: each record must be 4 bytes,
    not only their total (3 + 5 bytes read as two homes cut from the joined bytes)."""
    from cardcore.idempotency import InvariantError

    a, b = bytes([1]) * 16, bytes([2]) * 16
    led = Ledger(str(tmp_path / "l"), sync=False)
    try:
        with led.env.begin(write=True) as txn:
            txn.put(a, b"\x07\x00\x00", db=led.day_money_home)
            txn.put(b, b"\x00\x09\x00\x00\x00", db=led.day_money_home)
            with pytest.raises(InvariantError, match="wrong size"):
                daytotals.DayTotals(txn, led, {})._read_homes([a, b])
            txn.put(b, b"\x09\x00\x00\x00", db=led.day_money_home)
            txn.put(a, b"\x07\x00\x00\x00", db=led.day_money_home)
            totals = daytotals.DayTotals(txn, led, {})
            totals._read_homes([a, b])
            assert (totals.homes[a], totals.homes[b]) == (7, 9)
            txn.abort()
    finally:
        led.close()


def test_a_group_of_two_runs_on_one_store_day_caps_as_the_reference_does(tmp_path):
    """(found by a review) A group split into two runs by a close of another store's day, both
    on store 1's day, with its till's part reaching int64's limit in the first and coming back
    in the second: the C path's records are the reference's (later runs of a group go entry by
    entry; before, the second run's row was capped once onto the first's total)."""
    import struct

    ts = 1_796_000_000_000_000
    day = daytotals.business_day(ts, 480, 4)

    def entry(k, op, subject=None, amount=0, discount=0):
        e = bytearray(L.JOURNAL.pack(
            L.JOURNAL_VERSION, op, 0, 1, 0, 0, 0, k + 1, subject or bytes([k % 3]) * 16, amount,
            discount, 0, 0, 0, 0, 0, 0, ts, 1 if op != L.OP_CLOSE_DAY else 0, 0, 0, 0, bytes(8), 1,
            0, bytes(3), 0, 0, 0, 0, 0, 0, bytes(48), bytes(32)))
        L.JOURNAL_PURCHASE_FLAGS.pack_into(e, L.JOURNAL_OFF_PURCHASE_FLAGS, L.PARTIAL_PAYMENT)
        return bytes(e)

    def till(k, v):  # a split tender's payment: the till's part is amount - discount
        return entry(k, L.OP_PURCHASE, amount=max(v, 0), discount=max(-v, 0))

    entries = [till(0, 2**62), till(1, 2**62), till(2, 2**62), till(3, 0),
               entry(4, L.OP_CLOSE_DAY, subject=struct.pack(">II", 9, day) + bytes(8)),
               till(5, 2**62), till(6, -(2**62)), till(7, 0), till(8, 0)]

    def records(native: bool) -> dict:
        led = Ledger(str(tmp_path / f"l-{native}"), sync=False)
        try:
            with led.env.begin(write=True) as txn:
                totals = daytotals.DayTotals(txn, led, {})
                totals.add_all(entries, native=native)
                totals.write()
                out = {name: list(txn.cursor(db=getattr(led, name)))
                       for name in daytotals.DB_NAMES}
                txn.abort()
            return out
        finally:
            led.close()

    assert records(True) == records(False)
