"""Card replacement (rule 16 of cardcore.rules): a new number inherits everything the old card
held in one write, and the old number is dead for ever. Through the real ledger (every
transition, the worked figures, races in one group, refunds and history across the two cards,
verify) and over gRPC (the contract, the operator's role, GetCard, the PIN)."""
from __future__ import annotations

import json
import os

import grpc
import pytest

from cardcore import layout as L
from cardcore.idempotency import PendingOp
from cardcore.verify import verify as verify_ledger
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, Client, bearer, failure_of, new_card_number, operator_cli, sent_at,
                      verify)
from test_card_life import reach, set_status, status_of
from test_card_programs import CAFE_DRINKS, CAFE_FOOD, Till, cafe_ledger, example, figures, line, lots_of
from test_ledger import cid, key, op
from test_refunds import refund, reverse_op, seq_of

R = cpb.Reason
OLD, NEW = "6225880000000701", "6225880000000719"


@pytest.fixture
def till(tmp_path):
    with cafe_ledger(str(tmp_path / "cafe")) as t:
        yield t


def replace_op(till: Till, old: str, new: str, request_id: str | None = None,
               new_pin_check: bytes = bytes(32), operator: int = 1,
               at: int | None = None) -> PendingOp:
    return PendingOp.build(key(request_id or till.rid()), L.OP_CARD_REPLACED, cid(old),
                           store_id=3, operator_id=operator, client_time_us=at or till.at + 1,
                           referrer_id=cid(new), profile=json.dumps({"masked": new[:6]}).encode(),
                           pin_flags=L.NEW_PIN if any(new_pin_check) else 0,
                           new_pin_check=new_pin_check)


def replace(till: Till, old: str = OLD, new: str = NEW, **kw):
    return till.apply(replace_op(till, old, new, **kw))[0]


def record(till: Till, number: str):
    found = till.ledger.read_card(cid(number))
    return None if found is None else found[0]


def items(till: Till, db: str, number: str) -> dict[int, bytes]:
    card = cid(number)
    return {L.COUPON_KEY.unpack(k)[1]: v for k, v in till.ledger.dump()[db] if k[:16] == card}


def test_the_new_card_holds_everything_the_old_one_held_and_the_old_one_is_dead(till):
    """Worked example: 300.00 topped up (the cafe gives 30.00 bonus on 300), a 120.00 sale (its
    points, tier upgrade), a coupon: after the replacement the new card has the same principal,
    bonus, points in the same lots, tier, lifetime spend and coupon; the old card is REPLACED
    with nothing on it; the two entries mirror each other."""
    till.open(OLD)
    till.top_up(OLD, 30000)
    sale = till.buy(OLD, line(CAFE_FOOD, 12000))
    assert sale.reason == L.R_OK
    coupon = till.issue(OLD, 1)
    assert coupon.reason == L.R_OK
    before = till.card(OLD)
    lots_before = lots_of(till, OLD)
    coupons_before = items(till, "coupons", OLD)
    assert before["points"] > 0 and lots_before and coupons_before
    outcome = replace(till)
    assert outcome.reason == L.R_OK
    opened = figures(outcome)
    assert L.JOURNAL.unpack(outcome.entry)[1] == L.OP_REPLACEMENT_OPENED
    assert (opened["principal"], opened["bonus"], opened["points"]) == (
        before["principal"], before["bonus"], before["points"])
    assert opened["amount"] == before["principal"] + before["bonus"]
    assert till.card(NEW) == before
    assert lots_of(till, NEW) == lots_before and lots_of(till, OLD) == {}
    assert items(till, "coupons", NEW) == coupons_before and items(till, "coupons", OLD) == {}
    old = record(till, OLD)
    assert old[1] == L.STATUS_REPLACED and old[5:8] == (0, 0, 0)
    assert record(till, NEW)[1] == L.STATUS_ACTIVE
    out_seq = L.JOURNAL.unpack(outcome.entry)[28]
    out = till.ledger.read_entry(out_seq)[0]
    f = L.JOURNAL.unpack(out)
    assert (f[1], f[3], f[8], f[11:14], f[28], f[29]) == (
        L.OP_CARD_REPLACED, L.STATUS_REPLACED, cid(OLD),
        (-before["principal"], -before["bonus"], -before["points"]), out_seq + 1,
        L.STATUS_ACTIVE)
    # the coupon is used on the new card, under its serial
    spent = till.buy(NEW, line(CAFE_DRINKS, 3000), coupon=seq_of(coupon))
    assert spent.reason == L.R_OK and figures(spent)["discount"] > 0


def test_any_operation_on_the_old_number_says_it_was_replaced(till):
    till.open(OLD)
    till.top_up(OLD, 10000)
    assert replace(till).reason == L.R_OK
    assert till.top_up(OLD, 100).reason == L.R_CARD_REPLACED
    assert till.buy(OLD, line(CAFE_FOOD, 100)).reason == L.R_CARD_REPLACED
    reset = till.apply(PendingOp.build(key(till.rid()), L.OP_RESET_PIN, cid(OLD), store_id=3,
                                       operator_id=1, client_time_us=till.at + 1))[0]
    assert reset.reason == L.R_CARD_REPLACED
    for status in (L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST, L.STATUS_CLOSED):
        refused = set_status(till, OLD, status)
        assert refused.reason == L.R_ILLEGAL_TRANSITION and refused.entry[3] == L.STATUS_REPLACED
    assert replace(till, OLD, "6225880000000727").reason == L.R_CARD_REPLACED
    assert till.top_up(NEW, 100).reason == L.R_OK


@pytest.mark.parametrize("start", [L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST,
                                   L.STATUS_CLOSED])
def test_active_frozen_and_lost_cards_are_replaced_a_closed_one_is_not(till, start):
    till.open(OLD)
    till.top_up(OLD, 10000)
    reach(till, OLD, start)
    outcome = replace(till)
    if start in L.REPLACEABLE:
        assert outcome.reason == L.R_OK
        assert f"{status_of(till, OLD)}{status_of(till, NEW)}" == f"{L.STATUS_REPLACED}1"
        assert L.JOURNAL.unpack(till.ledger.read_entry(seq_of(outcome) - 1)[0])[29] == start
    else:
        assert outcome.reason == L.R_ILLEGAL_TRANSITION and outcome.entry[3] == start
        assert record(till, NEW) is None


def test_refused_replacements_change_nothing(till):
    """Unknown card, a new number that is a card already (or the same one), open holds."""
    assert replace(till).reason == L.R_CARD_NOT_FOUND
    till.open(OLD)
    till.open(NEW)
    till.top_up(OLD, 10000)
    assert replace(till).reason == L.R_CARD_ALREADY_EXISTS
    assert replace(till, OLD, OLD).reason == L.R_CARD_ALREADY_EXISTS
    other = "6225880000000727"
    hold = till.apply(PendingOp.build(key(till.rid()), L.OP_HOLD, cid(OLD), 2000, store_id=3,
                                      pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET,
                                      ref_id=60, client_time_us=till.at + 1))[0]
    assert hold.reason == L.R_OK
    entries = till.ledger.next_seq
    assert replace(till, OLD, other).reason == L.R_HOLDS_OPEN
    assert till.ledger.next_seq == entries and record(till, other) is None
    assert status_of(till, OLD) == L.STATUS_ACTIVE


def test_a_swipe_racing_the_replacement_in_one_group_lands_on_one_card_or_is_refused(till):
    """Operations on the old card before the replacement in the same group apply to it and
    move with it; those after are refused; the new card takes operations after it."""
    till.open(OLD)
    till.top_up(OLD, 10000)
    before = till.purchase(OLD, line(CAFE_FOOD, 1000))
    after = till.purchase(OLD, line(CAFE_FOOD, 1000))
    new_sale = till.purchase(NEW, line(CAFE_FOOD, 500))
    outcomes = till.apply(before, replace_op(till, OLD, NEW), after, new_sale)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_OK, L.R_CARD_REPLACED, L.R_OK]
    paid = -(figures(outcomes[0])["principal"] + figures(outcomes[3])["principal"])
    assert till.card(NEW)["principal"] == 10000 - paid
    assert till.card(OLD)["principal"] == 0


def test_a_sale_of_the_old_card_is_refunded_to_the_new_one(till):
    till.open(OLD)
    till.top_up(OLD, 10000)
    sale = till.buy(OLD, line(CAFE_FOOD, 4000))
    assert replace(till).reason == L.R_OK
    held = till.card(NEW)
    back = refund(till, NEW, seq_of(sale), 0)
    assert back.reason == L.R_OK
    assert till.card(NEW)["principal"] == held["principal"] + figures(back)["principal"]
    assert figures(back)["principal"] == -figures(sale)["principal"]
    assert refund(till, OLD, seq_of(sale), 0).reason == L.R_CARD_REPLACED
    # a card never replaced from the old one cannot refund it
    till.open("6225880000000727")
    assert refund(till, "6225880000000727", seq_of(sale), 0).reason == L.R_ORIGINAL_NOT_FOUND


def test_a_timed_out_request_on_the_old_card_is_reversed_on_the_new_one(till):
    """A terminal that timed out on the old card reverses with the card it swiped: the top-up
    (or sale) made before the replacement is undone on the new card, which holds its money;
    one never seen is tombstoned, so the late original is refused."""
    till.open(OLD)
    sent = till.at + 1
    top_up = till.apply(op("t-1", L.OP_TOP_UP, OLD, 5000, at=sent), at=sent)[0]
    sale = till.buy(OLD, line(CAFE_FOOD, 1000), request_id="s-1")
    assert top_up.reason == L.R_OK and sale.reason == L.R_OK
    assert replace(till).reason == L.R_OK
    held = till.card(NEW)["principal"]
    back = till.apply(reverse_op(till, OLD, "s-1"))[0]
    assert back.reason == L.R_OK and L.JOURNAL.unpack(back.entry)[8] == cid(NEW)
    assert till.card(NEW)["principal"] == held + figures(back)["principal"] > held
    undone = till.apply(reverse_op(till, OLD, "t-1"))[0]
    assert undone.reason == L.R_OK and figures(undone)["principal"] == -5000
    assert till.card(NEW)["principal"] == 0 and till.card(OLD)["principal"] == 0
    late = till.apply(reverse_op(till, OLD, "never-came"))[0]
    assert late.reason == L.R_OK
    arrived = till.apply(op("never-came", L.OP_TOP_UP, OLD, 100, at=till.at + 1))[0]
    assert arrived.reason in (L.R_REVERSED, L.R_CARD_REPLACED)


def test_the_new_cards_history_goes_on_with_the_old_cards(till):
    till.open(OLD)
    till.top_up(OLD, 10000)
    till.buy(OLD, line(CAFE_FOOD, 1000))
    assert replace(till).reason == L.R_OK
    till.buy(NEW, line(CAFE_FOOD, 1000))
    page, nxt = till.ledger.read_history(cid(NEW), limit=100)
    ops = [e[1] for e, _ in page]
    assert ops == [L.OP_PURCHASE, L.OP_REPLACEMENT_OPENED, L.OP_CARD_REPLACED, L.OP_PURCHASE,
                   L.OP_TOP_UP, L.OP_OPEN] and nxt == 0
    seqs = [L.JOURNAL.unpack(e)[7] for e, _ in page]
    assert seqs == sorted(seqs, reverse=True)
    # paged two at a time: the same entries, across the two cards
    paged, before = [], 0
    while True:
        got, before = till.ledger.read_history(cid(NEW), before_seq=before, limit=2)
        paged += [L.JOURNAL.unpack(e)[7] for e, _ in got]
        if not before:
            break
    assert paged == seqs
    old_page, _ = till.ledger.read_history(cid(OLD), limit=100)
    assert [e[1] for e, _ in old_page] == ops[2:]


def test_a_card_replaced_twice_keeps_everything(till):
    third = "6225880000000727"
    till.open(OLD)
    till.top_up(OLD, 10000)
    till.buy(OLD, line(CAFE_FOOD, 2500))
    before = till.card(OLD)
    assert replace(till).reason == L.R_OK
    assert replace(till, NEW, third).reason == L.R_OK
    assert till.card(third) == before
    page, _ = till.ledger.read_history(cid(third), limit=100)
    assert len(page) == 7


def test_a_pin_entered_at_the_desk_is_the_new_cards(till):
    till.open(OLD)
    check = bytes(range(1, 33))
    assert replace(till, new_pin_check=check).reason == L.R_OK
    rec = record(till, NEW)
    assert rec[4] & L.CARD_PIN_SET and rec[14] == check and rec[3] == 0
    assert record(till, "6225880000000727") is None
    till.open("6225880000000727")
    assert replace(till, "6225880000000727", "6225880000000735").reason == L.R_OK
    assert record(till, "6225880000000735")[4] & L.CARD_PIN_SET == 0  # none given: none set


def test_a_retry_replays_and_another_new_card_is_a_mismatch(till):
    till.open(OLD)
    till.top_up(OLD, 5000)
    sent = till.at + 1
    first = replace(till, request_id="repl-1", at=sent)
    again = replace(till, request_id="repl-1", at=sent)
    assert again.replayed and again.entry[:224] == first.entry[:224]
    other = replace(till, OLD, "6225880000000727", request_id="repl-1", at=sent)
    assert other.reason == L.R_DUPLICATE_REQUEST_MISMATCH


def test_verify_finds_a_replacement_that_moved_less_than_the_card_held(tmp_path):
    till = Till(str(tmp_path / "cafe"), example("cafe"))
    till.open(OLD)
    till.top_up(OLD, 10000)
    assert replace(till).reason == L.R_OK
    assert verify_ledger(till.ledger)["ok"]
    with till.ledger.env.begin(write=True) as txn:  # the new card's link to the old one, lost
        txn.delete(b"\x02" + cid(NEW), db=till.ledger.card_links)
    report = verify_ledger(till.ledger)
    assert not report["ok"] and any("card links" in p for p in report["problems"])
    till.ledger.close()


# ---- over gRPC -----------------------------------------------------------------------------------


def test_replace_card_over_grpc(server):
    """An operator replaces a card by number; GetCard of the old number says REPLACED and names
    the new one (masked); the new card holds the money and the profile and lists the old
    card's history after its own; the old one is refused with CARD_REPLACED; an operator of
    another store may not, a retry replays."""
    client, stub = Client(server.stub), server.stub
    old, new = new_card_number(), new_card_number()
    till = cpb.Till(store_id=1, terminal_id=1)
    client.open(old, name="Li Lei", phone="13800000000")
    client.top_up(old, 5000)

    def replace_rpc(card, new_card, token=server.admin_token, request_id="r1"):
        return stub.ReplaceCard(pb.ReplaceCardRequest(
            request_id=request_id, card=cpb.CardRef(card_number=card),
            new_card=cpb.CardRef(card_number=new_card), till=till,
            client_time_us=sent_at(request_id)), metadata=bearer(token) if token else None)

    with pytest.raises(grpc.RpcError) as err:
        replace_rpc(old, new, token=None)
    assert failure_of(err.value).reason == R.REASON_OPERATOR_REQUIRED
    elsewhere = Admin(server.channel, server.admin_token).add_operator(
        "cashier-2", cpb.OPERATOR_ROLE_CASHIER, [2])
    with pytest.raises(grpc.RpcError) as err:
        replace_rpc(old, new, token=elsewhere)
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    cashier = Admin(server.channel, server.admin_token).add_operator(
        "cashier-1", cpb.OPERATOR_ROLE_CASHIER, [1])  # moves a whole card: a manager's to do
    with pytest.raises(grpc.RpcError) as err:
        replace_rpc(old, new, token=cashier)
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    result = replace_rpc(old, new)
    assert result.type == cpb.OPERATION_TYPE_REPLACEMENT_OPENED
    assert result.status_after == cpb.CARD_STATUS_ACTIVE
    assert result.principal_delta_minor == 5000 and result.original_seq == result.seq - 1
    assert replace_rpc(old, new).replayed
    gone = client.card(old)
    assert gone.status == cpb.CARD_STATUS_REPLACED
    assert gone.replaced_by == new[:6] + "*" * (len(new) - 10) + new[-4:]
    card = client.card(new)
    assert card.balance.principal_minor == 5000 and card.profile.name == "Li Lei"
    assert card.masked_number == gone.replaced_by
    with pytest.raises(grpc.RpcError) as err:
        client.top_up(old, 100)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure_of(err.value).reason == R.REASON_CARD_REPLACED
    history = stub.ListTransactions(pb.ListTransactionsRequest(
        card=cpb.CardRef(card_number=new), till=till))
    assert [e.type for e in history.entries] == [
        cpb.OPERATION_TYPE_REPLACEMENT_OPENED, cpb.OPERATION_TYPE_CARD_REPLACED,
        cpb.OPERATION_TYPE_TOP_UP, cpb.OPERATION_TYPE_OPEN_CARD]
    with pytest.raises(grpc.RpcError) as err:
        replace_rpc(new, new, request_id="r2")
    assert failure_of(err.value).reason == R.REASON_INVALID_ARGUMENT
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
    # (found by a review) the group log carries the new card's profile sealed by the gRPC
    # process, so a replica without the keyring stores what one with it does
    # (docs/cluster.md, "Determinism rules"): the old member's, with the new mask
    from cardcore import cards
    from cardcore.durable import log_folder
    from cardcore.grouplog import LogView
    from cardcore.groups import decode_group
    from cardcore.keyring import Keyring
    from cardcore.profiles import ProfileBox, profile_key

    log = LogView(log_folder(os.path.join(server.data_dir, "ledger")))
    ops = [o for record in log.read_from(1) for o in decode_group(record.payload)[0]
           if o.packed[0] == L.OP_CARD_REPLACED]  # the replacement, and its retry
    index_key = Keyring.load(os.path.join(server.data_dir, "keyring.json")).index_key
    box = ProfileBox(profile_key(index_key))
    assert ops and all(box.is_sealed(o.profile) for o in ops)
    for o in ops:
        moved = box.open(cards.card_id(index_key, new), o.profile)
        assert (moved["name"], moved["masked"]) == ("Li Lei", gone.replaced_by), moved


def test_the_cli_replaces_a_card(server):
    """`cardcore replace-card`, as an operator at the service desk uses it."""
    def cli(*args):
        return operator_cli(server, *args, "--store", "1")

    old, new = new_card_number(), new_card_number()
    assert cli("open-card", old)[0] == 0
    assert cli("top-up", old, "80")[0] == 0
    rc, out = cli("replace-card", old, new)
    assert rc == 0 and "principal    80.00" in out, out
    rc, out = cli("replace-card", old, new_card_number())
    assert rc == 1 and "REASON_CARD_REPLACED" in out and old not in out and new not in out
    rc, out = cli("history", new)
    assert rc == 0 and "replacement_opened" in out and "card_replaced" in out
    rc, out = operator_cli(server, "card", old)  # the old card names its successor, masked
    assert rc == 0 and "replaced by" in out and new[-4:] in out and new not in out, out


def test_swipes_racing_a_replacement_over_grpc_lose_nothing(server):
    """Four tills spend on the old card while an operator replaces it: every purchase is either
    applied before the replacement (and its money moved with the rest) or refused with
    CARD_REPLACED; the new card holds exactly what is left; nothing lands on the dead number."""
    import threading

    client, stub = Client(server.stub), server.stub
    old, new = new_card_number(), new_card_number()
    client.open(old)
    client.top_up(old, 1_000_000)
    paid, refused, errors = [], [], []

    def till_loop(k: int) -> None:
        for n in range(40):
            try:
                reply = client.purchase(old, 100 + k, request_id=f"race-{k}-{n}")
                paid.append(reply.paid_minor)
            except grpc.RpcError as err:
                (refused if failure_of(err).reason == R.REASON_CARD_REPLACED
                 else errors).append(err)

    tills = [threading.Thread(target=till_loop, args=(k,)) for k in range(4)]
    for t in tills:
        t.start()
    request_id = "race-replace"
    stub.ReplaceCard(pb.ReplaceCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=old), new_card=cpb.CardRef(card_number=new),
        till=cpb.Till(store_id=1, terminal_id=1)), metadata=bearer(server.admin_token))
    for t in tills:
        t.join()
    assert not errors and len(paid) + len(refused) == 160
    assert client.card(new).balance.principal_minor == 1_000_000 - sum(paid)
    gone = client.card(old)
    assert gone.status == cpb.CARD_STATUS_REPLACED and gone.balance.principal_minor == 0
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_a_card_lost_and_replaced_from_the_members_phone_without_its_number(server):
    """The whole desk flow: the member calls, the operator finds the card by phone, reports it
    lost and replaces it by its id (no number at hand); the new card is found by the same
    phone, the old one shows as replaced."""
    client, stub = Client(server.stub), server.stub
    admin = bearer(server.admin_token)
    old, new = new_card_number(), new_card_number()
    till = cpb.Till(store_id=1, terminal_id=1)
    client.open(old, name="Han Meimei", phone="+86 139-0000-1111")
    client.top_up(old, 7000)
    (found,) = stub.FindCards(pb.FindCardsRequest(phone="13900001111", till=till),
                              metadata=admin).cards
    lost = stub.SetCardStatus(pb.SetCardStatusRequest(
        request_id="lost-1", client_time_us=sent_at("lost-1"), card=cpb.CardRef(card_id=found.card_id),
        status=cpb.CARD_STATUS_LOST, till=till), metadata=admin)
    assert lost.status_after == cpb.CARD_STATUS_LOST
    result = stub.ReplaceCard(pb.ReplaceCardRequest(
        request_id="repl-1", client_time_us=sent_at("repl-1"),
        card=cpb.CardRef(card_id=found.card_id), new_card=cpb.CardRef(card_number=new),
        till=till), metadata=admin)
    assert result.balance_after.principal_minor == 7000
    cards = stub.FindCards(pb.FindCardsRequest(phone="13900001111", till=till),
                           metadata=admin).cards
    assert sorted((c.masked_number, c.status) for c in cards) == sorted([
        (found.masked_number, cpb.CARD_STATUS_REPLACED),
        (new[:6] + "*" * (len(new) - 10) + new[-4:], cpb.CARD_STATUS_ACTIVE)])
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_an_expired_card_is_renewed_by_a_replacement(tmp_path):
    """Rule 14 and 16: a card past its expiry (expired by the server's sweep) is replaced; the
    new card holds its money and expires a validity after the replacement; the old one leaves
    the expiry index (verify checks both)."""
    from test_card_issue_expiry import LifeTill

    till = LifeTill(str(tmp_path / "life"))
    till.open(OLD)
    till.top_up(OLD, 10000)
    till.walk(till.expires(OLD) + 1)
    assert till.status(OLD) == L.STATUS_EXPIRED
    before = till.card(OLD)
    assert replace(till).reason == L.R_OK
    assert till.card(NEW) == before and till.status(NEW) == L.STATUS_ACTIVE
    assert till.expires(NEW) > till.at
    assert till.buy(NEW, line(CAFE_FOOD, 1000)).reason == L.R_OK
    report = verify_ledger(till.ledger)
    till.ledger.close()
    assert report["ok"], report["problems"]


def test_a_card_opened_and_replaced_in_one_group_keeps_its_profile(till):
    """The new card's profile is the old card's as the group left it (here, written by an
    opening earlier in the same group), with the new number's mask."""
    profile = b'{"masked":"622588******0701","name":"Wu Di","phone":"13511112222"}'
    opening = PendingOp.build(key(till.rid()), L.OP_OPEN, cid(OLD), profile=profile,
                              client_time_us=till.at + 1)
    first, moved = till.apply(opening, replace_op(till, OLD, NEW))
    assert (first.reason, moved.reason) == (L.R_OK, L.R_OK)
    assert till.ledger.read_card(cid(NEW))[1] == {"masked": NEW[:6], "name": "Wu Di",
                                                  "phone": "13511112222"}


def test_the_cli_replaces_a_card_named_by_its_id(server):
    old, new = new_card_number(), new_card_number()
    assert operator_cli(server, "open-card", old, "--store", "1", "--phone", "13966667777")[0] == 0
    rc, out = operator_cli(server, "find-card", "--phone", "13966667777", "--store", "1")
    card_id = out.splitlines()[1].split()[0]
    rc, out = operator_cli(server, "replace-card", "--card-id", card_id, new, "--store", "1")
    assert rc == 0 and "journal seq" in out, out
    rc, out = operator_cli(server, "replace-card", old, new_card_number(), "--card-id", card_id,
                           "--store", "1")
    assert rc == 2 and "not both" in out


def test_a_card_owing_points_passes_its_debt_to_the_new_card(tmp_path):
    """Rule 12 "owe" and rule 16: a card at -91 points (a refund took back points it had spent)
    is replaced; the new card owes the same and pays it from what it earns next."""
    from test_refunds import owing_cafe

    with owing_cafe(str(tmp_path / "cafe"), "owe") as till:  # verified when done
        till.open(OLD)
        till.top_up(OLD, 30000)
        sale = till.buy(OLD, line(CAFE_FOOD, 12000))
        till.buy(OLD, line(CAFE_DRINKS, 1000), redeem=100)
        assert refund(till, OLD, seq_of(sale)).reason == L.R_OK
        assert till.card(OLD)["points"] == -91
        assert replace(till).reason == L.R_OK
        assert till.card(NEW)["points"] == -91 and lots_of(till, NEW) == {}
        till.buy(NEW, line(CAFE_FOOD, 5000))
        assert till.card(NEW)["points"] == -41
