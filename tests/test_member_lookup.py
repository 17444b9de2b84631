"""Member lookup (rule 17 of cardcore.rules): a member's cards found by phone or name, and one
reported lost by the card id FindCards answers, without the card in hand; over gRPC against a
real server, its real LMDB, and ``cardcore verify``."""
from __future__ import annotations

import os

import grpc
import lmdb
import pytest

from cardcore import cards
from cardcore import layout as L
from cardcore.keyring import Keyring
from cardcore.ledger import META_MEMBERS, Ledger
from cardcore.rules import normalise_name, normalise_phone
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, Client, bearer, failure_of, ledger_bytes, new_card_number, operator_cli,
                      rid, sent_at,
                      verify)
from test_security import PIN, tls_channel

R = cpb.Reason
ROLE = cpb.OperatorRole


def card_id_of(server, number: str) -> bytes:
    """The card id the server keys ``number`` by (its keyring's index key)."""
    ring = Keyring.load(os.path.join(server.data_dir, "keyring.json"))
    return cards.card_id(ring.index_key, number)


def find(stub, metadata=(), store_id: int = 1, **query) -> pb.FindCardsResponse:
    return stub.FindCards(pb.FindCardsRequest(till=cpb.Till(store_id=store_id), **query),
                          metadata=metadata)


def refused(call, *args, **kw) -> cpb.Failure:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return failure_of(err.value)


def set_status(ref: cpb.CardRef, status: int, request_id: str | None = None,
               store_id: int = 1) -> pb.SetCardStatusRequest:
    request_id = request_id or rid()
    return pb.SetCardStatusRequest(request_id=request_id, client_time_us=sent_at(request_id),
                                   card=ref, status=status, till=cpb.Till(store_id=store_id))


# ---- rule 17: normalisation, at its edges ------------------------------------------------------

@pytest.mark.parametrize("typed, matched", [
    ("13800138000", "13800138000"),
    ("+86 138-0013-8000", "13800138000"),     # the mainland code dropped from a mobile
    ("0086 13800138000", "13800138000"),
    ("8613800138000", "13800138000"),
    ("86 2345 6789", "8623456789"),           # 86 then 8 digits: not a mobile, kept whole
    ("+86 10 1234 5678", "861012345678"),     # a Beijing landline with the code: kept whole
    ("+852 9123 4567", "85291234567"),        # Hong Kong: its code kept
    ("123456", "123456"),                     # 6 digits: the fewest indexed
    ("12345", ""),                            # 5: too few to be a member's phone
    ("1" * 20, "1" * 20),
    ("1" * 21, ""),
    ("", ""),
])
def test_rule_16_a_phone_is_its_digits_without_the_mainland_code(typed, matched):
    assert normalise_phone(typed) == matched


@pytest.mark.parametrize("typed, matched", [
    ("Li Wei", "liwei"),
    ("  LI   WEI ", "liwei"),
    ("\uff2c\uff29\u3000\uff37\uff25\uff29", "liwei"),   # full-width letters and space
    ("张 三", "张三"),
    ("张三", "张三"),
    ("阿沛·阿旺晋美", "阿沛·阿旺晋美"),
    ("阿沛\u30fb阿旺晋美", "阿沛·阿旺晋美"),    # a katakana middle dot is the same dot
    ("阿沛\uff65阿旺晋美", "阿沛·阿旺晋美"),    # and a half-width one
    ("Straße", "strasse"),
    (" \t\u3000", ""),
])
def test_rule_16_a_name_is_folded_not_transliterated(typed, matched):
    assert normalise_name(typed) == matched
    assert normalise_name("张三") != normalise_name("Zhang San")


# ---- FindCards --------------------------------------------------------------------------------

def test_a_members_cards_are_found_by_phone_and_by_name(server):
    """Li Wei has two cards (one at store 5, one at store 7, silver), 张三 one, Li Weiming one.
    Asked however the operator types them, each finds exactly the member's cards, masked, with
    status, tier, opening time and home store; never a full number, phone or name."""
    client = Client(server.stub)
    li = [new_card_number() for _ in range(2)]
    zhang, weiming = new_card_number(), new_card_number()
    client.open(li[0], name="Li Wei", phone="138 0013 8000", home_store_id=5)
    client.open(li[1], tier=1, name="LI WEI", phone="+86 138-0013-8000", home_store_id=7)
    client.open(zhang, name="张三", phone="0086 139 0000 1111")
    client.open(weiming, name="Li Weiming", phone="13800138001")
    ids = {card_id_of(server, n): n for n in (*li, zhang, weiming)}

    def found(**query) -> set[str]:
        return {ids[c.card_id] for c in find(server.stub, **query).cards}

    for phone in ("13800138000", "+86 138 0013 8000", "0086-138-0013-8000", "8613800138000"):
        assert found(phone=phone) == set(li), phone
    for name in ("li wei", "Li Wei", "LIWEI", "\uff2c\uff49\u3000\uff37\uff45\uff49"):
        assert found(name=name) == set(li), name
    assert found(name="张 三") == found(phone="13900001111") == {zhang}
    assert found(name="li weiming") == {weiming}
    assert found(name="zhang san") == set()   # no transliteration
    answer = find(server.stub, phone="13800138000")
    assert not answer.more and len(answer.cards) == 2
    by_number = {ids[c.card_id]: c for c in answer.cards}
    first, second = by_number[li[0]], by_number[li[1]]
    assert (first.masked_number, first.status, first.tier, first.tier_name, first.home_store_id) \
        == (cards.mask(li[0]), cpb.CARD_STATUS_ACTIVE, 0, "standard", 5)
    assert (second.masked_number, second.tier, second.tier_name, second.home_store_id) \
        == (cards.mask(li[1]), 1, "silver", 7)
    full = client.card(li[0])
    assert first.opened_at_us == full.opened_at_us > 0
    wire = answer.SerializeToString()
    for secret in (*li, "13800138000", "Li Wei", "LI WEI"):
        assert secret.encode() not in wire
    # Nothing matches: an empty answer, not an error.
    assert list(find(server.stub, phone="13700000000").cards) == []
    assert list(find(server.stub, name="Nobody").cards) == []


def test_a_query_that_cannot_match_is_refused_with_a_reason(server):
    """Too few or too many phone digits, a name of nothing but spaces or over 64 characters,
    or no query at all: INVALID_ARGUMENT, REASON_LOOKUP_QUERY_INVALID naming the field."""
    for query, field in (({"phone": "12345"}, "phone"), ({"phone": "1" * 21}, "phone"),
                         ({"phone": "+86-"}, "phone"), ({"name": " \u3000 "}, "name"),
                         ({"name": "x" * 65}, "name"), ({}, "query")):
        with pytest.raises(grpc.RpcError) as err:
            find(server.stub, **query)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fail = failure_of(err.value)
        assert (fail.reason, fail.field) == (R.REASON_LOOKUP_QUERY_INVALID, field), query
    assert list(find(server.stub, phone="123456").cards) == []        # 6 digits: asked
    assert list(find(server.stub, name="x" * 64).cards) == []        # 64 characters: asked
    assert "12345" not in server.log()


def test_an_answer_names_at_most_20_cards_and_says_there_are_more(server):
    client = Client(server.stub)
    for _ in range(L.MEMBER_MATCHES_MAX + 2):
        client.open(new_card_number(), name="王芳", phone="13500000000")
    answer = find(server.stub, phone="13500000000")
    assert (len(answer.cards), answer.more) == (20, True)
    assert len({c.card_id for c in answer.cards}) == 20
    client.open(new_card_number(), name="王芳", phone="13500000009")
    answer = find(server.stub, phone="13500000009")
    assert (len(answer.cards), answer.more) == (1, False)


# ---- reporting lost by the card id ---------------------------------------------------------------

def test_a_card_found_by_phone_is_reported_lost_by_its_id_and_then_refused(server):
    """The member phones in: the operator finds the card by phone, reports it lost by the card
    id; a swipe of it is refused (CARD_NOT_ACTIVE), the money kept. The same request sent again
    by the card's number is the same request (replayed, same seq): the journal entry and the
    request record do not depend on how the card was named. Found again, it is spent again."""
    client = Client(server.stub)
    number = client.funded_card(10_000)
    client.open(new_card_number(), name="Other", phone="13911112222")
    mine = new_card_number()
    client.open(mine, name="Chen Jing", phone="13622223333")
    client.top_up(mine, 5_000)
    [card] = find(server.stub, phone="136 2222 3333").cards
    assert card.card_id == card_id_of(server, mine)
    request_id, operator = rid(), bearer(server.admin_token)  # card life is an operator's
    lost = server.stub.SetCardStatus(set_status(cpb.CardRef(card_id=card.card_id),
                                                cpb.CARD_STATUS_LOST, request_id), metadata=operator)
    assert (lost.reason, lost.status_after, lost.type) == (
        R.REASON_OK, cpb.CARD_STATUS_LOST, cpb.OPERATION_TYPE_CARD_STATUS_CHANGED)
    again = server.stub.SetCardStatus(set_status(cpb.CardRef(card_number=mine),
                                                 cpb.CARD_STATUS_LOST, request_id), metadata=operator)
    assert (again.replayed, again.seq) == (True, lost.seq)
    with pytest.raises(grpc.RpcError) as err:
        client.purchase(mine, 100)
    assert failure_of(err.value).reason == R.REASON_CARD_NOT_ACTIVE
    [card] = find(server.stub, name="chen jing").cards
    assert card.status == cpb.CARD_STATUS_LOST
    seen = server.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_id=card.card_id)))
    assert (seen.status, seen.balance.available_minor, seen.masked_number,
            seen.view) == (cpb.CARD_STATUS_LOST, 5_000, cards.mask(mine), pb.CARD_VIEW_FULL)
    # Unknown card id: NOT_FOUND, as an unknown number is.
    assert refused(server.stub.SetCardStatus, set_status(cpb.CardRef(card_id=bytes(16)),
                                                         cpb.CARD_STATUS_LOST),
                   metadata=operator).reason == R.REASON_CARD_NOT_FOUND
    server.stub.SetCardStatus(set_status(cpb.CardRef(card_id=card.card_id), cpb.CARD_STATUS_ACTIVE),
                              metadata=operator)
    assert client.purchase(mine, 100).reason == R.REASON_OK
    assert client.purchase(number, 100).reason == R.REASON_OK   # another card never moved
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
    assert report["member_index"] == "checked: 4 keys"


def test_a_card_id_goes_only_where_a_call_takes_one(server):
    """SetCardStatus, ReplaceCard, GetCard and the history reads take CardRef.card_id; a top-up
    or a purchase by it is refused (REASON_CARD_ID_NOT_ACCEPTED), as is a card id not 16 bytes;
    ListTransactions by it lists the card's entries."""
    client = Client(server.stub)
    number = client.funded_card(1_000)
    ref = cpb.CardRef(card_id=card_id_of(server, number))
    top_up = pb.TopUpRequest(request_id=rid(), client_time_us=sent_at(rid()), card=ref,
                             amount_minor=100, till=cpb.Till(store_id=1))
    history = server.stub.ListTransactions(pb.ListTransactionsRequest(card=ref),
                                           metadata=bearer(server.admin_token))
    assert [e.type for e in history.entries] == [cpb.OPERATION_TYPE_TOP_UP,
                                                 cpb.OPERATION_TYPE_OPEN_CARD]
    for call, request in ((server.stub.TopUp, top_up),
                          (server.stub.SetCardStatus,
                           set_status(cpb.CardRef(card_id=ref.card_id[:15]),
                                      cpb.CARD_STATUS_LOST))):
        fail = refused(call, request, metadata=bearer(server.admin_token))
        assert (fail.reason, fail.field) == (R.REASON_CARD_ID_NOT_ACCEPTED, "card.card_id")
    assert client.card(number).balance.available_minor == 1_000


def test_operators_find_and_report_terminals_are_refused(tls_server):
    """Over mutual TLS: a cashier of the till's store finds the member's card and reports it
    lost by its id; a terminal's swipe of it is then refused (CARD_NOT_ACTIVE). A terminal asks
    FindCards: PERMISSION_DENIED; names a card by id: CLEAR_CARD_REFUSED (SetCardStatus:
    OPERATOR_REQUIRED first, as by number). A cashier of another store: PERMISSION_DENIED; a
    back-office host without a token: UNAUTHENTICATED."""
    server, ca_dir = tls_server
    office = tls_channel(server, ca_dir, "backoffice:hq")
    admin = Admin(office, server.admin_token)
    t7 = admin.enroll(7, 3)
    as_t7 = pb_grpc.CardServiceStub(tls_channel(server, ca_dir, "terminal:7"))
    number = new_card_number()
    as_t7.OpenCard(t7.open_card(rid(), number, PIN, profile=pb.MemberProfile(
        name="刘洋", phone="18611112222", home_store_id=3)))
    as_t7.TopUp(t7.top_up(rid(), number, 2_000))
    cashier = bearer(admin.add_operator("cashier.3", ROLE.OPERATOR_ROLE_CASHIER, [3]))
    elsewhere = bearer(admin.add_operator("cashier.4", ROLE.OPERATOR_ROLE_CASHIER, [4]))
    back_office = pb_grpc.CardServiceStub(office)
    [card] = find(back_office, cashier, store_id=3, phone="+8618611112222").cards
    assert (card.masked_number, card.home_store_id) == (cards.mask(number), 3)
    fail = refused(find, as_t7, store_id=3, phone="18611112222")
    assert (fail.reason, fail.field) == (R.REASON_PERMISSION_DENIED, "authorization")
    with pytest.raises(grpc.RpcError) as err:
        find(as_t7, bearer(server.admin_token), store_id=3, name="刘洋")  # a token from a till
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused(find, back_office, elsewhere, store_id=3, name="刘洋").reason \
        == R.REASON_PERMISSION_DENIED
    assert refused(find, back_office, store_id=3, name="刘洋").reason == R.REASON_UNAUTHENTICATED
    by_id = cpb.CardRef(card_id=card.card_id)
    fail = refused(as_t7.SetCardStatus, set_status(by_id, cpb.CARD_STATUS_LOST, store_id=3))
    assert fail.reason == R.REASON_OPERATOR_REQUIRED
    fail = refused(as_t7.GetCard, pb.GetCardRequest(card=by_id, till=t7.till()))
    assert (fail.reason, fail.field) == (R.REASON_CLEAR_CARD_REFUSED, "card.card_id")
    assert refused(back_office.SetCardStatus, set_status(by_id, cpb.CARD_STATUS_LOST, store_id=3),
                   metadata=elsewhere).reason == R.REASON_PERMISSION_DENIED
    lost = back_office.SetCardStatus(set_status(by_id, cpb.CARD_STATUS_LOST, store_id=3),
                                     metadata=cashier)
    assert lost.status_after == cpb.CARD_STATUS_LOST
    fail = refused(as_t7.Purchase, t7.purchase(rid(), number, PIN, 100))
    assert fail.reason == R.REASON_CARD_NOT_ACTIVE
    # A cashier may not cancel by id either: cancelling is a store manager's, whatever the name.
    assert refused(back_office.SetCardStatus, set_status(by_id, cpb.CARD_STATUS_CLOSED, store_id=3),
                   metadata=cashier).reason == R.REASON_PERMISSION_DENIED
    assert "18611112222" not in server.log() and "刘洋" not in server.log()


# ---- the index at rest -------------------------------------------------------------------------

def test_the_index_holds_neither_phone_nor_name(server):
    """The member index keys are keyed digests: the LMDB files hold the normalised phone and
    name nowhere (the profile keeps them as typed, so a normalised form could only come from the
    index), and no sub-database but the profiles holds them in any form."""
    client = Client(server.stub)
    client.open(new_card_number(), name="Zhou  Xun", phone="+86 159-8765-4321")
    client.open(new_card_number(), name="欧阳 娜娜", phone="0086 159 1234 5678")
    server.stop()
    ledger_dir = os.path.join(server.data_dir, "ledger")
    raw = ledger_bytes(server.data_dir)  # LMDB's files and the group log's
    for folded in ("15987654321", "zhouxun", "15912345678", "欧阳娜娜"):
        assert folded.encode() not in raw, folded
    ledger = Ledger(ledger_dir, readonly=True)
    try:
        dump = ledger.dump()
    finally:
        ledger.close()
    assert len(dump["members"]) == 4
    for name, items in dump.items():
        if name == "profiles":
            continue
        blob = b"".join(k + v for k, v in items)
        for typed in ("159-8765-4321", "87654321", "Zhou", "Xun", "欧阳", "娜娜", "1234 5678"):
            assert typed.encode() not in blob, (name, typed)


def test_verify_catches_a_tampered_index_and_a_restart_rebuilds_a_missing_one(start_server):
    """verify (with the data folder's keyring) checks the index against the profiles: a key
    deleted, or one forged, is a problem. A ledger whose index is missing (cards opened before
    it) gets it from the profiles when the server starts, and verify is clean again."""
    server = start_server()
    client = Client(server.stub)
    for k in range(3):
        client.open(new_card_number(), name=f"Member {k}", phone=f"1370000000{k}")
    report = verify(server.data_dir)
    assert report["ok"] and report["member_index"] == "checked: 6 keys", report
    server.stop()
    path = os.path.join(server.data_dir, "ledger")
    env = lmdb.open(path, max_dbs=64, subdir=True)
    members = env.open_db(b"members", create=False)
    with env.begin(write=True) as txn:
        first = next(iter(txn.cursor(db=members).iternext(values=False)))
        txn.delete(first, db=members)
        txn.put(first[:-1] + bytes([first[-1] ^ 1]), b"", db=members)   # someone else's card
    env.close()
    report = verify(server.data_dir)
    assert not report["ok"] and report["member_index"] == "checked: differs"
    assert any("member index" in p for p in report["problems"]), report["problems"]
    # Cards opened before the index: no members database, no mark that it is whole.
    env = lmdb.open(path, max_dbs=64, subdir=True)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"members", txn=txn, create=False), delete=True)
        meta = env.open_db(b"meta", txn=txn, create=False)
        txn.delete(META_MEMBERS, db=meta)
    env.close()
    report = verify(server.data_dir)
    assert report["ok"] and report["member_index"].startswith("not checked"), report
    server = start_server(data_dir=server.data_dir)
    assert len(find(server.stub, name="member 1").cards) == 1
    assert len(find(server.stub, phone="13700000002").cards) == 1
    report = verify(server.data_dir)
    assert report["ok"] and report["member_index"] == "checked: 6 keys", report


def test_a_writer_without_the_lookup_key_leaves_the_index_to_be_rebuilt(start_server):
    """A tool that opens cards without the keyring (a ledger opened with no lookup key) clears
    the index's mark; the server's next start rebuilds it, so the card it opened is found."""
    server = start_server()
    Client(server.stub).open(new_card_number(), name="Before", phone="13300000000")
    server.stop()
    path = os.path.join(server.data_dir, "ledger")
    number = new_card_number()
    ledger = Ledger(path)
    ring = Keyring.load(os.path.join(server.data_dir, "keyring.json"))
    from cardcore.idempotency import PendingOp, request_key
    profile = b'{"masked":"x","name":"After","phone":"13300000001"}'
    outcome = ledger.apply_group([PendingOp.build(
        request_key(L.CALLER_DEVELOPMENT, 0, b"tool-open"), L.OP_OPEN,
        cards.card_id(ring.index_key, number), profile=profile,
        client_time_us=sent_at("tool-open"))], sent_at("tool-open"))[0]
    assert outcome.reason == L.R_OK
    ledger.close()
    assert verify(server.data_dir)["member_index"].startswith("not checked")
    server = start_server(data_dir=server.data_dir)
    assert [c.card_id for c in find(server.stub, name="after").cards] == [
        cards.card_id(ring.index_key, number)]
    assert len(find(server.stub, phone="13300000000").cards) == 1
    report = verify(server.data_dir)
    assert report["ok"] and report["member_index"] == "checked: 4 keys", report


# ---- the command line --------------------------------------------------------------------------

def test_the_cli_finds_a_card_and_reports_it_lost_by_its_id(server):
    def cli(*args):
        return operator_cli(server, *args)

    number = new_card_number()
    assert cli("open-card", number, "--name", "Sun Li", "--phone", "13812345678")[0] == 0
    rc, out = cli("find-card", "--phone", "+86 138 1234 5678")
    assert rc == 0 and cards.mask(number) in out and number not in out and "active" in out
    card_id = card_id_of(server, number).hex()
    assert card_id in out
    rc, out = cli("card-status", "--card-id", card_id, "lost")
    assert rc == 0 and "status       lost" in out
    rc, out = cli("find-card", "--name", "sun li")
    assert rc == 0 and "lost" in out
    rc, out = cli("find-card", "--name", "nobody")
    assert rc == 0 and "no card matches" in out
    rc, out = cli("card-status", "--card-id", card_id, number, "active")
    assert rc == 2 and "not both" in out
    rc, out = cli("card-status", "--card-id", "abc", "active")
    assert rc == 2 and "32 hex digits" in out
    rc, out = cli("find-card", "--phone", "123")
    assert rc == 1 and "LOOKUP_QUERY_INVALID" in out
