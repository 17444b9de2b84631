"""An opening on one card shard whose referrer is on another (docs/cluster.md, "Two cards on two
card shards"), on two ledgers in-process: the opening's outbox record, its delivery (a bonus
under a request key of its own) and its removal, each once however often they are sent. The
running front's test is in test_sharded_front.py."""
from __future__ import annotations

import struct

from cardcore import layout as L
from cardcore.admin import window_op
from cardcore.idempotency import PendingOp, open_extra, payload_digest
from cardcore.shards import outbox_bonus, outbox_done, referrer_elsewhere
from cardcore.verify import verify
from test_card_programs import Till, example
from test_ledger import cid, key

PROGRAM = "referral_points = 500\n" + example("supermarket")
ACTIVATION = 100  # the supermarket's activation points
SHARD_B = 2       # the new card's card shard


def opening(till: Till, number: str, referrer: str) -> PendingOp:
    return PendingOp.build(key(till.rid()), L.OP_OPEN, cid(number), profile=b"{}",
                           client_time_us=till.at + 1, referrer_id=cid(referrer))


def bonuses(till: Till) -> list[tuple]:
    """Each referral bonus entry's (card, points, link_seq, ref_id, caller kind, caller id)."""
    return [(e[8], e[13], e[28], e[29], e[24], e[26])
            for e in (L.JOURNAL.unpack(v) for _, v in till.ledger.dump()["journal"])
            if e[1] == L.OP_REFERRAL_BONUS]


def clean(till: Till) -> None:
    report = verify(till.ledger)
    assert report["ok"], report["problems"]


def test_a_referral_across_card_shards_pays_its_referrer_once_through_the_outbox(tmp_path):
    a, b = Till(str(tmp_path / "a"), PROGRAM), Till(str(tmp_path / "b"), PROGRAM)
    referrer, new, stranger = "6225880000000701", "6225880000000702", "6225880000000703"
    a.open(referrer)
    plain = opening(b, new, referrer)
    marked = referrer_elsewhere(plain)
    # the same request: its digest over the marked bytes is the plain one's
    extra = open_extra(b"{}", cid(referrer), 0)
    assert payload_digest(marked.packed, extra) == payload_digest(plain.packed, extra) \
        == plain.digest and marked.packed != plain.packed
    (opened,) = b.apply(marked)
    assert opened.reason == L.R_OK
    seq = L.JOURNAL.unpack(opened.entry)[7]
    made_us = struct.unpack_from("<q", opened.entry, L.JOURNAL_OFF_TS)[0]  # (the group's time)
    # the new card has its activation points; no bonus here (the referrer is not a card of
    # this shard), one outbox record instead, which verify accepts
    assert b.card(new)["points"] == ACTIVATION and bonuses(b) == []
    (record,) = b.ledger.read_outbox()
    assert record == (L.OUTBOX_VERSION, L.OUTBOX_REFERRAL, seq, cid(referrer), 500, made_us)
    clean(b)
    # delivered twice in one group (two fronts), then again later (a front that did not hear
    # the answer), then past the request window (a front whose follower was left behind): the
    # referrer gets 500 once; every delivery is answered OK but the last, refused as too old
    first = a.apply(outbox_bonus(SHARD_B, record), outbox_bonus(SHARD_B, record))
    later = a.apply(outbox_bonus(SHARD_B, record), at=a.at + 10 ** 9)
    assert [o.reason for o in first + later] == [L.R_OK] * 3
    hour_us = 3_600 * 10 ** 6  # (the shortest window; a group's time moves an hour at most)
    assert a.apply(window_op(3_600))[0].reason == L.R_OK
    for _ in range(2):
        a.apply(PendingOp.internal(L.OP_MAINTENANCE), at=a.at + hour_us)
    (too_old,) = a.apply(outbox_bonus(SHARD_B, record))
    assert too_old.reason == L.R_REQUEST_TOO_OLD
    assert a.card(referrer)["points"] == ACTIVATION + 500
    assert bonuses(a) == [(cid(referrer), 500, seq, SHARD_B + 1, L.CALLER_SYSTEM, SHARD_B + 1)]
    clean(a)
    # taken out once; a second removal (another front's) takes nothing out
    done = [b.apply(outbox_done([seq]))[0] for _ in range(2)]
    assert [(o.reason, o.count) for o in done] == [(L.R_OK, 1), (L.R_OK, 0)]
    assert b.ledger.read_outbox() == []
    clean(b)
    # a referrer that is no card there: declined, as a single ledger declines it, and settled
    # (b's clock brought up to a's first, an hour a journaled group: the shards' clocks are
    # one time)
    for _ in range(4):
        b.top_up(new, 1, at=a.at)
    assert b.ledger.read_horizons()[2] >= a.ledger.read_horizons()[2]
    (opened,) = b.apply(referrer_elsewhere(opening(b, "6225880000000704", stranger)))
    (record,) = b.ledger.read_outbox()
    (declined,) = a.apply(outbox_bonus(SHARD_B, record))
    assert declined.reason == L.R_CARD_NOT_FOUND and len(bonuses(a)) == 1
    # the referrer on this very shard (not marked): the bonus here, as on a single ledger
    (opened,) = b.apply(opening(b, "6225880000000705", new))
    assert opened.reason == L.R_OK and b.card(new)["points"] == ACTIVATION + 500
    assert len(b.ledger.read_outbox()) == 1  # (the stranger's, still there)
    clean(b)
    a.ledger.close()
    b.ledger.close()


def test_verify_finds_an_outbox_record_no_opening_explains(tmp_path):
    b = Till(str(tmp_path / "b"), PROGRAM)
    b.open("6225880000000711")
    (opened,) = b.apply(referrer_elsewhere(opening(b, "6225880000000712", "6225880000000713")))
    seq = L.JOURNAL.unpack(opened.entry)[7]
    clean(b)
    (record,) = b.ledger.read_outbox()
    forged = [(seq, record[3], 5000),   # more points than the program gives
              (seq, cid("6225880000000714"), 500),  # another referrer than the opening's
              (seq - 1, record[3], 500)]  # an entry that is no such opening
    for at, referrer, points in forged:
        with b.ledger.env.begin(write=True) as txn:
            txn.delete(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(seq), db=b.ledger.meta)
            txn.put(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(at), L.OUTBOX.pack(
                L.OUTBOX_VERSION, L.OUTBOX_REFERRAL, at, referrer, points, record[5]),
                db=b.ledger.meta)
        report = verify(b.ledger)
        assert not report["ok"] and any("outbox record" in p for p in report["problems"]), at
        with b.ledger.env.begin(write=True) as txn:
            txn.delete(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(at), db=b.ledger.meta)
            txn.put(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(seq), L.OUTBOX.pack(*record),
                    db=b.ledger.meta)
        clean(b)
    # a removal that is not u64 seqs changes nothing
    (bad,) = b.apply(PendingOp.internal(L.OP_OUTBOX_DONE, struct.pack("<Q", seq)[:5]))
    assert bad.reason == L.R_INVALID_ARGUMENT and len(b.ledger.read_outbox()) == 1
    b.ledger.close()


def test_a_second_bonus_for_one_opening_of_another_shard_is_found_by_verify(tmp_path):
    """A bonus delivered under another request key for the same opening (a front's bug): the
    referrer's shard's verify names it."""
    a = Till(str(tmp_path / "a"), PROGRAM)
    a.open("6225880000000721")
    record = (L.OUTBOX_VERSION, L.OUTBOX_REFERRAL, 42, cid("6225880000000721"), 500, a.at)
    assert a.apply(outbox_bonus(SHARD_B, record))[0].reason == L.R_OK
    clean(a)
    again = outbox_bonus(SHARD_B + 1, record)  # (another key: shard 3's caller id) ...
    packed = bytearray(again.packed)
    struct.pack_into("<Q", packed, 144, SHARD_B + 1)  # ... for shard 2's opening 42
    assert a.apply(PendingOp(again.request_key, again.card_id, bytes(packed), again.digest))[
        0].reason == L.R_OK
    report = verify(a.ledger)
    assert not report["ok"] and any("second" in p for p in report["problems"])
    a.ledger.close()
