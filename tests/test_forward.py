"""A replacement by a card of another card shard (docs/cluster.md, "A replacement by a card of
another card shard"), on two ledgers in-process: the new card's number forwarded by the shard
its slot routes to (b) to the old card's shard (a), where the replacement is made as on one
ledger; b then refuses every operation on that card with nothing recorded, never takes the
number for another shard, owes a's card the bonus of a referral by it, and keeps all this
across a restart; verify holds both and catches a forwarded card held. The running front's test is in test_sharded_front.py."""
from __future__ import annotations

from cardcore import layout as L
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger
from cardcore.shards import forward, outbox_bonus
from cardcore.verify import verify
from test_card_programs import Till, example
from test_ledger import cid, key, op, open_op
from test_replacement import replace, replace_op

SHARD_A, SHARD_B = 1, 2  # the old card's shard; the new number's (its slot's)
OLD, NEW, HERE, LATE, EARLY, REFERRED = (
    "6225880000000701", "6225880000000719", "6225880000000727", "6225880000000735",
    "6225880000000743", "6225880000000750")
PROGRAM = "referral_points = 300\n" + example("cafe")


def clean(till: Till) -> None:
    report = verify(till.ledger)
    assert report["ok"], report["problems"]


def test_a_forwarded_number_is_the_other_shards_card_and_never_one_here(tmp_path):
    a = Till(str(tmp_path / "a"), PROGRAM)
    b = Till(str(tmp_path / "b"), PROGRAM)
    a.open(OLD)
    assert a.top_up(OLD, 30_000).reason == L.R_OK
    held = a.card(OLD)
    # b forwards the new number to a once; again, the same: nothing changes; to another
    # shard: the number is taken
    made = [b.apply(forward(cid(NEW), SHARD_A))[0] for _ in range(2)]
    assert [(o.reason, o.count) for o in made] == [(L.R_OK, 1), (L.R_OK, 0)]
    assert b.apply(forward(cid(NEW), 3))[0].reason == L.R_CARD_ALREADY_EXISTS
    assert b.ledger.read_forwards() == [(1, cid(NEW), SHARD_A)]
    assert b.ledger.read_forwards(1) == []
    # the replacement on a, as on one ledger: the new card holds what the old one held
    assert replace(a, OLD, NEW).reason == L.R_OK
    assert a.card(NEW) == held
    # on b, every operation on the new card is refused, and nothing of it recorded: the same
    # requests, sent on to a, are the first there
    journal = b.ledger.dump()["journal"]
    on_new = [open_op("o-1", NEW, at=b.at + 1), op("t-1", L.OP_TOP_UP, NEW, 100, at=b.at + 1),
              b.purchase(NEW, amount=500, request_id="p-1"), replace_op(b, NEW, HERE)]
    assert [o.reason for o in b.apply(*on_new)] == [L.R_CARD_ELSEWHERE] * 4
    assert b.ledger.dump()["journal"] == journal and b.ledger.read_card(cid(NEW)) is None
    assert all(b.ledger.read_operation(o.request_key) is None for o in on_new)
    (topped,) = a.apply(op("t-1", L.OP_TOP_UP, NEW, 100, at=a.at + 1))
    assert topped.reason == L.R_OK and a.card(NEW)["principal"] == held["principal"] + 100
    # b's own card replaced by the forwarded number: taken; a card b holds is not forwarded
    b.open(HERE)
    assert replace(b, HERE, NEW).reason == L.R_CARD_ALREADY_EXISTS
    assert b.apply(forward(cid(HERE), SHARD_A))[0].reason == L.R_CARD_ALREADY_EXISTS
    # in one group, in its order: a card opened, then forwarded (taken); a number forwarded,
    # then opened (refused)
    got = b.apply(open_op("o-2", LATE, at=b.at + 1), forward(cid(LATE), SHARD_A),
                  forward(cid(EARLY), SHARD_A), open_op("o-3", EARLY, at=b.at + 1))
    assert [o.reason for o in got] == [L.R_OK, L.R_CARD_ALREADY_EXISTS, L.R_OK,
                                       L.R_CARD_ELSEWHERE]
    assert [(n, c) for n, c, _ in b.ledger.read_forwards()] == [(1, cid(NEW)), (2, cid(EARLY))]
    # an opening on b on the referral of the forwarded number, sent unmarked (by a front that
    # had not read the forward): the bonus is owed to a, in b's outbox, and paid there
    (referred,) = b.apply(PendingOp.build(key("o-5"), L.OP_OPEN, cid(REFERRED), profile=b"{}",
                                          client_time_us=b.at + 1, referrer_id=cid(NEW)))
    assert referred.reason == L.R_OK
    (owed,) = b.ledger.read_outbox()
    assert owed[3:5] == (cid(NEW), 300)
    points = a.card(NEW)["points"]
    assert a.apply(outbox_bonus(SHARD_B, owed))[0].reason == L.R_OK
    assert a.card(NEW)["points"] == points + 300
    clean(a)
    clean(b)
    # across a restart: the forwards are read again, and hold
    path = b.ledger.path
    b.ledger.close()
    b.ledger = Ledger(path)
    assert b.ledger.forwards == {cid(NEW): SHARD_A, cid(EARLY): SHARD_A}
    assert b.apply(open_op("o-4", NEW, at=b.at + 1))[0].reason == L.R_CARD_ELSEWHERE
    clean(b)
    # verify: a forwarded number that is a card here (written behind the ledger's back)
    with b.ledger.env.begin(write=True) as txn:
        txn.put(L.FORWARD_KEY_PREFIX + cid(HERE), L.FORWARD.pack(L.FORWARD_VERSION, SHARD_A, 3),
                db=b.ledger.meta)
        txn.put(L.FORWARDS_KEY_PREFIX + L.FORWARDS_KEY.pack(3), cid(HERE), db=b.ledger.meta)
    report = verify(b.ledger)
    assert not report["ok"] and any("forwarded to another shard, and held here" in p
                                    for p in report["problems"]), report["problems"]
    b.ledger.close()
    a.ledger.close()


def test_a_forward_with_a_wrong_payload_is_refused_and_changes_nothing(tmp_path):
    b = Till(str(tmp_path / "b"), PROGRAM)
    for payload in (b"", b"\x01", b"\x01\x00\x00"):
        (bad,) = b.apply(PendingOp.internal(L.OP_CARD_FORWARDED, payload, subject=cid(NEW)))
        assert bad.reason == L.R_INVALID_ARGUMENT
    assert b.ledger.read_forwards() == [] and b.ledger.forwards == {}
    b.ledger.close()
