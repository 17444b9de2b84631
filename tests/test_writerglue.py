"""The writer's per-operation glue in C (ext/writerglue.pyx) against the Python path it stands for.

The same random groups (purchases with and without lines, points offered and coupons, top-ups,
declines: insufficient funds, unknown cards, wrong PINs counted, PINs not set, coupons not
found; request ids repeated within a group and across groups, same payload and another; a
balance inquiry now and then, which C does not take, so its run falls back) are applied to two
ledgers made alike, one with ``ledger.GLUE_IN_C`` on and one with it off: every outcome, and
every record of every sub-database, must be the same.
"""
from __future__ import annotations

import os
import random
import struct
import tempfile
from array import array
from contextlib import contextmanager

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from cardcore import layout as L
from cardcore import ledger as ledger_module
from cardcore import lots
from cardcore.ext import writerglue
from cardcore.groups import GROUP_HEAD, NONE_LEN, OP_HEAD, decode_group, encode_group
from cardcore.idempotency import Outcome, PendingOp, pack_request_keys, unpack_request_keys
from cardcore.server import writer_proc
from cardcore.ledger import Ledger, history_items, items_of
from cardcore.verify import verify
from test_card_programs import FRESH, GROCERY, TOBACCO, example, line
from test_ledger import NOW, cid, key

NUMBERS = [f"62258800001{n:05d}" for n in range(7)]  # the last is never opened
PINNED = 3              # the first three cards have a PIN
PIN_RIGHT, PIN_WRONG, NO_PIN = bytes([7]) * 32, bytes([9]) * 32, bytes(32)
NO_PIN_ASKED = L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET  # a development till: no PIN entered
FRESH_10_OFF, COUPON_POINTS = 2, 500


@contextmanager
def glue(on: bool):
    was = ledger_module.GLUE_IN_C
    ledger_module.GLUE_IN_C = on
    try:
        yield
    finally:
        ledger_module.GLUE_IN_C = was


class Pair:
    """Two ledgers made alike: ``c`` applies groups with the C glue, ``py`` without."""

    def __init__(self, folder: str, program: str = "supermarket") -> None:
        self.program = program
        self.c, self.py = (Ledger(os.path.join(folder, name), initial_program=example(program),
                                  initial_time_us=NOW - 1_000_000) for name in ("c", "py"))
        self.at = NOW
        self.taken = 0  # runs the C glue took

    def apply(self, ops: list[PendingOp]) -> list:
        self.at += 1_000
        with glue(True):
            got = self.c.apply_group(ops, self.at)
        with glue(False):
            want = self.py.apply_group(ops, self.at)
        assert got == want
        return got

    def close(self) -> None:
        self.c.close()
        self.py.close()


def setup(pair: Pair) -> int:
    """Cards opened (the first PINNED with a PIN), topped up and given points (700 each: a
    purchase of 600.00 and the welcome's 100), the first a coupon bought with 500 of them; the
    coupon's serial (none, 0, on a program other than the supermarket's, which sells none for
    points). A card's third such purchase lifts it to silver (rule 8)."""
    at = pair.at + 1_000
    pins = [(L.PIN_PRESENTED | L.PIN_REQUIRED, PIN_RIGHT) if n < PINNED else (NO_PIN_ASKED, NO_PIN)
            for n in range(len(NUMBERS) - 1)]
    opened = pair.apply([PendingOp.build(key(f"open-{n}"), L.OP_OPEN, cid(number), profile=b"{}",
                                         pin_flags=L.NEW_PIN if n < PINNED else 0,
                                         new_pin_check=PIN_RIGHT if n < PINNED else NO_PIN,
                                         client_time_us=at)
                         for n, number in enumerate(NUMBERS[:-1])]
                        + [PendingOp.build(key(f"top-{n}"), L.OP_TOP_UP, cid(number), 300_000,
                                           store_id=3, client_time_us=at)
                           for n, number in enumerate(NUMBERS[:-1])]
                        + [PendingOp.build(key(f"earn-{n}"), L.OP_PURCHASE, cid(number), 60_000,
                                           store_id=3, pin_flags=pins[n][0], pin_check=pins[n][1],
                                           client_time_us=at)
                           for n, number in enumerate(NUMBERS[:-1])])
    assert all(o.reason == L.R_OK for o in opened), [o.reason for o in opened]
    if pair.program != "supermarket":
        return 0
    (coupon,) = pair.apply([PendingOp.build(
        key("coupon"), L.OP_COUPON_ISSUE, cid(NUMBERS[0]), 0, store_id=3, ref_id=FRESH_10_OFF,
        redeem_points=COUPON_POINTS, pin_flags=L.PIN_PRESENTED | L.PIN_REQUIRED,
        pin_check=PIN_RIGHT, client_time_us=pair.at + 1_000)])
    assert coupon.reason == L.R_OK, coupon.reason
    return struct.unpack_from("<Q", coupon.entry, L.JOURNAL_OFF_SEQ)[0]


# An operation, as drawn: what it is; turned into a PendingOp at its group's time.
purchase = st.tuples(st.just("purchase"), st.integers(0, len(NUMBERS) - 1),
                     st.sampled_from([100, 2_999, 15_000, 60_000, 150_000, 250_000]),
                     st.lists(st.tuples(st.sampled_from([0, FRESH, GROCERY, TOBACCO, 9]),
                                        st.integers(1, 90_000)), max_size=3),
                     st.sampled_from([0, 0, 100, 300, 1_000]),          # points offered
                     st.sampled_from(["fits"] * 4 + ["none", "right", "wrong"]),  # the PIN
                     st.sampled_from(["none", "none", "none", "ours", "bogus"]),  # a coupon
                     st.integers(0, 24))                                 # the request id
top_up = st.tuples(st.just("top_up"), st.integers(0, len(NUMBERS) - 1),
                   st.sampled_from([1, 5_000, 300_000, 600_000]), st.integers(0, 24))
inquiry = st.tuples(st.just("inquiry"), st.integers(0, len(NUMBERS) - 1), st.just(24))
again = st.tuples(st.just("again"), st.integers(0, 10_000))  # an earlier operation, re-sent
# mostly purchases; an inquiry (which C does not take: its run falls back) one in twenty
operation = st.sampled_from(["purchase"] * 12 + ["top_up"] * 5 + ["again"] * 2 + ["inquiry"]).flatmap(
    {"purchase": purchase, "top_up": top_up, "again": again, "inquiry": inquiry}.__getitem__)
groups = st.lists(st.lists(operation, min_size=1, max_size=14), min_size=1, max_size=4)


def build(drawn: tuple, at: int, serial: int, fresh: int) -> PendingOp:
    """``drawn`` at client time ``at``; a request id from a small pool (8: repeats, most with
    another payload) or a fresh one."""
    kind = drawn[0]
    rid = f"r{drawn[-1]}" if drawn[-1] < 8 else f"fresh-{fresh}"
    card = cid(NUMBERS[drawn[1]])
    if kind == "top_up":
        return PendingOp.build(key(rid), L.OP_TOP_UP, card, drawn[2], store_id=3,
                               client_time_us=at)
    if kind == "inquiry":
        return PendingOp.build(b"", L.OP_BALANCE_INQUIRY, card, store_id=3,  # no request id
                               pin_flags=NO_PIN_ASKED, client_time_us=at,
                               caller=(L.CALLER_DEVELOPMENT, 0))
    _, _, amount, lines, redeem, pin, coupon, _ = drawn
    packed = b"".join(line(code, value) for code, value in lines)
    gross = sum(value for _, value in lines) if lines else amount
    if pin == "fits":  # what the card asks for
        pin = "right" if drawn[1] < PINNED else "none"
    flags, check = {"none": (NO_PIN_ASKED, NO_PIN),
                    "right": (L.PIN_PRESENTED | L.PIN_REQUIRED, PIN_RIGHT),
                    "wrong": (L.PIN_PRESENTED | L.PIN_REQUIRED, PIN_WRONG)}[pin]
    ref = {"none": 0, "ours": serial, "bogus": serial + 999}[coupon]
    return PendingOp.build(key(rid), L.OP_PURCHASE, card, gross, store_id=3, pin_flags=flags,
                           pin_check=check, lines=packed, redeem_points=redeem, ref_id=ref,
                           client_time_us=at)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups)
def test_the_c_glue_leaves_the_ledger_the_python_path_leaves(drawn_groups):
    check(drawn_groups, "supermarket")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups)
def test_likewise_under_a_program_that_reviews_tiers_and_promotes_top_ups(drawn_groups):
    """The salon's program: every card's program state read and written (rule 11), top-up
    promotions and upgrades by top-up, no points."""
    check(drawn_groups, "salon")


def check(drawn_groups: list, program: str) -> None:
    """``drawn_groups`` applied to a Pair on ``program`` after ``setup``: the same outcomes,
    the same records in every sub-database, and verify clean."""
    taken = [0]
    finish_run = writerglue.finish_run

    def counted(*args):
        done = finish_run(*args)
        if done is not None:
            taken[0] += 1
            for what, took in (("lines", args[4]), ("lots moved", done[2]),
                               ("an upgrade", done[3])):
                if took:
                    event(f"C took a run with {what}")
        return done

    with tempfile.TemporaryDirectory() as folder:
        pair = Pair(folder, program)
        writerglue.finish_run = counted
        try:
            serial = setup(pair)
            sent: list[PendingOp] = []
            for drawn_ops in drawn_groups:
                at = pair.at + 1_000
                ops = [sent[d[1] % len(sent)] if d[0] == "again" and sent
                       else build(d if d[0] != "again" else ("top_up", 0, 1, 12), at, serial,
                                  len(sent) + k)
                       for k, d in enumerate(drawn_ops)]
                sent.extend(ops)
                pair.apply(ops)
            assert pair.c.dump() == pair.py.dump()
            report = verify(pair.c)
            assert report["ok"], report["problems"]
        finally:
            writerglue.finish_run = finish_run
            pair.close()
    event(f"runs taken by C: {min(taken[0], 3)}{'+' if taken[0] >= 3 else ''}")


def test_a_run_of_every_kind_c_takes_goes_through_c(tmp_path):
    """What the C glue takes does go through it (so the test above compares something), with
    the same outcomes and records as the Python path: plain purchases and top-ups, a basket
    paying with points and its coupon that lifts the card a tier, a wrong PIN counted, too
    little money, an unknown card."""
    taken = []
    finish_run = writerglue.finish_run

    def kept(*args):
        done = finish_run(*args)
        taken.append(done and (*done[:1], dict(done[1]), *done[2:]))  # the ledger empties gains
        return done

    writerglue.finish_run = kept
    pair = Pair(str(tmp_path))
    try:
        serial = setup(pair)
        taken.clear()
        at = pair.at + 1_000
        plain = [PendingOp.build(key(f"g-{k}"), L.OP_PURCHASE if k % 3 else L.OP_TOP_UP,
                                 cid(NUMBERS[PINNED + k % 3]), 1_000 + k, store_id=3,
                                 pin_flags=NO_PIN_ASKED, client_time_us=at)
                 for k in range(30)]
        basket = build(("purchase", 0, 0, [(FRESH, 100_000), (GROCERY, 50_000)], 100, "right",
                        "ours", 30), at, serial, 30)
        declines = [build(("purchase", 1, 2_000, [], 0, "wrong", "none", 31), at, serial, 31),
                    build(("purchase", PINNED, 400_000, [], 0, "none", "none", 32), at, serial, 32),
                    build(("purchase", 6, 2_000, [], 0, "none", "none", 33), at, serial, 33)]
        more = build(("top_up", 0, 100_000, 34), at, serial, 34)  # for the basket, which
        # pays 147,900 (150,000 less 2,000 its coupon takes off and 100 its points pay): the
        # card has paid 207,900 in all, past silver's 200,000; (the one below, too little)
        outcomes = pair.apply(plain + [more, basket] + declines)
        assert [o.reason for o in outcomes] == [L.R_OK] * 32 + [
            L.R_PIN_WRONG, L.R_INSUFFICIENT_FUNDS, L.R_CARD_NOT_FOUND]
        assert len(taken) == 1 and taken[0] is not None
        _, gains, moves, upgrades = taken[0]
        assert list(gains.values()) == [100, 100]  # the plain purchases' cards: 10 x 10 points
        assert [(card, loss) for card, _, _, loss in moves] == [(cid(NUMBERS[0]), 100)]
        assert upgrades == [(0, 1)]
        assert outcomes[31].lines  # the basket's, filled
        assert struct.unpack_from("<Q", outcomes[32].entry, L.JOURNAL_OFF_SEQ)[0]  # a wrong PIN: journaled
        assert pair.c.dump() == pair.py.dump()
    finally:
        writerglue.finish_run = finish_run
        pair.close()


def test_the_c_constants_are_the_layouts():
    names = {"JOURNAL_OFF_SEQ", "JOURNAL_OFF_REASON", "JOURNAL_OFF_TS", "JOURNAL_OFF_LINES_DIGEST",
             "OP_SIZE", "JOURNAL_SIZE", "CARD_SIZE", "IDEM_SIZE", "LINE_SIZE", "CARD_ID_SIZE",
             "LINES_DIGEST_SIZE", "IDEM_VERSION", "OP_TOP_UP", "OP_PURCHASE", "R_OK",
             "R_INSUFFICIENT_FUNDS", "R_CAPTURE_EXCEEDS_HOLD", "OP_REVERSAL", "CAPTURE",
             "OP_PACKAGE_USE", "OP_GIFT_REDEEM", "OP_REFUND", "OP_HOLD_VOID", "OP_HOLD_EXPIRED",
             "SLOT_NONE"}
    assert {n: getattr(L, n) for n in names} == {n: writerglue.SIZES[n] for n in names}
    assert writerglue.SIZES["CARD_ENTRY_KEY_SIZE"] == L.CARD_ENTRY_KEY.size
    assert writerglue.SIZES["COUPON_KEY_SIZE"] == L.COUPON_KEY.size
    assert writerglue.SIZES["CARD_ENTRY_SIZE"] == L.CARD_ENTRY.size
    assert writerglue.SIZES["GROUP_HEAD_SIZE"] == GROUP_HEAD.size
    assert writerglue.SIZES["OP_HEAD_SIZE"] == OP_HEAD.size
    assert writerglue.NONE_LEN == NONE_LEN
    assert writerglue.SIZES["ANSWER_SIZE"] == writer_proc.ANSWER.size
    assert writerglue.SIZES["ENTRY_HEAD_SIZE"] == writer_proc.ENTRY_HEAD_SIZE


@given(st.lists(st.tuples(st.sampled_from([L.OP_TOP_UP, L.OP_PURCHASE, L.OP_REFUND, L.OP_REVERSAL,
                                           L.OP_HOLD, L.OP_HOLD_EXPIRED]),
                          st.sampled_from([0, L.CAPTURE, 1]), st.integers(0, 5)), max_size=30))
def test_the_card_slots_in_c_are_the_run_loops(drawn):
    """Each operation's card slot, in the order the run first names the cards, and whether an
    operation of the run changes a hold (a capture, a reversal or any type after it), as the
    Python loop of ``_flush_run`` finds them."""
    ops = [PendingOp.build(b"", kind, cid(NUMBERS[card]), 100, op_flags=flags,
                           caller=(L.CALLER_SYSTEM, 0)) for kind, flags, card in drawn]
    slots = array("I", [0]) * len(ops)
    cards, hold_run = writerglue.card_slots(b"".join(op.packed for op in ops), slots)
    assert cards == list(dict.fromkeys(op.card_id for op in ops))
    assert list(slots) == [cards.index(op.card_id) for op in ops]
    assert hold_run == any(kind >= L.OP_REVERSAL or flags & L.CAPTURE for kind, flags, _ in drawn)


def test_the_runs_that_name_no_item_are_the_ones_items_of_finds_none_for(tmp_path):
    """writerglue.names_items, the look before ``items_of``: for every card operation, with and
    without a reference and a capture flag, it says whether ``items_of`` gives it a slot."""
    led = Ledger(str(tmp_path / "l"), initial_program=example("supermarket"))
    try:
        with led.env.begin() as txn:
            for kind in sorted(L.CARD_OPS):
                for ref, flags in ((0, 0), (5, 0), (0, L.CAPTURE), (0, 1)):
                    op = PendingOp.build(b"", kind, cid(NUMBERS[0]), 100, ref_id=ref,
                                         link_seq=3, op_flags=flags, caller=(L.CALLER_SYSTEM, 0))
                    slots, _, _ = items_of(txn, led, [op], [(None, bytes(64), None)])
                    assert writerglue.names_items(op.packed) == (slots[0] != L.SLOT_NONE), \
                        (kind, ref, flags)
    finally:
        led.close()


def test_the_runs_c_reads_the_coupons_of_are_the_ones_items_of_finds_only_coupons_for(tmp_path):
    """writerglue.coupon_items, ``items_of``'s loop in C: for every card operation, with and
    without a reference and a capture flag, alone and in runs of two, it either leaves the run to
    the Python loop (an operation names a record other than a purchase's coupon) or gives the
    slots and keys the loop gives; and ``items_of`` with it reads what it reads without. Runs of
    two on two cards and on one (one coupon named twice: one slot), over stored coupons (the
    records read must be theirs, not an empty one's)."""
    led = Ledger(str(tmp_path / "l"), initial_program=example("supermarket"))
    kinds = [(kind, ref, flags) for kind in sorted(L.CARD_OPS)
             for ref, flags in ((0, 0), (5, 0), (0, L.CAPTURE), (0, 1), (7, 0))]
    with led.env.begin(write=True) as txn:  # coupons 5 and 7 on both cards, each its own bytes
        for n in range(2):
            for serial in (5, 7):
                txn.put(L.COUPON_KEY.pack(cid(NUMBERS[n]), serial),
                        bytes([n * 16 + serial]) * L.COUPON_SIZE, db=led.coupons)
    try:
        with led.env.begin() as txn:
            runs = [([k], 0) for k in kinds] + [([a, b], one) for a in kinds for b in kinds
                                                for one in (0, 1)]
            for run, one_card in runs:
                ops = [PendingOp.build(b"", kind, cid(NUMBERS[0 if one_card else n % 2]), 100,
                                       ref_id=ref, link_seq=3, op_flags=flags,
                                       caller=(L.CALLER_SYSTEM, 0))
                       for n, (kind, ref, flags) in enumerate(run)]
                undo = [(None, bytes(64), None)] * len(ops)
                want = items_of(txn, led, ops, undo)
                packed = b"".join(op.packed for op in ops)
                slots = array("I", [0]) * len(ops)
                located = writerglue.coupon_items(packed, slots, led.coupons)
                only_coupons = all(db is led.coupons for db, _ in want[1])
                assert (located is not None) == only_coupons, run
                if located is not None:
                    assert (list(slots), located) == (list(want[0]), want[1]), run
                assert items_of(txn, led, ops, undo, packed) == want, run
    finally:
        led.close()


@given(st.lists(st.tuples(st.binary(min_size=24, max_size=24), st.binary(min_size=4, max_size=4),
                          st.integers(0, 1)), max_size=20))
def test_the_coupons_written_back_in_c_are_the_run_loops(drawn):
    located = [(None if n % 2 else "coupons", key) for n, (key, _, _) in enumerate(drawn)]
    records = b"".join(fill * (L.COUPON_SIZE // 4) for _, fill, _ in drawn)
    dirty = bytes(d for _, _, d in drawn)
    assert writerglue.dirty_items(located, records, dirty, L.COUPON_SIZE) == [
        (*located[s], records[s * L.COUPON_SIZE:(s + 1) * L.COUPON_SIZE])
        for s in range(len(drawn)) if dirty[s]]


@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4),
                          st.integers(0, 3), st.integers(0, 9)), max_size=20))
def test_the_dirty_records_and_ended_cards_in_c_are_the_run_loops(drawn):
    ids = [card for card, _, _, _ in drawn]
    records = bytearray(len(drawn) * L.CARD_SIZE)
    for s, (_, fill, _, status) in enumerate(drawn):
        records[s * L.CARD_SIZE:(s + 1) * L.CARD_SIZE] = fill * (L.CARD_SIZE // 4)
        records[s * L.CARD_SIZE + 1] = status
    dirty = bytes(d for _, _, d, _ in drawn)
    live = bytes(status in L.STATUSES_LIVE for status in range(256))
    for bit in (1, 2):
        assert writerglue.dirty_records(ids, records, dirty, bit, L.CARD_SIZE) == [
            (ids[s], bytes(records[s * L.CARD_SIZE:(s + 1) * L.CARD_SIZE]))
            for s in range(len(ids)) if dirty[s] & bit]
    assert writerglue.ended_slots(records, dirty, 1, live) == [
        s for s in range(len(ids)) if dirty[s] & 1
        and records[s * L.CARD_SIZE + 1] not in L.STATUSES_LIVE]


@given(st.lists(st.binary(min_size=L.JOURNAL_SIZE, max_size=L.JOURNAL_SIZE), max_size=10),
       st.integers(1, 2**63))
def test_the_journal_items_in_c_are_the_writes(entries, first):
    assert writerglue.journal_items(b"".join(entries), first) == [
        (L.SEQ_KEY.pack(first + k), entry) for k, entry in enumerate(entries)]


extras = st.one_of(st.none(), st.binary(max_size=40))


@given(st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 2**32 - 1), extras, extras,
                          extras, st.integers(0, 255), st.integers(0, 3), st.integers(0, 2**32 - 1),
                          st.integers(0, 3), st.sampled_from([L.OP_PURCHASE, L.OP_OPEN, 40])),
                max_size=12),
       st.integers(-2**63, 2**63 - 1), st.integers(0, 40))
def test_a_group_decoded_in_c_is_the_pythons(drawn, ts_us, cut):
    """writerglue.decode_group against groups.decode_group: the same operations, field for
    field, of any group encode_group makes; a group cut short or with bytes left over is refused
    by both."""
    ops = []
    for k, (request, ksn, profile, sealed, payload, role, scope, store, lines,
            kind) in enumerate(drawn):
        packed = (PendingOp.build(b"", kind, cid(NUMBERS[k % 7]), k, caller=(1, 0),
                                  lines=bytes(64) * lines).packed if kind != 40
                  else bytes(range(160)) + bytes(2) + bytes(range(162, 192)))  # no lines
        ops.append(PendingOp(request, packed[40:56], packed, bytes(range(16)), profile, ksn, sealed,
                             payload, role, scope, store, bytes(64) * lines if kind != 40 else b""))
    data = encode_group(ops, ts_us)
    assert writerglue.decode_group(data, PendingOp) == decode_group(data) == (ops, ts_us)
    for bad in (data[:len(data) - 1 - cut] if len(data) > cut + 1 else b"", data + bytes(cut + 1)):
        with pytest.raises((ValueError, struct.error)):
            decode_group(bad)
        with pytest.raises(ValueError):
            writerglue.decode_group(bad, PendingOp)


outcome = st.builds(
    Outcome, st.sampled_from([L.R_OK, L.R_INSUFFICIENT_FUNDS, L.R_CARD_NOT_FOUND]), st.booleans(),
    st.sampled_from([L.OP_PURCHASE, L.OP_TOP_UP, L.OP_RESEAL]),
    st.one_of(st.none(), st.binary(min_size=256, max_size=256), st.binary(max_size=230)),
    st.integers(-2**63, 2**63 - 1), st.integers(0, 2**32 - 1),
    st.sampled_from([b"", bytes(range(64)), bytes(128)]), st.integers(-2**63, 2**63 - 1))


@given(st.lists(outcome, max_size=12))
def test_an_answer_encoded_in_c_is_the_pythons(outcomes):
    assert writerglue.encode_answer(outcomes) == writer_proc.encode_answer(outcomes)


_MOVE_FIELDS = st.integers(-10**6, 10**6)


@given(st.lists(st.tuples(_MOVE_FIELDS, _MOVE_FIELDS, st.integers(0, 10**6)), max_size=20))
def test_the_lots_movement_in_c_is_the_rules(fields):
    entries = bytearray(len(fields) * L.JOURNAL_SIZE)
    for k, (delta, after, taken) in enumerate(fields):
        struct.pack_into("<64xq16xq80xq", entries, k * L.JOURNAL_SIZE, delta, after, taken)
    for k in range(len(fields)):
        assert writerglue.lots_movement(entries, k * L.JOURNAL_SIZE) == \
            lots.movement(bytes(entries), k * L.JOURNAL_SIZE)


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(min_size=16, max_size=16),
                          st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1)), max_size=30))
def test_the_card_history_items_in_c_are_the_pythons(fields):
    entries = []
    for op, card, seq, ts in fields:
        e = bytearray(random.Random(seq).randbytes(L.JOURNAL_SIZE))
        e[1] = op
        e[16:32] = card
        struct.pack_into("<Q", e, L.JOURNAL_OFF_SEQ, seq)
        struct.pack_into("<q", e, L.JOURNAL_OFF_TS, ts)
        entries.append(bytes(e))
    mask = bytes(op in L.CARD_ENTRY_OPS for op in range(256))
    assert writerglue.history_items(b"".join(entries), mask) == history_items(entries)


@given(st.lists(st.binary(min_size=0, max_size=80).map(lambda b: b[:255]), max_size=40),
       st.binary(max_size=3))
def test_the_request_keys_unpacked_in_c_are_the_pythons(keys, tail):
    blob = pack_request_keys(keys)
    assert writerglue.unpack_request_keys(blob) == unpack_request_keys(blob) == keys
    cut = blob + tail  # a value cut short (never written so): the same reading
    assert writerglue.unpack_request_keys(cut) == unpack_request_keys(cut)


LOT_CARDS = [cid(number) for number in NUMBERS[:3]]
DAY0 = 20_000  # a day (UTC days since 1970) the drawn lots are earned from


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.tuples(st.integers(0, 2), st.integers(0, 5)),
                       st.tuples(st.integers(0, 900), st.integers(0, 300)), max_size=10),
       st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 0, 40]), st.integers(0, 600),
                          st.sampled_from([0, 0, 1, 100, 500, 1_500])), max_size=8),
       st.integers(2, 7))
def test_the_lots_moved_in_c_are_the_rules(tmp_path_factory, drawn_lots, moves, today):
    """writerglue.move_lots against lots.Lots.apply over the writer's store (the reference):
    from the same lots (several days a card, some today's, some spent to nothing), the same
    movements leave the same ``points_lots`` and ``lots_by_day``, and spending beyond a card's
    lots fails at the same movement, having written the same."""
    led = Ledger(str(tmp_path_factory.mktemp("lots") / "l"), initial_program=example("supermarket"))
    moves = [(LOT_CARDS[c], pending, gain, loss) for c, pending, gain, loss in moves]
    today += DAY0
    ts = today * L.DAY_US + 5_000_000

    def python(txn):
        store = ledger_module._LmdbLots(txn, led)
        for card_id, pending, gain, loss in moves:
            if pending:
                lots.Lots(store).apply(card_id, ts, pending, 0)
            lots.Lots(store).apply(card_id, ts, gain, loss)

    def in_c(txn):
        store = ledger_module._LmdbLots(txn, led)
        writerglue.move_lots(store.cursor, txn, store.db, store.by_day, moves, lots.day_of(ts))

    try:
        with led.env.begin(write=True) as txn:
            for (c, day), (left, more) in drawn_lots.items():
                txn.put(L.LOT_KEY.pack(LOT_CARDS[c], DAY0 + day), L.POINTS_LOT.pack(left, left + more),
                        db=led.points_lots)
                txn.put(L.LOT_DAY_KEY.pack(DAY0 + day, LOT_CARDS[c]), b"", db=led.lots_by_day)
        got = []
        for way in (python, in_c):
            txn = led.env.begin(write=True)
            try:
                failed = None
                try:
                    way(txn)
                except ValueError as exc:
                    failed = str(exc)
                got.append((failed, list(txn.cursor(db=led.points_lots)),
                            list(txn.cursor(db=led.lots_by_day))))
            finally:
                txn.abort()
        event(f"spent beyond the lots: {got[0][0] is not None}")
        assert got[1] == got[0]
    finally:
        led.close()


def test_the_lots_glue_refuses_what_the_kernel_never_makes(tmp_path):
    """move_lots: a negative movement or a card id that is not 16 bytes is refused (its
    subtractions could otherwise wrap round int64); dirty_items/dirty_records: a record size
    that does not divide the records into one a slot is refused (no read past the buffer)."""
    led = Ledger(str(tmp_path / "l"), initial_program=example("supermarket"))
    try:
        with led.env.begin(write=True) as txn:
            store = ledger_module._LmdbLots(txn, led)
            for moves in ([(LOT_CARDS[0], 0, 0, -1)], [(LOT_CARDS[0], -5, 0, 0)],
                          [(None, 0, 1, 0)], [(LOT_CARDS[0][:15], 0, 1, 0)]):
                with pytest.raises(ValueError):
                    writerglue.move_lots(store.cursor, txn, store.db, store.by_day, moves, DAY0)
            txn.abort()
        one = bytes(L.COUPON_SIZE)
        for size in (0, -L.COUPON_SIZE, L.COUPON_SIZE + 1):
            with pytest.raises(ValueError):
                writerglue.dirty_items([(None, b"k")], one, b"\x01", size)
            with pytest.raises(ValueError):
                writerglue.dirty_records([b"k"], one, b"\x01", 1, size)
    finally:
        led.close()
