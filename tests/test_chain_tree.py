"""The chain's shape (issue 11): regions and stores put through the writer and journaled, bad
input refused with its reason and nothing changed, each store's own business day (a sale at the
same instant lands in different days at stores in different zones; verify and a fill from the
journal agree after a store changes zone mid-journal), operator scopes that follow the tree, and
a region's report, the sum of its stores'. Against the real server on loopback."""
from __future__ import annotations

import calendar
import csv
import io
import os
import time

import grpc
import pytest

from cardcore import daytotals
from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, bearer, failure_of, journal_entries, operator_cli, rid, sent_at,
                      verify)
from test_daily_close import (J_CARD, J_OP, close, date_text, day_of, day_records,
                              open_card, ops_of, purchase, report, till, top_up)

ROLE = cpb.OperatorRole
EAST, WEST = (840, 0), (-720, 0)  # UTC+14 and UTC-12, days from midnight: 26 hours apart


def put_region(admin: Admin, region_id: int, name: str, metadata=None):
    request_id = rid()
    return admin.stub.PutRegion(apb.PutRegionRequest(
        request_id=request_id, client_time_us=sent_at(request_id), region_id=region_id,
        name=name), metadata=metadata or admin.metadata).region


def put_store(admin: Admin, store_id: int, name: str, region_id: int = 0, day=None,
              metadata=None):
    request_id = rid()
    fields = {} if day is None else {"utc_offset_minutes": day[0],
                                     "business_day_cutoff_hour": day[1]}
    return admin.stub.PutStore(apb.PutStoreRequest(
        request_id=request_id, client_time_us=sent_at(request_id), store_id=store_id,
        name=name, region_id=region_id, **fields), metadata=metadata or admin.metadata).store


def tree(admin: Admin, metadata=None) -> dict:
    """{region id (0: head office's): [(store id, name, own day or None, terminals)]}"""
    answer = admin.stub.ListStores(apb.ListStoresRequest(), metadata=metadata or admin.metadata)
    out = {r.region.region_id: [(s.store_id, s.name, (s.utc_offset_minutes,
                                                      s.business_day_cutoff_hour)
                                 if s.own_business_day else None, s.terminals)
                                for s in r.stores] for r in answer.regions}
    if answer.head_office_stores:
        out[0] = [(s.store_id, s.name, None, s.terminals) for s in answer.head_office_stores]
    return out


@pytest.fixture
def chain(server):
    """(card stub, chain admin) over a chain of two regions: North (stores 11 and 12), South
    (store 21)."""
    admin = Admin(server.channel, server.admin_token)
    put_region(admin, 1, "North")
    put_region(admin, 2, "South")
    put_store(admin, 11, "Harbin Central", 1, EAST)
    put_store(admin, 12, "Changchun", 1)
    put_store(admin, 21, "Guangzhou Tianhe", 2, WEST)
    return server.stub, admin


def test_regions_and_stores_are_put_listed_and_journaled(server, chain):
    stub, admin = chain
    admin.enroll(7, 11)
    admin.enroll(8, 11)
    assert tree(admin) == {1: [(11, "Harbin Central", EAST, 2), (12, "Changchun", None, 0)],
                           2: [(21, "Guangzhou Tianhe", WEST, 0)]}
    # a store without its own day shows the program's (UTC+8, from 04:00)
    listed = admin.stub.ListStores(apb.ListStoresRequest(), metadata=admin.metadata)
    changchun = listed.regions[0].stores[1]
    assert (changchun.utc_offset_minutes, changchun.business_day_cutoff_hour) == (480, 4)
    # a change: renamed, moved to South, its own day; a region renamed (UTF-8 names)
    moved = put_store(admin, 12, "长春一店", 2, (480, 6))
    assert (moved.region_id, moved.own_business_day, moved.utc_offset_minutes,
            moved.business_day_cutoff_hour) == (2, True, 480, 6)
    put_region(admin, 1, "东北")
    assert tree(admin) == {1: [(11, "Harbin Central", EAST, 2)],
                           2: [(12, "长春一店", (480, 6), 0), (21, "Guangzhou Tianhe", WEST, 0)]}
    put_store(admin, 30, "Head office shop")  # no region: directly under head office
    assert tree(admin)[0] == [(30, "Head office shop", None, 0)]
    # every put is a journal entry with the day totals' fields in its subject, names nowhere
    entries = journal_entries(server.data_dir)
    puts = [(e[J_OP], e[J_CARD]) for e in entries if e[J_OP] in (L.OP_REGION_PUT, L.OP_STORE_PUT)]
    assert puts == [
        (L.OP_REGION_PUT, L.REGION_SUBJECT.pack(1)), (L.OP_REGION_PUT, L.REGION_SUBJECT.pack(2)),
        (L.OP_STORE_PUT, L.STORE_SUBJECT.pack(11, 1, 840, 0, L.STORE_OWN_DAY)),
        (L.OP_STORE_PUT, L.STORE_SUBJECT.pack(12, 1, 0, 0, 0)),
        (L.OP_STORE_PUT, L.STORE_SUBJECT.pack(21, 2, -720, 0, L.STORE_OWN_DAY)),
        (L.OP_STORE_PUT, L.STORE_SUBJECT.pack(12, 2, 480, 6, L.STORE_OWN_DAY)),
        (L.OP_REGION_PUT, L.REGION_SUBJECT.pack(1)),
        (L.OP_STORE_PUT, L.STORE_SUBJECT.pack(30, 0, 0, 0, 0))]
    journal = b"".join(L.JOURNAL.pack(*e) for e in entries)
    assert "长春一店".encode() not in journal and b"Harbin" not in journal
    assert verify(server.data_dir)["ok"]
    # the CLI: put and list
    code, out = operator_cli(server, "region", "put", "3", "--name", "West")
    assert code == 0 and "region 3  West" in out, out
    code, out = operator_cli(server, "store", "put", "31", "--name", "Urumqi", "--region", "3",
                             "--utc-offset-minutes", "360", "--cutoff-hour", "5")
    assert code == 0 and "store 31  Urumqi  region 3  UTC+06:00, day from 05:00" in out, out
    code, out = operator_cli(server, "store", "list")
    assert code == 0, out
    assert "region 3  West\n  store 31  Urumqi" in out
    assert "store 11  Harbin Central  region 1  UTC+14:00, day from 00:00  terminals 2" in out
    assert "head office (no region)\n  store 30  Head office shop" in out
    # the registry is held to the journal: a store's zone changed behind the writer's back
    server.stop()
    ledger = Ledger(os.path.join(server.data_dir, "ledger"))
    try:
        with ledger.env.begin(write=True) as txn:
            key = L.TERMINAL_KEY.pack(11)
            record = bytearray(txn.get(key, db=ledger.chain_stores))
            record[12:16] = (480).to_bytes(4, "little", signed=True)  # utc_offset_minutes
            txn.put(key, bytes(record), db=ledger.chain_stores)
    finally:
        ledger.close()
    report_of = verify(server.data_dir)
    assert not report_of["ok"] and report_of["problems"] == [
        "the stores' regions and business days are not what the journal's store entries set"]


def refusal(call) -> tuple[grpc.StatusCode, int, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    fail = failure_of(err.value)
    return err.value.code(), fail.reason, fail.field


def test_bad_input_is_refused_with_its_reason_and_changes_nothing(server, chain):
    _, admin = chain
    before_tree, before = tree(admin), len(journal_entries(server.data_dir))
    I, N = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (lambda: put_store(admin, 13, ""), (I, cpb.REASON_NAME_INVALID, "name")),
        (lambda: put_store(admin, 13, "   "), (I, cpb.REASON_NAME_INVALID, "name")),
        (lambda: put_store(admin, 13, "店" * 22), (I, cpb.REASON_NAME_INVALID, "name")),  # 66 B
        (lambda: put_store(admin, 13, "a\nb"), (I, cpb.REASON_NAME_INVALID, "name")),
        (lambda: put_region(admin, 3, "x" * 65), (I, cpb.REASON_NAME_INVALID, "name")),
        (lambda: put_store(admin, 11, "Harbin", 1, (-721, 0)),
         (I, cpb.REASON_UTC_OFFSET_INVALID, "utc_offset_minutes")),
        (lambda: put_store(admin, 11, "Harbin", 1, (841, 0)),
         (I, cpb.REASON_UTC_OFFSET_INVALID, "utc_offset_minutes")),
        (lambda: put_store(admin, 11, "Harbin", 1, (480, 24)),
         (I, cpb.REASON_CUTOFF_HOUR_INVALID, "business_day_cutoff_hour")),
        (lambda: admin.stub.PutStore(apb.PutStoreRequest(
            request_id=rid(), client_time_us=sent_at(rid()), store_id=11, name="Harbin",
            region_id=1, utc_offset_minutes=480), metadata=admin.metadata),
         (I, cpb.REASON_CUTOFF_HOUR_INVALID, "business_day_cutoff_hour")),  # one of the two
        (lambda: put_store(admin, 11, "Harbin", 9), (N, cpb.REASON_REGION_NOT_FOUND, "")),
        (lambda: put_store(admin, 0, "Head office"), (I, cpb.REASON_CHAIN_ID_INVALID, "store_id")),
        (lambda: put_region(admin, 0, "None"), (I, cpb.REASON_CHAIN_ID_INVALID, "region_id")),
    ]
    for call, want in cases:
        assert refusal(call) == want
    # a store manager may list its store, not put one
    token = admin.add_operator("mgr11", ROLE.OPERATOR_ROLE_STORE_MANAGER, [11])
    assert refusal(lambda: put_store(admin, 11, "Mine", 1, metadata=bearer(token)))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, cpb.REASON_PERMISSION_DENIED)
    assert tree(admin, bearer(token)) == {1: [(11, "Harbin Central", EAST, 0)]}
    assert tree(admin) == before_tree
    entries = journal_entries(server.data_dir)
    assert len(entries) == before + 1 and entries[-1][J_OP] == L.OP_OPERATOR_ADDED
    # the CLI refuses before sending anything
    for args in (("store", "put", "13", "--name", ""),
                 ("store", "put", "13", "--name", "x", "--utc-offset-minutes", "60"),
                 ("store", "put", "13", "--name", "x", "--cutoff-hour", "24",
                  "--utc-offset-minutes", "60"),
                 ("region", "put", "0", "--name", "x")):
        code, out = operator_cli(server, *args)
        assert code == 2 and "Traceback" not in out, (args, out)
    assert len(journal_entries(server.data_dir)) == before + 1


def batch(stub, ops):
    return stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops)).results


def sales(number: str, stores) -> list:
    out = []
    for k, store in enumerate(stores):
        request_id = rid()
        out.append(pb.Operation(purchase=pb.PurchaseRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), gross_amount_minor=1_000 + k,
            till=till(store))))
    return out


def test_a_sale_at_the_same_instant_lands_in_each_stores_own_business_day(server, chain):
    """Stores 11 (UTC+14) and 21 (UTC-12) are 26 hours apart: one group's sales at both land in
    different business days (the C loop's run, one day per store), and the close of each day and
    the report agree; store 12 (no day of its own) keeps the program's (UTC+8, 04:00)."""
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 1_000_000, 11)
    results = batch(stub, sales(number, (11, 21, 11, 21, 12, 12)))
    assert all(r.reason == cpb.REASON_OK for r in results)
    at = results[0].applied_at_us
    assert {r.applied_at_us for r in results} == {at}  # one instant
    east, west, home = day_of(at, *EAST), day_of(at, *WEST), day_of(at)
    assert east - west in (1, 2)
    gross = {11: 1_000 + 1_002, 21: 1_001 + 1_003, 12: 1_004 + 1_005}
    for store, day in ((11, east), (21, west), (12, home)):
        rows = report(admin, day - 2, day + 2, store=store).rows
        by_day = {r.period: ops_of(r.figures).get(L.OP_PURCHASE) for r in rows}
        assert by_day == {date_text(d): (2, gross[store]) if d == day else None
                          for d in range(day - 2, day + 3)}
        closed = close(admin, store, day)
        assert closed.figures == rows[2].figures
    # a day that has begun at UTC+14 closes though it has not on the program's clock
    assert close(admin, 11, east).closed_before
    assert verify(server.data_dir)["ok"]


def refilled_from_start(data_dir: str, native: bool) -> dict:
    """The day totals made anew from the journal alone (as a fill does), in a transaction then
    aborted; ``native`` False: entry by entry, the reference."""
    ledger = Ledger(os.path.join(data_dir, "ledger"))
    try:
        with ledger.env.begin(write=True) as txn:
            live = day_records(ledger, txn)
            for name in daytotals.DB_NAMES:
                txn.drop(getattr(ledger, name), delete=False)
            totals = daytotals.DayTotals(txn, ledger, {}, from_start=True)
            totals.add_all([entry for _, entry in txn.cursor(db=ledger.journal)], native=native)
            totals.write()
            again = day_records(ledger, txn)
            txn.abort()
    finally:
        ledger.close()
    return live, again


def test_a_store_that_changes_zone_mid_journal_verifies_and_keeps_its_closed_days(server, chain):
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 1_000_000, 11)
    first = batch(stub, sales(number, (11,) * 4))[0].applied_at_us
    east = day_of(first, *EAST)
    close(admin, 11, east)
    put_store(admin, 11, "Harbin Central", 1, WEST)  # 26 hours back: today there is open
    second = batch(stub, sales(number, (11,) * 4))[0].applied_at_us
    west = day_of(second, *WEST)
    assert west < east
    put_store(admin, 11, "Harbin Central", 1, EAST)  # back: its day there is closed
    third = batch(stub, sales(number, (11,) * 4))
    assert day_of(third[0].applied_at_us, *EAST) == east  # (the test did not cross a day)
    # store 13 sold before it was put (a bare number: the program's day), then got a zone whose
    # day differs now: its first sales stay in the program's day
    before = batch(stub, sales(number, (13,) * 4))[0].applied_at_us
    zone = EAST if day_of(before, *EAST) != day_of(before) else WEST
    put_store(admin, 13, "Jilin", 1, zone)
    after = batch(stub, sales(number, (13,) * 4))[0].applied_at_us
    days13 = {r.period: ops_of(r.figures).get(L.OP_PURCHASE, (0, 0))[0]
              for r in report(admin, west - 1, east + 2, store=13).rows}
    assert days13[date_text(day_of(before))] == 4 and days13[date_text(day_of(after, *zone))] == 4
    rows = {r.period: ops_of(r.figures).get(L.OP_PURCHASE, (0, 0))[0]
            for r in report(admin, west, east + 1, store=11).rows}
    assert rows[date_text(west)] == 4 and rows[date_text(east)] == 4  # closed: it stayed so
    assert rows[date_text(east + 1)] == 4  # the late ones walked to the next open day
    assert sum(rows.values()) == 12
    report_of = verify(server.data_dir)
    assert report_of["ok"], report_of["problems"]
    # the journal alone makes the same records, through the C loop and entry by entry (a fill
    # that took the registry's last settings for every entry would put all 12 in one zone)
    server.stop()
    live, native = refilled_from_start(server.data_dir, native=True)
    assert native == live
    assert refilled_from_start(server.data_dir, native=False)[1] == live


def test_a_region_manager_sees_its_regions_stores_as_the_tree_has_them_now(server, chain):
    stub, admin = chain
    token = admin.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="north",
        role=ROLE.OPERATOR_ROLE_REGION_MANAGER, region_ids=[1]), metadata=admin.metadata)
    assert list(token.operator.region_ids) == [1] and not token.operator.store_ids
    north = bearer(token.token)
    number = open_card(stub, 11)
    today = day_of(top_up(stub, number, 50_000, 11).applied_at_us, *EAST)
    purchase(stub, number, 3_000, 21)
    assert close(admin, 11, today, metadata=north).figures.entries >= 2
    assert report(admin, today, today, store=12, metadata=north).rows
    assert tree(admin, north) == {1: [(11, "Harbin Central", EAST, 0), (12, "Changchun", None, 0)]}
    denied = (grpc.StatusCode.PERMISSION_DENIED, cpb.REASON_PERMISSION_DENIED)
    west_today = day_of(top_up(stub, number, 1, 21).applied_at_us, *WEST)
    assert refusal(lambda: close(admin, 21, west_today, metadata=north))[:2] == denied
    assert refusal(lambda: report(admin, today, today, store=21, metadata=north))[:2] == denied
    assert refusal(lambda: region_report(admin, 2, today, today, metadata=north))[:2] == denied
    # it may grant inside its regions only; an unknown region is refused
    sub = Admin(server.channel, token.token)
    sub.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="north-mgr",
        role=ROLE.OPERATOR_ROLE_STORE_MANAGER, region_ids=[1]), metadata=north)
    assert refusal(lambda: sub.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="south-mgr",
        role=ROLE.OPERATOR_ROLE_STORE_MANAGER, region_ids=[2]), metadata=north))[:2] == denied
    assert refusal(lambda: admin.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="nowhere",
        role=ROLE.OPERATOR_ROLE_STORE_MANAGER, region_ids=[9]), metadata=admin.metadata))[:2] \
        == (grpc.StatusCode.NOT_FOUND, cpb.REASON_REGION_NOT_FOUND)
    # store 11 moves to South: out of North's scope at once, the writer's check too
    put_store(admin, 11, "Harbin Central", 2, EAST)
    assert refusal(lambda: close(admin, 11, today - 1, metadata=north))[:2] == denied
    assert refusal(lambda: report(admin, today, today, store=11, metadata=north))[:2] == denied
    assert tree(admin, north) == {1: [(12, "Changchun", None, 0)]}
    code, out = operator_cli(server, "operators", "list")
    assert code == 0 and "north  region_manager  stores none  regions 1" in out, out


def region_report(admin: Admin, region: int, first: int, last: int, by: int = 1,
                  staff: bool = False, metadata=None):
    return admin.stub.GetReport(apb.GetReportRequest(
        region_id=region, from_day=date_text(first), to_day=date_text(last), granularity=by,
        staff=staff), metadata=metadata or admin.metadata)


def test_a_regions_report_is_the_sum_of_its_stores_reports(server, chain):
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 500_000, 11, staff=5)
    at = batch(stub, sales(number, (11, 12, 21, 11, 12)))[0].applied_at_us
    purchase(stub, number, 7_700, 12, staff=5)
    top_up(stub, number, 10_000, 12, staff=6)
    for store, amount in ((11, 2_500), (12, 4_000), (21, 900)):  # money held at each store
        request_id = rid()
        stub.Authorize(pb.AuthorizeRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), amount_minor=amount, till=till(store)))
    first, last = day_of(at, *WEST) - 1, day_of(at, *EAST) + 1
    region = region_report(admin, 1, first, last, staff=True)
    parts = [report(admin, first, last, store=s, staff=True) for s in (11, 12)]
    assert region.total.entries == sum(p.total.entries for p in parts) > 0
    for k, row in enumerate(region.rows):
        for field in ("entries", "principal_in_minor", "principal_out_minor",
                      "sales_gross_minor", "discount_minor", "tender_principal_minor",
                      "points_issued", "clearing_owes_minor", "clearing_owed_minor"):
            assert getattr(row.figures, field) == sum(getattr(p.rows[k].figures, field)
                                                      for p in parts), (row.period, field)
        want: dict[int, list[int]] = {}
        for p in parts:
            for op in p.rows[k].figures.operations:
                w = want.setdefault(op.operation_type, [0, 0])
                w[0] += op.count
                w[1] += op.amount_minor
        assert {o: list(v) for o, v in ops_of(row.figures).items()} == want
        assert row.holds_outstanding_minor == sum(p.rows[k].holds_outstanding_minor
                                                  for p in parts)
    assert region.rows[-1].holds_outstanding_minor == 2_500 + 4_000
    staff = {s.staff_id: (s.sales, s.sales_minor, s.top_ups, s.top_up_minor) for s in region.staff}
    assert staff[5][0] == 1 and staff[5][2] == 1 and staff[6][2:] == (1, 10_000)
    # South is not North's
    south = region_report(admin, 2, first, last)
    assert south.total.sales_gross_minor == 1_002
    assert refusal(lambda: region_report(admin, 9, first, last))[:2] == (
        grpc.StatusCode.NOT_FOUND, cpb.REASON_REGION_NOT_FOUND)
    # the CLI's CSV is the same figures
    code, out = operator_cli(server, "report", "--region", "1", "--from", date_text(first),
                             "--to", date_text(last), "--csv")
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["sales_gross_minor"]) for r in rows] == [
        r.figures.sales_gross_minor for r in region.rows]


def by_store(admin: Admin, metadata=None, **fields):
    """GetReport by_store: ({store: (name, figures)}, the answer)."""
    answer = admin.stub.GetReport(apb.GetReportRequest(by_store=True, **fields),
                                  metadata=metadata or admin.metadata)
    return {s.store_id: (s.name, s.figures) for s in answer.stores}, answer


def test_a_report_by_store_lists_each_store_of_its_scope_and_counts_last_days_from_today(
        server, chain):
    """by_store: each store with entries in the range, named from the registry (an unregistered
    store too, unnamed), its figures its own report's total; a region's and an operator's scope
    list only theirs, and the scope's rows are its stores' sum; last_days ends at the store's
    (or the program's) business day now."""
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 500_000, 11)
    at = batch(stub, sales(number, (11, 12, 21, 30, 12)))[0].applied_at_us
    first, last = day_of(at, *WEST) - 1, day_of(at, *EAST) + 1
    span = {"from_day": date_text(first), "to_day": date_text(last)}
    listed, whole = by_store(admin, chain=True, **span)
    assert sorted(listed) == [0, 11, 12, 21, 30]  # 0: head office's own entries (the puts)
    assert [listed[s][0] for s in (0, 11, 12, 21, 30)] == [
        "", "Harbin Central", "Changchun", "Guangzhou Tianhe", ""]
    assert ops_of(listed[0][1]).get(L.OP_STORE_PUT) == (3, 0)
    for s in (0, 11, 12, 21, 30):
        assert listed[s][1] == report(admin, first, last, store=s).total, s
    assert listed[12][1].sales_gross_minor == 1_001 + 1_004
    chain_report = report(admin, first, last)
    assert whole.total == chain_report.total and whole.rows == chain_report.rows
    assert (whole.from_day, whole.to_day, whole.stores_truncated) == (
        date_text(first), date_text(last), False)
    north, _ = by_store(admin, region_id=1, **span)
    assert sorted(north) == [11, 12]
    # an operator's own scope: a region manager of North, a store manager of store 30
    token = admin.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="north-by-store",
        role=ROLE.OPERATOR_ROLE_REGION_MANAGER, region_ids=[1]), metadata=admin.metadata).token
    assert refusal(lambda: by_store(admin, bearer(token), store_id=21, **span))[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT, cpb.REASON_INVALID_ARGUMENT, "store_id")
    mine, answer = by_store(admin, bearer(token), **span)
    assert sorted(mine) == [11, 12]
    assert answer.total.sales_gross_minor == (
        listed[11][1].sales_gross_minor + listed[12][1].sales_gross_minor)
    assert answer.total.entries == listed[11][1].entries + listed[12][1].entries
    manager = admin.add_operator("mgr30", ROLE.OPERATOR_ROLE_STORE_MANAGER, [30])
    mine, _ = by_store(admin, bearer(manager), **span)
    assert list(mine) == [30] and mine[30][1].sales_gross_minor == 1_003
    cashier = admin.add_operator("cash30", ROLE.OPERATOR_ROLE_CASHIER, [30])
    assert refusal(lambda: by_store(admin, bearer(cashier), **span))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, cpb.REASON_PERMISSION_DENIED)
    assert refusal(lambda: by_store(admin, bearer(manager), chain=True, **span))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, cpb.REASON_PERMISSION_DENIED)
    # last_days: N business days up to today's, the store's own clock for one store's report
    for fields, clock in (({"store_id": 11}, EAST), ({"store_id": 12}, (480, 4)),
                          ({"chain": True}, (480, 4))):
        before = day_of(time.time_ns() // 1000, *clock)
        answer = admin.stub.GetReport(apb.GetReportRequest(last_days=3, **fields),
                                      metadata=admin.metadata)
        after = day_of(time.time_ns() // 1000, *clock)
        today = {date_text(before), date_text(after)}
        assert answer.to_day in today and len(answer.rows) == 3, fields
        assert answer.from_day == date_text(day_of_text(answer.to_day) - 2)
    today_only, answer = by_store(admin, chain=True, last_days=1)
    assert answer.from_day == answer.to_day and len(answer.rows) == 1
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, cpb.REASON_INVALID_ARGUMENT)
    assert refusal(lambda: by_store(admin, chain=True, last_days=1,
                                    from_day=span["from_day"]))[:2] == invalid
    assert refusal(lambda: by_store(admin, chain=True, last_days=3661))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT, cpb.REASON_REPORT_RANGE_INVALID)
    # the CLI: the same stores, as a table and as CSV
    code, out = operator_cli(server, "report", "--by-store", "--from", span["from_day"],
                             "--to", span["to_day"], "--csv", token=manager)
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out.split("\n\n")[-1])))
    assert [(r["store_id"], int(r["sales_gross_minor"])) for r in rows] == [("30", 1_003)]
    code, out = operator_cli(server, "report", "--chain", "--by-store", "--last-days", "30")
    assert code == 0 and "Harbin Central" in out and "head office" in out, out
    code, out = operator_cli(server, "report", "--chain", "--last-days", "3", "--from",
                             span["from_day"])
    assert code == 2 and "--last-days" in out, out


def test_a_close_of_a_store_nobody_knows_is_refused(server, chain):
    """CloseDay of a store neither registered nor ever in an entry (a mistyped id) is refused
    and journals nothing; a registered store without entries, and an unregistered store with a
    sale (stores were bare numbers before the registry), close."""
    stub, admin = chain
    today = day_of(time.time_ns() // 1000)
    before = len(journal_entries(server.data_dir))
    assert refusal(lambda: close(admin, 999, today))[:3] == (
        grpc.StatusCode.NOT_FOUND, cpb.REASON_STORE_NOT_FOUND, "store_id")
    assert len(journal_entries(server.data_dir)) == before
    assert close(admin, 12, today).store_id == 12
    number = open_card(stub, 11)
    top_up(stub, number, 5_000, 11)
    purchase(stub, number, 700, 998)
    day = day_of(purchase(stub, number, 1, 998).applied_at_us)
    assert ops_of(close(admin, 998, day).figures)[L.OP_PURCHASE] == (2, 701)


def test_a_scope_report_sums_every_store_of_the_scope_and_an_empty_one_is_empty(server, chain):
    """A store of the scope without entries in the range is not listed but still counts: the
    money its open hold holds is in the scope's holds outstanding. A scope whose stores have no
    record at all answers empty figures (no store listed, nothing summed)."""
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 50_000, 11)
    request_id = rid()
    held = stub.Authorize(pb.AuthorizeRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), amount_minor=2_500, till=till(21)))
    at = purchase(stub, number, 700, 11).applied_at_us
    east, west = day_of(at, *EAST), day_of(held.applied_at_us, *WEST)
    assert east > west
    manager = admin.add_operator("mgr-11-21", ROLE.OPERATOR_ROLE_STORE_MANAGER, [11, 21])
    listed, answer = by_store(admin, bearer(manager), from_day=date_text(east),
                              to_day=date_text(east))
    assert list(listed) == [11]  # store 21's entries are on its own (earlier) day
    assert answer.rows[-1].holds_outstanding_minor == 2_500 == report(
        admin, east, east, store=21).rows[-1].holds_outstanding_minor
    nobody = admin.add_operator("mgr-40", ROLE.OPERATOR_ROLE_STORE_MANAGER, [40])
    listed, answer = by_store(admin, bearer(nobody), from_day=date_text(east),
                              to_day=date_text(east))
    assert listed == {} and answer.total.entries == 0
    assert [r.holds_outstanding_minor for r in answer.rows] == [0]


def day_of_text(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d")) // 86_400


def test_the_numbers_agree_with_the_proto():
    assert (L.OP_REGION_PUT, L.OP_STORE_PUT) == (cpb.OPERATION_TYPE_REGION_PUT,
                                                 cpb.OPERATION_TYPE_STORE_PUT)
    assert (L.R_REGION_NOT_FOUND, L.R_NAME_INVALID, L.R_UTC_OFFSET_INVALID,
            L.R_CUTOFF_HOUR_INVALID, L.R_CHAIN_ID_INVALID, L.R_CHAIN_TREE_FULL) == (
        cpb.REASON_REGION_NOT_FOUND, cpb.REASON_NAME_INVALID, cpb.REASON_UTC_OFFSET_INVALID,
        cpb.REASON_CUTOFF_HOUR_INVALID, cpb.REASON_CHAIN_ID_INVALID, cpb.REASON_CHAIN_TREE_FULL)
    assert L.OP_REGION_PUT in L.ADMIN_OPS and L.OP_STORE_PUT in L.ADMIN_OPS


def test_the_c_loop_follows_store_entries_as_the_reference_does(tmp_path):
    """Synthetic journals of sales and top-ups at four stores, with store entries that give
    stores a zone of their own or take it away, at times hours apart: the C loop's records equal
    the entry-by-entry reference's, written group by group (the registry kept as the writer
    keeps it) they equal one pass over them, and a fill from the journal's start makes them."""
    from hypothesis import given, settings, strategies as st

    from cardcore import stores

    ledger = Ledger(str(tmp_path / "ledger"), sync=False)
    base_us = 1_796_000_000_000_000
    zones = st.sampled_from((None, EAST, WEST, (0, 6), (330, 23)))
    sale = st.tuples(st.just("sale"), st.integers(0, 3), st.integers(0, 3),
                     st.sampled_from((-300, -100, 100, 500)), st.sampled_from((0, 0, 1, 2)))
    put = st.tuples(st.just("put"), st.integers(1, 3), zones, st.just(0), st.sampled_from((0, 0, 1)))

    def packed(k: int, f, ts_us: int) -> bytes:
        kind, store, x, dp, _ = f
        if kind == "put":
            op, subject, store, dp = L.OP_STORE_PUT, stores.store_subject(store, 0, x), 0, 0
        else:
            op, subject = (L.OP_TOP_UP if dp > 0 else L.OP_PURCHASE), bytes([x]) * 16
        return L.JOURNAL.pack(
            L.JOURNAL_VERSION, op, 0, 1, 0, 0, 0, k + 1, subject, abs(dp), 0, dp, 0, 0,
            1_000 + dp, 0, 0, ts_us, store, 0, 0, 0, bytes(8), 1, 0, bytes(3), 0, 0, 0, 0, 0, 0,
            bytes(48), bytes(32))

    def records(entries, native, cuts=(), from_start=False):
        with ledger.env.begin(write=True) as txn:
            for start, end in zip((0, *cuts), (*cuts, len(entries))):
                group = entries[start:end]
                totals = daytotals.DayTotals(txn, ledger, {}, from_start=from_start)
                totals.add_all(group, native=native)
                totals.write()
                for e in group:  # the registry, as AdminState.flush leaves it after the group
                    if e[1] == L.OP_STORE_PUT:
                        store, region, day = stores.subject_store(e[16:32])
                        txn.put(L.TERMINAL_KEY.pack(store),
                                stores.store_record(store, "s", region, day, 0, 0),
                                db=ledger.chain_stores)
            out = day_records(ledger, txn)
            txn.abort()
        return out

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.one_of(sale, put), min_size=1, max_size=40),
           st.lists(st.integers(1, 39), max_size=4))
    def check(fields, cuts):
        ts, entries = base_us, []
        for k, f in enumerate(fields):
            ts += f[4] * 5 * 3_600_000_000  # 0, 5 or 10 hours on: days differ by zone
            entries.append(packed(k, f, ts))
        cuts = sorted({c for c in cuts if c < len(entries)})
        run_min = daytotals.NATIVE_RUN_MIN
        daytotals.NATIVE_RUN_MIN = 1
        try:
            once = records(entries, True)
            assert once == records(entries, False)
            assert once == records(entries, True, cuts) == records(entries, False, cuts)
            assert once == records(entries, True, from_start=True)
        finally:
            daytotals.NATIVE_RUN_MIN = run_min

    try:
        check()
    finally:
        ledger.close()


def test_the_writer_checks_puts_again_and_keeps_the_trees_limits(tmp_path, monkeypatch):
    """What the server refuses is refused by the writer too (a group log replayed, a tool), and
    the limits on regions and stores hold: refused puts write nothing, journal nothing."""
    import time

    from cardcore import stores
    from cardcore.idempotency import PendingOp

    monkeypatch.setattr(stores, "REGIONS_MAX", 2)
    monkeypatch.setattr(stores, "STORES_MAX", 2)
    ledger = Ledger(str(tmp_path / "ledger"), sync=False)

    def region(rid, name=b"R"):
        return PendingOp.admin(b"", L.OP_REGION_PUT, stores.region_subject(rid), name, 0)

    def store(sid, rid=0, day=None, name=b"S"):
        return PendingOp.admin(b"", L.OP_STORE_PUT, stores.store_subject(sid, rid, day), name, 0)

    try:
        head = ledger.next_seq
        outcomes = ledger.apply_group(
            [region(1), region(2), region(3), region(1, "北".encode()), region(0), region(2, b""),
             store(5, 1), store(6, 9), store(7, 0, (900, 4)), store(7, 0, (60, 24)),
             store(0), store(7, 2, None, b"x" * 65), store(7, 2), store(8), store(5, 2, (0, 0))],
            time.time_ns() // 1000)
        assert [o.reason for o in outcomes] == [
            L.R_OK, L.R_OK, L.R_CHAIN_TREE_FULL, L.R_OK, L.R_CHAIN_ID_INVALID, L.R_NAME_INVALID,
            L.R_OK, L.R_REGION_NOT_FOUND, L.R_UTC_OFFSET_INVALID, L.R_CUTOFF_HOUR_INVALID,
            L.R_CHAIN_ID_INVALID, L.R_NAME_INVALID, L.R_OK, L.R_CHAIN_TREE_FULL, L.R_OK]
        assert ledger.next_seq - head == 6  # the applied ones only
        regions, stored = ledger.read_tree()
        assert [(r["region_id"], r["name"]) for r in regions] == [(1, "北"), (2, "R")]
        assert [(s["store_id"], s["region_id"], s["day"]) for s in stored] == [
            (5, 2, (0, 0)), (7, 2, None)]
        assert ledger.read_region_stores(1) == [] and ledger.read_region_stores(2) == [5, 7]
        with ledger.env.begin() as txn:
            assert stores.check(txn, ledger) == []
    finally:
        ledger.close()


# ---- found by a review -----------------------------------------------------------------------

def _stream_sale(number: str, store: int) -> pb.Operation:
    request_id = rid()
    return pb.Operation(purchase=pb.PurchaseRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), gross_amount_minor=100, till=till(store)))


def test_a_stream_follows_a_store_moved_into_the_operators_region(server, chain):
    """A region-1 cashier's SwipeStream: store 21 moved into region 1 mid-stream is in its scope
    from then on, in the stream as in a fresh unary call (the operator looked up again is the
    one the registry's reload made, not merely an equal one)."""
    import queue

    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 100_000, 11)
    token = admin.stub.AddOperator(apb.AddOperatorRequest(
        request_id=rid(), client_time_us=sent_at(rid()), name="northcash",
        role=ROLE.OPERATOR_ROLE_CASHIER, region_ids=[1]), metadata=admin.metadata).token
    sent: queue.Queue = queue.Queue()

    def operations():
        while (item := sent.get()) is not None:
            yield item

    replies = pb_grpc.CardServiceStub(server.channel).SwipeStream(operations(),
                                                                  metadata=bearer(token))
    try:
        sent.put(_stream_sale(number, 12))
        assert next(replies).reason == cpb.REASON_OK
        sent.put(_stream_sale(number, 21))
        assert next(replies).reason == cpb.REASON_PERMISSION_DENIED  # 21 is South's
        put_store(admin, 21, "Guangzhou Tianhe", 1)  # now North's
        sent.put(_stream_sale(number, 21))
        assert next(replies).reason == cpb.REASON_OK
        put_store(admin, 21, "Guangzhou Tianhe", 2)  # and back
        sent.put(_stream_sale(number, 21))
        assert next(replies).reason == cpb.REASON_PERMISSION_DENIED
    finally:
        sent.put(None)
        list(replies)


def test_a_repeated_close_answers_alike_however_the_writer_groups_it(tmp_path):
    """Put store 5 on UTC+14, close its day, move it to UTC-12, close that day again: in one
    group or one group each, the second close is "closed before" (OK), not "not started"."""
    import time

    from cardcore import stores
    from cardcore.idempotency import PendingOp

    now = time.time_ns() // 1000
    east = daytotals.business_day(now, *EAST)
    ops = [PendingOp.admin(b"", L.OP_STORE_PUT, stores.store_subject(5, 0, EAST), b"S", 0),
           PendingOp.admin(b"", L.OP_CLOSE_DAY, daytotals.close_subject(5, east), b"", 0),
           PendingOp.admin(b"", L.OP_STORE_PUT, stores.store_subject(5, 0, WEST), b"S", 0),
           PendingOp.admin(b"", L.OP_CLOSE_DAY, daytotals.close_subject(5, east), b"", 0)]
    together = Ledger(str(tmp_path / "together"), sync=False)
    apart = Ledger(str(tmp_path / "apart"), sync=False)
    try:
        assert [o.reason for o in together.apply_group(ops, now)] == [L.R_OK] * 4
        assert [apart.apply_group([PendingOp.admin(b"", o.packed[0], o.card_id, o.payload, 0)],
                                  now + k)[0].reason for k, o in enumerate(ops)] == [L.R_OK] * 4
        for ledger in (together, apart):
            with ledger.env.begin() as txn:
                assert daytotals.check(txn, ledger) == [] and stores.check(txn, ledger) == []
    finally:
        together.close()
        apart.close()


def _hold(stub, number: str, amount: int, store: int):
    request_id = rid()
    return stub.Authorize(pb.AuthorizeRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), amount_minor=amount, till=till(store)))


def test_holds_outstanding_after_a_store_moves_its_clock_back(server, chain):
    """Store 11 (UTC+14) holds 2,500, closes its day E, moves to UTC-12 and holds 1,000 more,
    which lands on an earlier, open day W. The closed day answers what its close kept (2,500);
    the day after holds both (3,500) whatever day a report starts on; the region's rows are the
    sum of its stores'."""
    stub, admin = chain
    number = open_card(stub, 11)
    top_up(stub, number, 500_000, 11)
    east = day_of(_hold(stub, number, 2_500, 11).applied_at_us, *EAST)
    close(admin, 11, east)
    put_store(admin, 11, "Harbin Central", 1, WEST)
    west = day_of(_hold(stub, number, 1_000, 11).applied_at_us, *WEST)
    assert west < east
    rows = report(admin, west, east + 1, store=11).rows
    assert rows[-2].holds_outstanding_minor == 2_500 and rows[-1].holds_outstanding_minor == 3_500
    assert report(admin, east + 1, east + 1, store=11).rows[0].holds_outstanding_minor == 3_500
    region = region_report(admin, 1, west, east + 1).rows
    parts = [report(admin, west, east + 1, store=s).rows for s in (11, 12)]
    assert [r.holds_outstanding_minor for r in region] == [
        sum(p[k].holds_outstanding_minor for p in parts) for k in range(len(region))]
