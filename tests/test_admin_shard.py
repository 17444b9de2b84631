"""A cluster's admin shard and the card shards that apply its groups (docs/cluster.md, "The
admin shard"), on ledgers in-process: the relay's rules, without NATS. The running cluster's
test is in test_cluster.py."""
from __future__ import annotations

import os

import pytest

from cardcore import layout as L
from cardcore.groups import encode_group, relay_mark, relay_ops
from cardcore.idempotency import InvariantError, PendingOp
from cardcore.ledger import Ledger
from test_ledger import NOW, add_operator, cid, enroll, key, op, open_op, revoke, swipe

ADMIN_SHARD = 7
DAY = 86_400 * 1_000_000
PROGRAMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "programs")


@pytest.fixture
def pair(tmp_path):
    """(the admin shard's ledger, a card shard's ledger), each with its place said."""
    admin = Ledger(str(tmp_path / "admin"), sync=False)
    card = Ledger(str(tmp_path / "card"), sync=False)
    assert admin.apply_group([relay_mark(ADMIN_SHARD, L.RELAY_ROLE_ADMIN)], NOW)[0].reason == 0
    assert card.apply_group([relay_mark(ADMIN_SHARD, L.RELAY_ROLE_CARD)], NOW)[0].reason == 0
    yield admin, card
    admin.close()
    card.close()


class Relay:
    """The admin shard's groups, numbered as its stream would, each applied there and relayed
    to the card shard (as its leader would, later, at its own time)."""

    def __init__(self, admin: Ledger, card: Ledger) -> None:
        self.admin, self.card, self.group_no = admin, card, 0

    def admin_group(self, ops: list[PendingOp], ts_us: int, card_ts_us: int | None = None):
        self.group_no += 1
        here = self.admin.apply_group(ops, ts_us)
        relayed = relay_ops(ADMIN_SHARD, self.group_no, encode_group(ops, ts_us))
        if not relayed:  # no admin entries (a leader's maintenance): nothing goes there
            return [o.reason for o in here], []
        there = self.card.apply_group(relayed, ts_us + 1 if card_ts_us is None else card_ts_us)
        assert there[0].reason == L.R_OK  # the mark
        return [o.reason for o in here], [o.reason for o in there[1:]]


def terminals(ledger: Ledger) -> list[tuple]:
    """Each terminal's id, state and store (their enrolment times are each shard's own)."""
    return sorted((t[3], t[1], t[4]) for t in ledger.read_terminals())


def operators(ledger: Ledger) -> list[tuple]:
    return sorted((o["id"], o["name"], o["role"], o["removed"]) for o in ledger.read_operators())


def entries_of(ledger: Ledger, kind: int) -> int:
    return sum(1 for _, v in ledger.dump()["journal"] if L.JOURNAL.unpack(v)[1] == kind)


def test_a_card_shard_takes_the_admin_shards_changes_once_in_order_and_refuses_its_own(pair):
    admin, card = pair
    relay = Relay(admin, card)
    assert relay.admin_group([enroll("e11", 11, 3), add_operator("alice", "alice", 2)], NOW) \
        == ([L.R_OK, L.R_OK], [L.R_OK, L.R_OK])
    # made on the card shard itself: refused, no request record (the same key relayed later
    # is a new request there), nothing changed
    direct = card.apply_group([enroll("e12", 12, 3), add_operator("bob", "bob", 1)], NOW + 2)
    assert [o.reason for o in direct] == [L.R_ADMIN_ELSEWHERE] * 2
    assert terminals(card) == [(11, L.TERMINAL_ACTIVE, 3)]
    assert relay.admin_group([enroll("e12", 12, 3)], NOW + 3) == ([L.R_OK], [L.R_OK])
    # a re-send of the first enrolment: answered again on the admin shard, and on the card
    # shard too (its relayed request record), not enrolled twice; an enrolment of a terminal
    # that exists is refused on both
    assert relay.admin_group([enroll("e11", 11, 3), enroll("e11-again", 11, 3)], NOW + 4) \
        == ([L.R_OK, L.R_TERMINAL_EXISTS], [L.R_OK, L.R_TERMINAL_EXISTS])
    assert entries_of(card, L.OP_TERMINAL_ENROLLED) == entries_of(admin, L.OP_TERMINAL_ENROLLED) \
        == 2
    # the card shard's cards swipe at its terminals, until a revocation reaches it
    number = "6225880000000901"
    opened = card.apply_group([open_op("o1", number), op("t1", L.OP_TOP_UP, number, 5_000)],
                              NOW + 5)
    assert [o.reason for o in opened] == [L.R_OK, L.R_OK]
    assert card.apply_group([swipe("s1", L.OP_TOP_UP, number, 100, 11, 1)],
                            NOW + 6)[0].reason == L.R_OK
    assert relay.admin_group([revoke("r11", 11)], NOW + 7) == ([L.R_OK], [L.R_OK])
    assert card.apply_group([swipe("s2", L.OP_TOP_UP, number, 100, 11, 2)],
                            NOW + 8)[0].reason == L.R_TERMINAL_REVOKED
    assert terminals(card) == terminals(admin) == [(11, L.TERMINAL_REVOKED, 3),
                                                   (12, L.TERMINAL_ACTIVE, 3)]
    assert operators(card) == operators(admin) and len(operators(card)) == 1
    assert card.read_admin_relay() == (ADMIN_SHARD, L.RELAY_ROLE_CARD, 4)
    assert admin.read_admin_relay() == (ADMIN_SHARD, L.RELAY_ROLE_ADMIN, 0)
    # an admin group relayed twice, or out of order, is a bug: the group is not applied
    before = card.dump()
    again = relay_ops(ADMIN_SHARD, 4, encode_group([enroll("e13", 13, 3)], NOW + 9))
    with pytest.raises(InvariantError):
        card.apply_group(again, NOW + 10)
    with pytest.raises(InvariantError):  # the mark must open its group
        card.apply_group([op("t2", L.OP_TOP_UP, number, 1), *relay_ops(
            ADMIN_SHARD, 9, encode_group([enroll("e13", 13, 3)], NOW + 9))], NOW + 10)
    with pytest.raises(InvariantError):  # nor may a shard change its place
        card.apply_group([relay_mark(ADMIN_SHARD + 1, L.RELAY_ROLE_CARD)], NOW + 10)
    assert card.dump() == before
    report = card.verify()
    assert report["ok"], report["problems"]


def test_the_admin_shard_refuses_a_cards_operations_and_spends_no_ksn_on_them(pair):
    admin, _ = pair
    assert admin.apply_group([enroll("e31", 31, 3)], NOW)[0].reason == L.R_OK
    number = "6225880000000931"
    got = admin.apply_group([open_op("o", number), op("t", L.OP_TOP_UP, number, 100),
                             swipe("s", L.OP_TOP_UP, number, 100, 31, 1)], NOW + 1)
    assert [o.reason for o in got] == [L.R_NOT_A_CARD_SHARD] * 3
    assert admin.read_card(cid(number)) is None
    assert [t[5] for t in admin.read_terminals()] == [0]  # the KSN high-water, untouched
    # no request record (``landed`` finds none: the operation never applied)
    assert admin.landed([open_op("o", number)])[0].reason == L.R_STORAGE_UNAVAILABLE


def test_operator_ids_stay_alike_and_no_caller_plants_a_record_a_relay_would_meet(pair):
    """A floor of the operator ids made on the admin shard is relayed (the next operator gets
    one id everywhere); one sent to a card shard changes nothing; a reversal naming a relayed
    key is refused there (its tombstone would answer the relayed change instead of applying
    it: a review's finding)."""
    from cardcore.admin import FLOOR_OPERATOR_ID, floor_op

    admin, card = pair
    relay = Relay(admin, card)
    assert card.apply_group([floor_op(FLOOR_OPERATOR_ID, 0, 500)], NOW)[0].count == 0
    assert relay.admin_group([floor_op(FLOOR_OPERATOR_ID, 0, 40)], NOW + 1) == ([L.R_OK], [L.R_OK])
    assert relay.admin_group([add_operator("bob", "bob", 1)], NOW + 2) == ([L.R_OK], [L.R_OK])
    assert operators(card) == operators(admin) and operators(card)[0][0] == 40
    number = "6225880000000951"
    card.apply_group([open_op("o", number)], NOW + 3)
    coming = revoke("r-later", 51)
    planted = op("rev", L.OP_REVERSAL, number, 0, at=NOW,
                 original_key=L.RELAYED_KEY_PREFIX + coming.request_key)
    assert card.apply_group([planted], NOW + 4)[0].reason == L.R_ORIGINAL_NOT_FOUND
    assert relay.admin_group([enroll("e51", 51, 3), coming], NOW + 5) \
        == ([L.R_OK, L.R_OK], [L.R_OK, L.R_OK])
    assert terminals(card) == terminals(admin) == [(51, L.TERMINAL_REVOKED, 3)]


def test_a_relayed_request_is_judged_at_the_admin_groups_time_not_the_card_shards(pair):
    """A request's age is judged where the admin shard judged it, at its group's time: a card
    shard that relays it nine days later applies what the admin shard applied, and refuses what
    it refused."""
    admin, card = pair
    relay = Relay(admin, card)
    late = NOW + 9 * DAY
    fresh = enroll("fresh", 21, 3, at=NOW)
    stale = enroll("stale", 22, 3, at=NOW - 8 * DAY)  # older than the request window (7 days)
    assert relay.admin_group([fresh, stale], NOW + 1, card_ts_us=late) \
        == ([L.R_OK, L.R_REQUEST_TOO_OLD], [L.R_OK, L.R_REQUEST_TOO_OLD])
    # and their relayed records are never pruned on the card shard (a re-send the admin
    # shard answers from its record is answered there too), whatever time passes
    card.apply_group([PendingOp.internal(L.OP_MAINTENANCE)], late + 9 * DAY)
    assert relay.admin_group([enroll("fresh", 21, 3, at=NOW)], NOW + 2, card_ts_us=late + 10 * DAY) \
        == ([L.R_OK], [L.R_OK])
    assert terminals(card) == terminals(admin) == [(21, L.TERMINAL_ACTIVE, 3)]


def test_a_window_raised_after_pruning_judges_alike_on_both_shards(pair):
    """The admin shard keeps every request record (no pruning floor), so a window raised later
    judges a request's age on it as the card shards judge the relay: at the group's time alone.
    (With a floor left by pruning under the short window, the admin shard refused what every
    card shard applied: a review's finding.)"""
    from cardcore.admin import window_op

    admin, card = pair
    relay = Relay(admin, card)
    hour = 3600 * 1_000_000
    assert relay.admin_group([window_op(3600)], NOW) == ([L.R_OK], [L.R_OK])
    assert relay.admin_group([enroll("a", 41, 3, at=NOW)], NOW + 1) == ([L.R_OK], [L.R_OK])
    relay.admin_group([PendingOp.internal(L.OP_MAINTENANCE)], NOW + 3 * hour)  # past its window
    assert relay.admin_group([window_op(7 * 24 * 3600)], NOW + 3 * hour + 1) == ([L.R_OK], [L.R_OK])
    late = enroll("late", 42, 3, at=NOW - hour)  # in the 7-day window, before the pruned one
    assert relay.admin_group([late], NOW + 3 * hour + 2) == ([L.R_OK], [L.R_OK])
    assert terminals(card) == terminals(admin)
    for ledger in (admin, card):
        report = ledger.verify()
        assert report["ok"], report["problems"]


def test_an_admin_shard_refuses_a_program_that_drops_a_tier_since_it_sees_no_cards(pair, tmp_path):
    """A card shard cannot refuse what the admin shard took (they would part), so the admin
    shard, which holds no cards, refuses any program with fewer tiers; a lone ledger refuses only
    one that drops a tier its cards hold."""
    admin, card = pair
    relay = Relay(admin, card)

    def load(request_id: str, name: str) -> PendingOp:
        with open(os.path.join(PROGRAMS, f"{name}.toml")) as f:
            source = f.read()
        return PendingOp.admin(key(request_id, (L.CALLER_SYSTEM, 0)), L.OP_PROGRAM_LOADED,
                               bytes(16), source.encode(), 0, client_time_us=NOW)

    assert relay.admin_group([load("salon", "salon")], NOW + 1) == ([L.R_OK], [L.R_OK])
    assert relay.admin_group([load("cafe", "cafe")], NOW + 2) \
        == ([L.R_PROGRAM_STRANDS_CARDS], [L.R_PROGRAM_STRANDS_CARDS])
    assert admin.program_version == card.program_version == 2
    alone = Ledger(str(tmp_path / "alone"), sync=False)
    try:
        assert alone.apply_group([load("salon", "salon")], NOW + 1)[0].reason == L.R_OK
        assert alone.apply_group([load("cafe", "cafe")], NOW + 2)[0].reason == L.R_OK
    finally:
        alone.close()


def test_the_card_shards_replica_users_may_read_the_admin_shards_stream_and_nothing_more_of_it(
        tmp_path):
    """cluster-config --admin-shard: every other shard's replica user may read (info, records)
    the admin shard's stream, never append to it, purge it, make it or report its checkpoints;
    the admin shard's own user gains nothing; every replica.env names the admin shard; a number
    that is not one of the shards is refused."""
    from argparse import Namespace

    from cardcore.jetlog import log_subject, stream_name
    from cardcore.server.clusterconf import (cmd_cluster_config, nats_users,
                                             shard_replica_permissions, shard_replica_role)

    users = nats_users(3, admin_shard=2)
    admin_stream = stream_name(2)
    for shard in (0, 1):
        allowed = users[shard_replica_role(shard)]["publish"]
        mine = shard_replica_permissions(shard)["publish"]
        assert set(allowed) - set(mine) == {f"$JS.API.STREAM.INFO.{admin_stream}",
                                            f"$JS.API.STREAM.MSG.GET.{admin_stream}",
                                            f"$JS.API.DIRECT.GET.{admin_stream}",
                                            f"$JS.API.DIRECT.GET.{admin_stream}.>"}
        assert log_subject(2) not in allowed
    assert users[shard_replica_role(2)] == shard_replica_permissions(2)

    def config(out: str, shards: int, admin_shard: int | None) -> int:
        return cmd_cluster_config(Namespace(
            nodes=["n0=127.0.0.1", "n1=127.0.0.2", "n2=127.0.0.3"], out=str(tmp_path / out),
            program=None, keyring=None, shards=shards, admin_shard=admin_shard,
            etc_dir="/etc/cardcore", host_data_dir="/var/lib/cardcore", client_port=4222,
            route_port=6222, http_port=8222))

    assert config("refused", 2, 2) == 2 and not os.path.exists(tmp_path / "refused")
    assert config("made", 3, 2) == 0
    with open(tmp_path / "made" / "n1" / "replica.env") as f:
        assert "CARDCORE_ADMIN_SHARD=2\n" in f.read()
    with open(tmp_path / "made" / "n1" / "nats.conf") as f:
        assert f"$JS.API.STREAM.MSG.GET.{admin_stream}" in f.read()
