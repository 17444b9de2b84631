"""Replicas applying the same group log end identical (docs/cluster.md, "Determinism rules").

In-process, no NATS: a leader applies groups through ``DurableLedger.apply`` (its local group
log), and followers created alike (``Ledger(initial_time_us=...)``, the same program and keys)
replay that log through ``DurableLedger`` (the replay path ``follow`` runs: each group's journal
digest checked), each in a process of its own with another ``PYTHONHASHSEED`` (no order may come
from hashing). The groups cover openings and an import with sealed profiles, top-ups, a purchase
with lines, a refund, a reversal, holds (captured, voided, expired by the writer's sweep), a
replacement (the writer re-seals the profile for the new card), a referral across card shards
(openings marked so, their outbox records, one taken out, a bonus another shard owed), two card
numbers forwarded to the card shards that hold their cards, and admin
operations (operators,
terminals, regions, stores, a program load, the request window, a close of day, a data key
rotation and its re-seal, a floor, a maintenance step). Every sub-database is then compared byte
for byte, and the journal head: replicas with the keys, replicas without, and one of each (the
keyring is not part of the group, so what a replica stores may not depend on it but for the
member index).
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest

from cardcore import layout as L
from cardcore import stores
from cardcore.admin import FLOOR_TERMINAL_KSN, floor_op, reseal_payload, window_op
from cardcore.daytotals import close_subject, day_of_date
from cardcore.durable import DurableLedger
from cardcore.grouplog import LogView
from cardcore.groups import encode_group
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger
from cardcore.lookup import lookup_key
from cardcore.profiles import ProfileBox, encode, profile_key
from cardcore.shards import forward, outbox_bonus, outbox_done, referrer_elsewhere
from test_card_programs import CAFE_DRINKS, CAFE_FOOD, example, line
from test_holds import capture_op, hold_op
from test_ledger import KEY, NOW, add_operator, cid, enroll, key, load, op, revoke

T0 = NOW - 3_600_000_000          # the shard's genesis time (its record, in the cluster)
MINUTE = 60_000_000
ENTRY_SEQ = struct.Struct("<8xQ")  # a journal entry's seq (layout.JOURNAL)
NUMBERS = [f"62258800000{n:05d}" for n in range(1, 8)]
OLD, NEW = NUMBERS[0], NUMBERS[5]        # replaced by a request the gRPC process built
TOOL_OLD, TOOL_NEW = NUMBERS[3], NUMBERS[6]  # by a tool's request: the writer re-seals
REFERRED = ("6225880000000008", "6225880000000009")  # on a referral from another card shard


def ledger_at(path: str, keyed: bool, t0: int = T0) -> Ledger:
    """A ledger made as every replica of the shard makes it: same genesis time and program,
    and (``keyed``) the profile and lookup keys of the shard's keyring."""
    os.makedirs(path, exist_ok=True)
    keys = {"profile_key": profile_key(KEY), "lookup_key": lookup_key(KEY)} if keyed else {}
    return Ledger(path, initial_program=example("cafe"), initial_time_us=t0, **keys)


def sealed_profile(number: str, name: str, phone: str, masked: str = "",
                   card_id: bytes | None = None) -> bytes:
    """A profile as the gRPC process seals it (``operations._sealed_profile``)."""
    doc = {"masked": masked or number[:6] + "******" + number[-4:], "name": name, "phone": phone,
           "birthday": "1990-05-17"}
    return ProfileBox(profile_key(KEY)).seal(card_id or cid(number), doc)


def open_with_profile(request_id: str, number: str, at: int) -> PendingOp:
    return PendingOp.build(key(request_id), L.OP_OPEN, cid(number), home_store_id=3,
                           profile=sealed_profile(number, f"Member {number[-2:]}",
                                                  f"1380000{number[-4:]}"),
                           sealed=b"sealed-number-v1-" + number[-4:].encode(),
                           birth_month=5, client_time_us=at)


def import_card(request_id: str, number: str, at: int) -> PendingOp:
    return PendingOp.build(key(request_id), L.OP_IMPORT_CARD, cid(number), 12_000, store_id=3,
                           home_store_id=3, profile=sealed_profile(number, "Imported", "139"),
                           sealed=b"sealed-number-v1-" + number[-4:].encode(), birth_month=5,
                           ref_id=500, redeem_points=40, client_time_us=at)


def replace_card(request_id: str, old: str, new: str, at: int, sealed_by_front: bool) -> PendingOp:
    """As ``operations.replace_card_op`` builds it (``sealed_by_front``: the old card's profile
    with the new mask, sealed for the new card), or as a tool does (the mask alone: the writer
    moves the profile and seals it again)."""
    mask = {"masked": new[:6] + "******" + new[-4:]}
    profile = (sealed_profile(old, f"Member {old[-2:]}", f"1380000{old[-4:]}", mask["masked"],
                              cid(new)) if sealed_by_front else encode(mask))
    return PendingOp.build(key(request_id), L.OP_CARD_REPLACED, cid(old), store_id=3,
                           operator_id=1, client_time_us=at, referrer_id=cid(new),
                           profile=profile, sealed=b"sealed-number-v1-" + new[-4:].encode())


def admin_op(request_id: str, kind: int, subject: bytes, payload: bytes, at: int) -> PendingOp:
    return PendingOp.admin(key(request_id, (L.CALLER_SYSTEM, 0)), kind, subject, payload, 0,
                           client_time_us=at)


def lead(folder: str) -> list[list]:
    """The leader: every group through ``DurableLedger.apply``; the outcomes' reasons."""
    durable = DurableLedger(lambda: ledger_at(os.path.join(folder, "ledger"), True),
                            log_folder=os.path.join(folder, "log"), sync=False)
    reasons, at = [], NOW

    def group(ops: list, step_us: int) -> list:
        nonlocal at
        at += step_us
        outcomes, _ = durable.apply(encode_group(ops, at))
        reasons.append([o.reason for o in outcomes])
        return outcomes

    run_groups(group, lambda: at)
    durable.close()
    return reasons


def run_groups(apply: Callable[[list, int], list], clock: Callable[[], int]) -> None:
    """The run's groups, each applied by ``apply(ops, step_us)`` (its outcomes; ``step_us``: how
    far the group's time moves on from the last, where the caller sets group times) with
    ``clock()`` the client time of its operations: in-process here, and through a running shard
    in tests/test_cluster.py (group times the leader's clock; the expiry's step then not taken)."""

    def group(*ops, step_us: int = 1_000):
        return apply(list(ops), step_us)

    at = clock()
    group(add_operator("op-1", "manager", 2, (3,), at=at),
          admin_op("region-1", L.OP_REGION_PUT, stores.region_subject(1), b"North", at),
          admin_op("store-3", L.OP_STORE_PUT, stores.store_subject(3, 1, (480, 4)), b"Main",
                   at),
          enroll("t-7", 7, 3, at=at), enroll("t-8", 8, 3, at=at))
    at = clock()
    group(*(open_with_profile(f"open-{n}", n, at) for n in NUMBERS[:4]),
          import_card("import-5", NUMBERS[4], at))
    at = clock()
    group(*(op(f"top-{n}", L.OP_TOP_UP, n, 30_000, at) for n in NUMBERS[:4]))
    at = clock()
    sale = group(op("sale-1", L.OP_PURCHASE, NUMBERS[1], 5_800, at,
                    lines=line(CAFE_DRINKS, 3_200, 2, b"LATTE-L") + line(CAFE_FOOD, 2_600)),
                 op("sale-2", L.OP_PURCHASE, NUMBERS[2], 1_500, at),
                 hold_op("hold-1", NUMBERS[3], 4_000, 30, at),
                 hold_op("hold-2", NUMBERS[3], 1_000, 30, at),
                 hold_op("hold-3", NUMBERS[2], 500, 5, at))
    seq_of = [ENTRY_SEQ.unpack_from(o.entry)[0] for o in sale]  # (a shard's answer: the head)
    at = clock()
    group(op("refund-1", L.OP_REFUND, NUMBERS[1], 2_000, at, link_seq=seq_of[0]),
          op("reverse-2", L.OP_REVERSAL, NUMBERS[2], 0, at, original_key=key("sale-2")),
          capture_op("capture-1", NUMBERS[3], seq_of[2], 3_500, at),
          op("void-2", L.OP_HOLD_VOID, NUMBERS[3], 0, at, link_seq=seq_of[3]))
    at = clock()
    group(replace_card("replace-1", OLD, NEW, at, True),
          replace_card("replace-2", TOOL_OLD, TOOL_NEW, at, False))
    at = clock()
    group(load("referral_points = 200\n" + example("cafe") + "\n# the second edition\n"),
          window_op(3 * 24 * 3600),
          admin_op("close-3", L.OP_CLOSE_DAY, close_subject(3, day_of_date("2020-01-02")), b"", at),
          admin_op("rotate-2", L.OP_DATA_KEY_ROTATED, (2).to_bytes(4, "little") + bytes(12), b"",
                   at),
          PendingOp.internal(L.OP_RESEAL, reseal_payload(
              [(cid(NUMBERS[1]), b"sealed-number-v1-" + NUMBERS[1][-4:].encode(), b"sealed-v2")])),
          floor_op(FLOOR_TERMINAL_KSN, 7, 1_000),
          revoke("revoke-8", 8, at=at))
    group(PendingOp.internal(L.OP_MAINTENANCE), step_us=10 * MINUTE)  # hold-3 expires (sweep)
    at = clock()  # a referral across card shards: an opening whose referrer is on another card
    # shard (its bonus in this shard's outbox), a bonus another shard's outbox owed a card
    # here, then the outbox record taken out (docs/cluster.md, "Two cards on two card shards")
    referred = group(*(referrer_elsewhere(PendingOp.build(
                           key(f"open-{n}"), L.OP_OPEN, cid(n), home_store_id=3,
                           profile=sealed_profile(n, "Referred", "1390000" + n[-4:]),
                           sealed=b"sealed-number-v1-" + n[-4:].encode(), client_time_us=at,
                           referrer_id=cid("6225880000009991"))) for n in REFERRED),
                     outbox_bonus(5, (L.OUTBOX_VERSION, L.OUTBOX_REFERRAL, 77, cid(NUMBERS[1]),
                                      200, at)))
    group(outbox_done([ENTRY_SEQ.unpack_from(referred[0].entry)[0]]))  # (the second's stays)
    # two numbers of new cards replacements made on other card shards (docs/cluster.md, "A
    # replacement by a card of another card shard")
    group(forward(cid("6225880000009992"), 3), forward(cid("6225880000009993"), 4))
    at = clock()
    group(op("top-late", L.OP_TOP_UP, NEW, 100, at))  # the new card goes on


FOLLOW = """
import sys
sys.path.insert(0, {tests!r})
from test_determinism import follow
follow({folder!r}, {log!r}, {keyed!r}, {t0!r})
"""


def follow(folder: str, log_folder: str, keyed: bool, t0: int) -> None:
    """A follower (in a process of its own: ``t0`` the leader's genesis time, not its own
    import's): a ledger made alike replays the leader's log (each group's journal digest
    checked), then checkpoints."""
    durable = DurableLedger(lambda: ledger_at(os.path.join(folder, "ledger"), keyed, t0),
                            LogView(log_folder), sync=False)
    assert durable.replayed > 0 and durable.follow() == 0
    durable.close()


def follower(tmp_path, name: str, log_folder: str, keyed: bool, hash_seed: int) -> str:
    folder = str(tmp_path / name)
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([sys.executable, "-c", FOLLOW.format(
        tests=os.path.dirname(__file__), folder=folder, log=log_folder, keyed=keyed, t0=T0)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def contents(folder: str, keyed: bool) -> tuple[dict, tuple]:
    ledger = ledger_at(os.path.join(folder, "ledger"), keyed)
    try:
        report = ledger.verify()
        assert report["ok"], report["problems"]
        return ledger.dump(), ledger._read(ledger.journal_head)
    finally:
        ledger.close()


def differing(a: dict, b: dict) -> list[str]:
    return sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))


@pytest.fixture(scope="module")
def leader(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("leader"))
    return folder, lead(folder)


def test_every_operation_of_the_run_applied(leader):
    """The groups do what they say (a refused one would prove nothing about its path)."""
    folder, reasons = leader
    assert reasons and all(r == L.R_OK for group in reasons for r in group), reasons
    dump = contents(folder, True)[0]
    kinds = {L.JOURNAL.unpack(v)[1] for _, v in dump["journal"]}
    outbox = [L.OUTBOX.unpack(v) for k, v in dump["meta"] if k.startswith(L.OUTBOX_KEY_PREFIX)]
    assert len(outbox) == 1 and outbox[0][4] == 200  # (the second referred opening's)
    assert sorted(L.FORWARD.unpack(v)[1] for k, v in dump["meta"]
                  if k.startswith(L.FORWARD_KEY_PREFIX)) == [3, 4]
    assert {L.OP_OPEN, L.OP_IMPORT_CARD, L.OP_REFUND, L.OP_REVERSAL, L.OP_HOLD_EXPIRED,
            L.OP_CARD_REPLACED, L.OP_REPLACEMENT_OPENED, L.OP_PROGRAM_LOADED, L.OP_CLOSE_DAY,
            L.OP_DATA_KEY_ROTATED, L.OP_STORE_PUT, L.OP_TERMINAL_REVOKED,
            L.OP_REFERRAL_BONUS} <= kinds, kinds


def test_replicas_applying_the_same_log_store_the_same_bytes_in_every_sub_database(leader,
                                                                                   tmp_path):
    folder, _ = leader
    log_folder = os.path.join(folder, "log")
    mine, head = contents(folder, True)
    for seed, name in ((1, "f1"), (2, "f2")):
        theirs, their_head = contents(follower(tmp_path, name, log_folder, True, seed), True)
        assert their_head == head
        assert differing(mine, theirs) == []
    assert mine["profiles"] and mine["cardnos"] and mine["members"]  # (compared, not empty)


def test_replicas_without_the_keys_agree_with_each_other(leader, tmp_path):
    """A shard whose replicas hold no keyring (today's ``cardcore replica``) ends identical too."""
    log_folder = os.path.join(leader[0], "log")
    folders = [follower(tmp_path, name, log_folder, False, seed) for name, seed in
               (("k1", 3), ("k2", 4))]
    one, two = (contents(folder, False) for folder in folders)
    assert one[1] == two[1] and differing(one[0], two[0]) == []
    # Opened with the keys later: the profile a keyless writer stored as JSON (the tool's
    # replacement) is sealed at open (Ledger._seal_profiles), the member index filled: alike.
    assert not dict(one[0]["profiles"])[cid(TOOL_NEW)].startswith(b"\x02")
    one, two = (contents(folder, True) for folder in folders)
    assert differing(one[0], two[0]) == []
    assert dict(one[0]["profiles"])[cid(TOOL_NEW)].startswith(b"\x02") and one[0]["members"]


def test_a_replica_without_the_keys_stores_the_same_profiles_as_one_with_them(leader, tmp_path):
    """The keyring is not the shard's: a replacement built by the gRPC process carries the new
    card's sealed profile, so a replica without the profile key stores the bytes one with it
    does (before, it stored the mask alone: the member's name, phone and birthday lost, with
    the journal's digests equal, so no replica halted). The member index is kept only with the
    lookup key (``members``, and its mark in ``meta``)."""
    log_folder = os.path.join(leader[0], "log")
    keyed = contents(follower(tmp_path, "with", log_folder, True, 5), True)
    keyless = contents(follower(tmp_path, "without", log_folder, False, 6), False)
    assert keyed[1] == keyless[1]
    assert differing(keyed[0], keyless[0]) == ["members", "meta", "profiles"]
    with_profiles, without = dict(keyed[0]["profiles"]), dict(keyless[0]["profiles"])
    assert with_profiles[cid(NEW)] == without[cid(NEW)]
    assert ProfileBox(profile_key(KEY)).open(cid(NEW), without[cid(NEW)])["name"] == "Member 01"
    # a tool's replacement (the mask alone) is moved by the writer: only a keyed one re-seals it
    assert [k for k in with_profiles if with_profiles[k] != without[k]] == [cid(TOOL_NEW)]


def test_verify_finds_a_profile_that_does_not_open_under_its_card(tmp_path):
    """(found by a review) The writer stores the sealed profile a replacement carries as it
    came; one planted from another card (card B's, under card NEW) does not open under NEW:
    ``verify`` with the key says so (before, nothing checked that a sealed profile opens)."""
    a, b, new = NUMBERS[0], NUMBERS[1], NUMBERS[5]
    led = ledger_at(str(tmp_path / "l"), True)
    try:
        assert led.verify()["profiles"] == "checked: 0 sealed"
        led.apply_group([add_operator("op-1", "manager", 2, (3,), at=NOW)], NOW)
        led.apply_group([open_with_profile("oa", a, NOW), open_with_profile("ob", b, NOW)],
                        NOW + 1)
        report = led.verify()
        assert report["ok"] and report["profiles"] == "checked: 2 sealed", report
        b_stored = dict(led.dump()["profiles"])[cid(b)]
        good = replace_card("r1", a, new, NOW + 2, True)
        planted = PendingOp(good.request_key, good.card_id, good.packed, good.digest, b_stored,
                            good.ksn_counter, good.sealed, good.payload, good.need_role,
                            good.scope, good.scope_store_id, good.lines)
        (out,) = led.apply_group([planted], NOW + 2)
        assert out.reason == L.R_OK
        report = led.verify()
        assert not report["ok"] and report["profiles"] == "checked: differs", report
        assert any("do not open under their card" in p for p in report["problems"])
    finally:
        led.close()
