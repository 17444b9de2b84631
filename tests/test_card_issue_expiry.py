"""Card life's issued and expired states (rule 14 of cardcore.rules): a card opened issued moves
nothing until an operator activates it; a card expires at the expiry fixed at its opening, the
server journals the change, and an expired card is only refunded and cancelled. Through the
real ledger on LMDB where the group's time must be chosen (months pass), the kernel and the
reference at the expiry's edge, and over gRPC against a real server."""
from __future__ import annotations

import datetime
import os

import grpc
import pytest

from cardcore import layout as L
from cardcore import rules
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger
from cardcore.program import parse_program
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from cardcore.verify import verify as verify_ledger
from conftest import Client, bearer, failure_of, new_card_number, sent_at, verify
from test_card_programs import CAFE_FOOD, Till, example, line
from test_kernel import IMPLS, card_bytes, op_bytes, run
from test_ledger import NOW, add_operator, cid, key, load, op
from test_refunds import refund, seq_of

R = cpb.Reason
HOUR_US = 3_600_000_000
ACTIVATION_POINTS = 50
# The cafe's program (bonus first; a first top-up of 300.00 gets 20.00) with cards valid one
# month and points for activating one. Top-level keys go before the document's first table.
PROGRAM = (f"card_valid_months = 1\nactivation_points = {ACTIVATION_POINTS}\n"
           "utc_offset_minutes = 480\n" + example("cafe"))
NOBODY = "6225880000009999"  # never opened: operations on it only move the ledger's clock
ALL = (L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST, L.STATUS_CLOSED, L.STATUS_ISSUED,
       L.STATUS_EXPIRED)


class LifeTill(Till):
    """Till on PROGRAM, without fsync: a month of hourly groups (a group's time moves at most
    an hour past the last) takes a second."""

    def __init__(self, path: str, program: str = PROGRAM) -> None:
        self.ledger = Ledger(path, initial_program=program, sync=False)
        self.at = NOW
        self.n = 0
        (added,) = self.apply(add_operator("op-1", "manager", 2, (3,), at=self.at + 1))
        assert added.reason == L.R_OK

    def open_issued(self, number: str):
        (outcome,) = self.apply(PendingOp.build(key(self.rid()), L.OP_OPEN, cid(number),
                                                profile=b"{}", op_flags=L.ISSUE_ONLY,
                                                client_time_us=self.at + 1))
        return outcome

    def set_status(self, number: str, status: int, at: int | None = None):
        when = max(self.at + 1, at or 0)
        return self.apply(op(self.rid(), L.OP_CARD_STATUS, number, 0, at=when, tier=status,
                             operator_id=1), at=when)[0]

    def walk(self, target_us: int) -> None:
        """Groups an hour apart until the ledger's time is ``target_us`` (each moves the clock
        with a top-up of a card that does not exist: declined, no entry)."""
        while self.at < target_us:
            step = min(target_us, self.at + HOUR_US)
            self.apply(op(self.rid(), L.OP_TOP_UP, NOBODY, 1, at=step), at=step)

    def status(self, number: str) -> int:
        return self.ledger.read_card(cid(number))[0][1]

    def expires(self, number: str) -> int:
        return L.CARD_EXPIRES.unpack_from(self.ledger.read_card(cid(number))[0][-1])[0]

    def points(self, number: str) -> int:
        return self.ledger.read_card(cid(number))[0][7]


@pytest.fixture
def life(tmp_path):
    till = LifeTill(str(tmp_path / "life"))
    yield till
    report = verify_ledger(till.ledger)
    till.ledger.close()
    assert report["ok"], report["problems"]


def entry_of(outcome) -> tuple:
    return L.JOURNAL.unpack(outcome.entry)


def server_changes(till: LifeTill, number: str) -> list[tuple]:
    """The card's status changes that no operator made (the server's expiries), as entries."""
    return [f for f in (L.JOURNAL.unpack(e) for _, e in till.ledger.dump()["journal"])
            if f[1] == L.OP_CARD_STATUS and f[8] == cid(number) and f[21] == 0]


# ---- issued -----------------------------------------------------------------------------------

def test_an_issued_card_moves_nothing_until_an_operator_activates_it(life):
    """A gift card opened issued: no activation points yet; a top-up or a purchase at the till
    is refused (CARD_NOT_ACTIVATED) and changes nothing. Operator 1 activates it: one entry
    naming the operator, issued -> active, with the program's 50 activation points. Then it is
    topped up; activated again (active -> active): ILLEGAL_TRANSITION."""
    number = "6225880000000701"
    opened = life.open_issued(number)
    assert (opened.reason, entry_of(opened)[3], entry_of(opened)[13]) == (
        L.R_OK, L.STATUS_ISSUED, 0)
    assert life.top_up(number, 30000).reason == L.R_CARD_NOT_ACTIVATED
    assert life.buy(number, line(CAFE_FOOD, 100)).reason == L.R_CARD_NOT_ACTIVATED
    assert life.card(number) == dict(tier=0, principal=0, bonus=0, points=0, lifetime=0)
    activated = life.set_status(number, L.STATUS_ACTIVE)
    f = entry_of(activated)
    assert (activated.reason, f[3], f[29], f[13], f[21]) == (
        L.R_OK, L.STATUS_ACTIVE, L.STATUS_ISSUED, ACTIVATION_POINTS, 1)
    assert life.points(number) == ACTIVATION_POINTS
    assert life.top_up(number, 30000).reason == L.R_OK
    assert life.set_status(number, L.STATUS_ACTIVE).reason == L.R_ILLEGAL_TRANSITION


def test_a_card_opened_active_gets_its_activation_points_at_opening_and_never_again(life):
    number = "6225880000000702"
    life.open(number)
    assert life.points(number) == ACTIVATION_POINTS
    assert life.set_status(number, L.STATUS_FROZEN).reason == L.R_OK
    assert life.set_status(number, L.STATUS_ACTIVE).reason == L.R_OK
    assert life.points(number) == ACTIVATION_POINTS  # unfrozen: no second activation


@pytest.mark.parametrize("wanted", ALL)
def test_every_change_from_issued_is_allowed_or_refused_as_rule_14_says(life, wanted):
    """issued -> active (activation) or closed (a stock card destroyed); the rest refused with
    the status it has in the answer (ILLEGAL_TRANSITION), changing nothing. Expired is never an
    operator's: refused before the card's expiry."""
    number = "6225880000000703"
    life.open_issued(number)
    outcome = life.set_status(number, wanted)
    if wanted in (L.STATUS_ACTIVE, L.STATUS_CLOSED):
        assert (outcome.reason, entry_of(outcome)[3], entry_of(outcome)[29]) == (
            L.R_OK, wanted, L.STATUS_ISSUED)
        assert life.status(number) == wanted
    else:
        assert (outcome.reason, entry_of(outcome)[3]) == (L.R_ILLEGAL_TRANSITION, L.STATUS_ISSUED)
        assert life.status(number) == L.STATUS_ISSUED and entry_of(outcome)[7] == 0


# ---- expiry -----------------------------------------------------------------------------------

def test_the_expiry_is_fixed_at_opening_a_calendar_month_on_at_the_chains_midnight(life):
    """Opened at the group's time T under card_valid_months = 1 and UTC+8: the record's expiry is
    the start (Beijing time) of the same day of the next month; a later program with cards valid
    12 months does not move it, and a card opened after that gets 12 months."""
    number, later = "6225880000000704", "6225880000000705"
    life.open(number)
    opened_us = life.ledger.read_card(cid(number))[0][11]
    expires = life.expires(number)
    assert expires == rules.card_expiry_us(opened_us, 1, 480)
    local = datetime.timezone(datetime.timedelta(hours=8))
    opened_day = datetime.datetime.fromtimestamp(opened_us / 1e6, local).date()
    at = datetime.datetime.fromtimestamp(expires / 1e6, local)
    assert (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0)
    assert (at.year * 12 + at.month) - (opened_day.year * 12 + opened_day.month) == 1
    assert at.day == min(opened_day.day, 28) or at.day == opened_day.day
    (loaded,) = life.apply(load(PROGRAM.replace("card_valid_months = 1", "card_valid_months = 12")))
    assert loaded.reason == L.R_OK
    life.open(later)
    assert life.expires(number) == expires
    assert life.expires(later) == rules.card_expiry_us(
        life.ledger.read_card(cid(later))[0][11], 12, 480)


@pytest.mark.parametrize("opened, months, offset, expires", [
    ("2026-01-31T10:00:00+00:00", 1, 0, "2026-02-28T00:00:00+00:00"),   # the month's last day
    ("2024-01-31T10:00:00+00:00", 1, 0, "2024-02-29T00:00:00+00:00"),   # a leap year's
    ("2026-12-15T23:59:59+00:00", 1, 0, "2027-01-15T00:00:00+00:00"),   # into the next year
    ("2026-03-15T20:00:00+00:00", 12, 480, "2027-03-15T16:00:00+00:00"),  # 04:00 on the 16th
    ("2026-03-15T15:59:59+00:00", 12, 480, "2027-03-14T16:00:00+00:00"),  # 23:59 on the 15th
    ("2026-05-31T12:00:00+00:00", 1200, -720, "2126-05-31T12:00:00+00:00"),  # 100 years, UTC-12
])
@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_an_opening_fixes_its_expiry_by_the_calendar(impl, opened, months, offset, expires):
    """The kernel and the reference give an opening the expiry rules.card_expiry_us gives."""
    def us(text: str) -> int:
        return int(datetime.datetime.fromisoformat(text).timestamp()) * 1_000_000

    program = rules.Program(tiers=(rules.Tier("t", 10000),), card_valid_months=months,
                            utc_offset_minutes=offset).packed(1)
    assert rules.card_expiry_us(us(opened), months, offset) == us(expires)
    _, rec, journal, _ = run(impl, program, op_bytes(L.OP_OPEN), [0], bytes(L.CARD_SIZE),
                             ts_us=us(opened))
    assert L.JOURNAL.unpack(journal)[4] == L.R_OK
    assert L.CARD_EXPIRES.unpack_from(rec, L.CARD_OFF_EXPIRES)[0] == us(expires)


EXPIRES_US = 1_800_000_000_000_000


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
@pytest.mark.parametrize("status", [L.STATUS_ACTIVE, L.STATUS_EXPIRED])
@pytest.mark.parametrize("kind", [L.OP_TOP_UP, L.OP_PURCHASE])
def test_a_card_is_expired_at_its_expiry_not_a_microsecond_later(impl, status, kind):
    """One microsecond before expires_us a card (stored active) is topped up and spent; at
    expires_us exactly it is expired, whatever the stored status says: CARD_EXPIRED, nothing
    changed. A card stored expired is refused at any time."""
    program = rules.DEFAULT_PROGRAM.packed(1)
    card = card_bytes(principal=10_000, status=status, expires_us=EXPIRES_US)
    for ts_us, ok in ((EXPIRES_US - 1, status == L.STATUS_ACTIVE), (EXPIRES_US, False),
                      (EXPIRES_US + 1, False)):
        _, rec, journal, _ = run(impl, program, op_bytes(kind, 100, pin_flags=L.PIN_OPTIONAL_UNSET),
                                 [0], card, ts_us=ts_us)
        reason = L.JOURNAL.unpack(journal)[4]
        assert reason == (L.R_OK if ok else L.R_CARD_EXPIRED)
        assert (rec == card) == (not ok)


def test_the_server_expires_a_card_first_in_the_group_at_its_expiry(life):
    """A card with 300.00 (and its 20.00 welcome bonus): 2 µs and 1 µs before expires_us it is
    topped up and spent. The group at expires_us exactly expires it first (an entry of the server's, operator
    0, active -> expired), so the top-up in that group is refused with CARD_EXPIRED, and so is
    a purchase after; the stored status is expired and the card leaves the expiry index."""
    number = "6225880000000706"
    life.open(number)
    life.top_up(number, 30000)
    expires = life.expires(number)
    life.walk(expires - 3)
    assert life.top_up(number, 100, at=expires - 2).reason == L.R_OK
    assert life.buy(number, line(CAFE_FOOD, 100), at=expires - 1).reason == L.R_OK
    assert life.status(number) == L.STATUS_ACTIVE and server_changes(life, number) == []
    assert life.top_up(number, 100, at=expires).reason == L.R_CARD_EXPIRED
    (change,) = server_changes(life, number)
    assert (change[3], change[29], change[17], change[24]) == (
        L.STATUS_EXPIRED, L.STATUS_ACTIVE, expires, L.CALLER_SYSTEM)
    assert life.status(number) == L.STATUS_EXPIRED
    assert life.buy(number, line(CAFE_FOOD, 100)).reason == L.R_CARD_EXPIRED
    assert list(life.ledger.dump()["cards_by_expiry"]) == []


def test_cards_nobody_names_expire_too_whatever_their_status(life):
    """An issued card, a frozen one and a lost one, named by no operation after their openings:
    the first group at their expiry (only the clock's top-ups of another card in it) expires
    all three, each from the status it had, and the index is left empty."""
    numbers = {"6225880000000707": L.STATUS_ISSUED, "6225880000000708": L.STATUS_FROZEN,
               "6225880000000709": L.STATUS_LOST}
    for number, status in numbers.items():
        if status == L.STATUS_ISSUED:
            life.open_issued(number)
        else:
            life.open(number)
            assert life.set_status(number, status).reason == L.R_OK
    assert len(life.ledger.dump()["cards_by_expiry"]) == 3
    life.walk(max(life.expires(n) for n in numbers))
    for number, status in numbers.items():
        (change,) = server_changes(life, number)
        assert (life.status(number), change[29]) == (L.STATUS_EXPIRED, status)
    assert list(life.ledger.dump()["cards_by_expiry"]) == []


def test_every_change_from_expired_is_refused_but_cancelling(life):
    """Six expired cards, one per status wanted: only closed applies (the principal paid back,
    the bonus and points forfeited); the others are refused with ILLEGAL_TRANSITION naming the
    status it has (expired), and change nothing."""
    numbers = {wanted: f"62258800000008{k:02d}" for k, wanted in enumerate(ALL)}
    for number in numbers.values():
        life.open(number)
        life.top_up(number, 30000)  # the welcome bonus: 20.00
    life.walk(max(life.expires(n) for n in numbers.values()))
    for wanted, number in numbers.items():
        assert life.status(number) == L.STATUS_EXPIRED
        outcome = life.set_status(number, wanted)
        f = entry_of(outcome)
        if wanted == L.STATUS_CLOSED:
            assert (outcome.reason, f[3], f[29], f[9], f[11], f[12], f[13]) == (
                L.R_OK, L.STATUS_CLOSED, L.STATUS_EXPIRED, 30000, -30000, -2000,
                -ACTIVATION_POINTS)
        else:
            assert (outcome.reason, f[3], f[7]) == (L.R_ILLEGAL_TRANSITION, L.STATUS_EXPIRED, 0)
            assert life.card(number)["principal"] == 30000


def test_an_operator_change_past_the_expiry_before_the_sweep_is_refused(life):
    """A frozen card whose expiry passed: its unfreezing in the group at the expiry finds it
    expired (the sweep came first): ILLEGAL_TRANSITION from expired; cancelling still pays out."""
    number = "6225880000000710"
    life.open(number)
    life.top_up(number, 1000)
    assert life.set_status(number, L.STATUS_FROZEN).reason == L.R_OK
    expires = life.expires(number)
    life.walk(expires - 1)
    outcome = life.set_status(number, L.STATUS_ACTIVE, at=expires)
    assert (outcome.reason, entry_of(outcome)[3]) == (L.R_ILLEGAL_TRANSITION, L.STATUS_EXPIRED)
    closed = life.set_status(number, L.STATUS_CLOSED)
    assert (closed.reason, entry_of(closed)[11]) == (L.R_OK, -1000)


def test_an_expired_cards_sale_is_refunded_to_it_and_its_cancel_pays_it_out(life):
    """A sale of food 80.00 (bonus first: 20.00 bonus, 60.00 principal); the card expires; the
    goods come back: the refund applies to the expired card (60.00 principal and 20.00 bonus
    back), and cancelling pays the whole principal, 300.00, out."""
    number = "6225880000000711"
    life.open(number)
    life.top_up(number, 30000)
    sale = life.buy(number, line(CAFE_FOOD, 8000))
    assert sale.reason == L.R_OK
    life.walk(life.expires(number))
    assert life.status(number) == L.STATUS_EXPIRED
    back = refund(life, number, seq_of(sale))
    assert (back.reason, entry_of(back)[11], entry_of(back)[12]) == (L.R_OK, 6000, 2000)
    closed = life.set_status(number, L.STATUS_CLOSED)
    assert (closed.reason, entry_of(closed)[9]) == (L.R_OK, 30000)


def test_verify_finds_a_record_whose_expiry_was_moved(life):
    """The expiry is the opening's: a record whose expiry was rewritten (a printed date moved by
    hand) is a problem verify names."""
    number = "6225880000000712"
    life.open(number)
    raw = bytearray(life.ledger.dump()["cards"][0][1])
    L.CARD_EXPIRES.pack_into(raw, L.CARD_OFF_EXPIRES, life.expires(number) + 86_400_000_000)
    with life.ledger.env.begin(write=True) as txn:
        txn.put(cid(number), bytes(raw), db=life.ledger.cards)
    report = verify_ledger(life.ledger)
    assert any("expires at" in p for p in report["problems"]), report["problems"]
    L.CARD_EXPIRES.pack_into(raw, L.CARD_OFF_EXPIRES, life.expires(number) - 86_400_000_000)
    with life.ledger.env.begin(write=True) as txn:  # put back: the fixture verifies the rest
        txn.put(cid(number), bytes(raw), db=life.ledger.cards)


# ---- over gRPC ----------------------------------------------------------------------------------

@pytest.fixture
def gift_server(start_server, tmp_path):
    path = os.path.join(str(tmp_path), "gift.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("card_valid_months = 12\nactivation_points = 30\n")
    return start_server("--program", path)


def test_a_gift_card_over_grpc_is_issued_then_activated_by_an_operator(gift_server):
    """OpenCard issue_only: GetCard shows it issued with its expiry (twelve months on); a
    top-up is refused (FAILED_PRECONDITION, CARD_NOT_ACTIVATED); asking for EXPIRED or
    ISSUED is INVALID_ARGUMENT on the status field; freezing it or reporting it lost is
    ILLEGAL_TRANSITION, "the card is issued"; an operator activates it (30 points); then it
    is topped up. Another issued card is cancelled (a stock card destroyed), paying nothing."""
    server = gift_server
    client = Client(server.stub)
    number = new_card_number()
    request_id = f"gift-{number}"
    opened = server.stub.OpenCard(pb.OpenCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), till=cpb.Till(store_id=1, terminal_id=1),
        issue_only=True))
    card = client.card(number)
    assert (card.status, card.balance.points) == (cpb.CARD_STATUS_ISSUED, 0)
    assert card.expires_at_us == rules.card_expiry_us(opened.applied_at_us, 12, 0)
    with pytest.raises(grpc.RpcError) as err:
        client.top_up(number, 5000)
    assert (err.value.code(), failure_of(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, R.REASON_CARD_NOT_ACTIVATED)

    def change(status):
        rid_ = f"st-{status}-{number}"
        return server.stub.SetCardStatus(pb.SetCardStatusRequest(
            request_id=rid_, client_time_us=sent_at(rid_), card=cpb.CardRef(card_number=number),
            status=status, till=cpb.Till(store_id=1, terminal_id=1)),
            metadata=bearer(server.admin_token))

    for status in (cpb.CARD_STATUS_EXPIRED, cpb.CARD_STATUS_ISSUED):
        with pytest.raises(grpc.RpcError) as err:
            change(status)
        fail = failure_of(err.value)
        assert (err.value.code(), fail.reason, fail.field) == (
            grpc.StatusCode.INVALID_ARGUMENT, R.REASON_INVALID_ARGUMENT, "status")
    with pytest.raises(grpc.RpcError) as err:
        change(cpb.CARD_STATUS_FROZEN)
    fail = failure_of(err.value)
    assert (fail.reason, fail.detail) == (R.REASON_ILLEGAL_TRANSITION, "the card is issued")
    with pytest.raises(grpc.RpcError) as err:
        change(cpb.CARD_STATUS_LOST)
    assert failure_of(err.value).reason == R.REASON_ILLEGAL_TRANSITION
    activated = change(cpb.CARD_STATUS_ACTIVE)
    assert (activated.status_after, activated.points_earned) == (cpb.CARD_STATUS_ACTIVE, 30)
    assert client.top_up(number, 5000).balance_after.principal_minor == 5000
    assert client.card(number).status == cpb.CARD_STATUS_ACTIVE
    number = new_card_number()  # a stock card destroyed: issued -> closed, nothing paid back
    request_id = f"stock-{number}"
    server.stub.OpenCard(pb.OpenCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), issue_only=True,
        till=cpb.Till(store_id=1, terminal_id=1)))
    closed = change(cpb.CARD_STATUS_CLOSED)  # (change names the card ``number`` is now)
    assert (closed.status_after, closed.amount_minor) == (cpb.CARD_STATUS_CLOSED, 0)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_a_retried_open_with_another_issue_only_is_a_mismatch(gift_server):
    """issue_only is part of the request: the same request_id sent again without it is
    DUPLICATE_REQUEST_MISMATCH, not a second answer for another card life."""
    server = gift_server
    number = new_card_number()
    request_id = f"open-{number}"

    def open_card(issue_only):
        return server.stub.OpenCard(pb.OpenCardRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), till=cpb.Till(store_id=1, terminal_id=1),
            issue_only=issue_only))

    open_card(True)
    with pytest.raises(grpc.RpcError) as err:
        open_card(False)
    assert failure_of(err.value).reason == R.REASON_DUPLICATE_REQUEST_MISMATCH
    assert open_card(True).replayed


def test_a_gift_card_from_the_command_line(gift_server):
    """`cardcore open-card N --issue-only`, then `card` shows it issued with its expiry date;
    a top-up is refused on one line naming the reason; `card-status N active` activates it."""
    from test_cli_errors import _clean_env, cli, user_error

    server = gift_server
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)  # its admin.token: the operator
    number = new_card_number()
    target = ("--target", server.target)
    assert cli("open-card", number, "--issue-only", *target, env=env).returncode == 0
    out = cli("card", number, *target, env=env)
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert out.returncode == 0 and rows["status"] == "issued", out.stdout
    expires = datetime.datetime.strptime(rows["expires"], "%Y-%m-%d %H:%M:%S UTC")
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert (expires.year * 12 + expires.month) - (today.year * 12 + today.month) == 12
    user_error(cli("top-up", number, "100", *target, env=env), 1, "FAILED_PRECONDITION",
               "REASON_CARD_NOT_ACTIVATED", secrets=(number,))
    out = cli("card-status", number, "active", *target, env=env)
    assert out.returncode == 0 and "active" in out.stdout, out.stderr
    assert cli("top-up", number, "100", *target, env=env).returncode == 0


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_activating_a_card_that_owes_points_adds_its_activation_points(impl):
    """An issued card at -700 points (a debt, rule 12 "owe"): activation adds the program's
    activation points (-650); the overflow guard computes without overflowing int64 (the
    kernel once answered AMOUNT_OVERFLOW here where the reference did not)."""
    program = parse_program(PROGRAM).packed(1)
    card = card_bytes(points=-700, status=L.STATUS_ISSUED)
    _, rec, journal, _ = run(impl, program, op_bytes(L.OP_CARD_STATUS, tier=L.STATUS_ACTIVE,
                                                     operator=1), [0], card)
    assert L.JOURNAL.unpack(journal)[4] == L.R_OK
    assert L.CARD.unpack(rec)[7] == -700 + ACTIVATION_POINTS


def test_a_stock_card_opened_issued_pays_no_referral(tmp_path):
    """A card opened issued (a stock card) names a referrer: the referrer gets nothing (the
    service refuses the pair outright; the writer never pays it either)."""
    till = LifeTill(str(tmp_path / "refer"), "referral_points = 500\n" + PROGRAM)
    referrer, stock = "6225880000000811", "6225880000000829"
    till.open(referrer)
    before = till.points(referrer)
    (opened,) = till.apply(PendingOp.build(key(till.rid()), L.OP_OPEN, cid(stock), profile=b"{}",
                                           op_flags=L.ISSUE_ONLY, referrer_id=cid(referrer),
                                           client_time_us=till.at + 1))
    assert opened.reason == L.R_OK and opened.entry[3] == L.STATUS_ISSUED
    assert till.points(referrer) == before
    report = verify_ledger(till.ledger)
    till.ledger.close()
    assert report["ok"], report["problems"]
