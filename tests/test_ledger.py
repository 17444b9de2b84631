"""The ledger over real LMDB in a temp folder, below the gRPC layer."""
from __future__ import annotations

import os
import threading
import time

import pytest

from cardcore import cards
from cardcore import layout as L
from cardcore.admin import reseal_payload, window_op
from cardcore.idempotency import (CLIENT_TIME_AHEAD_MAX_US, PendingOp, request_key,
                                  SCOPE_STORE, SCOPE_SUBJECT_TERMINAL)
from cardcore.ledger import Ledger, _head
from conftest import new_card_number

KEY = bytes(range(32))
NOW = time.time_ns() // 1000          # the group time the tests give (a new ledger starts at the
                                      # real clock: its program is journaled then)
HOUR = 3600 * 1_000_000
DEV = (L.CALLER_DEVELOPMENT, 0)


def cid(number: str) -> bytes:
    return cards.card_id(KEY, number)


def key(request_id: str, caller=DEV) -> bytes:
    return request_key(*caller, request_id.encode())


def open_op(request_id: str, number: str, tier: int = 0, at=NOW, caller=DEV) -> PendingOp:
    return PendingOp.build(key(request_id, caller), L.OP_OPEN, cid(number), tier=tier,
                           profile=b"{}", client_time_us=at)


def op(request_id: str, kind: int, number: str, amount: int, at=NOW, caller=DEV,
       **kw) -> PendingOp:
    flags = L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET if kind == L.OP_PURCHASE else 0
    return PendingOp.build(key(request_id, caller), kind, cid(number), amount, store_id=3,
                           pin_flags=flags, client_time_us=at, **kw)


def enroll(request_id: str, tid: int, store: int, by: int = 0, at=NOW) -> PendingOp:
    subject = tid.to_bytes(4, "little") + store.to_bytes(4, "little") + b"IKID" + tid.to_bytes(4, "big")
    caller = (L.CALLER_OPERATOR, by) if by else (L.CALLER_SYSTEM, 0)
    return PendingOp.admin(key(request_id, caller), L.OP_TERMINAL_ENROLLED, subject, b"", by,
                           client_time_us=at)


def revoke(request_id: str, tid: int, by: int = 0, role: int = 0, at=NOW) -> PendingOp:
    caller = (L.CALLER_OPERATOR, by) if by else (L.CALLER_SYSTEM, 0)
    return PendingOp.admin(key(request_id, caller), L.OP_TERMINAL_REVOKED,
                           tid.to_bytes(4, "little") + bytes(12), b"", by, client_time_us=at,
                           need_role=role, scope=SCOPE_SUBJECT_TERMINAL)


def swipe(request_id: str, kind: int, number: str, amount: int, tid: int, ksn: int,
          at=NOW) -> PendingOp:
    """A terminal's operation: its namespace, its KSN counter."""
    return op(request_id, kind, number, amount, at, caller=(L.CALLER_TERMINAL, tid),
              terminal_id=tid, ksn_counter=ksn)


def add_operator(request_id: str, name: str, role: int, stores=(), at=NOW) -> PendingOp:
    import json

    payload = json.dumps({"name": name, "role": role, "store_ids": list(stores),
                          "token_sha256": "x"}).encode()
    return PendingOp.admin(key(request_id, (L.CALLER_SYSTEM, 0)), L.OP_OPERATOR_ADDED, bytes(16),
                           payload, 0, client_time_us=at)


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(str(tmp_path / "ledger"), sync=True)
    yield led
    led.close()


def funded(ledger, amount=1_000) -> str:
    n = new_card_number()
    ledger.apply_group([open_op("o" + n, n), op("t" + n, L.OP_TOP_UP, n, amount)], NOW)
    return n


def test_a_rotation_naming_its_key_must_name_a_version_above_the_recorded_one(ledger):
    """Two fronts rotating at once make one version under two keys: the second is refused.
    Rotations from before fingerprints (zeros) keep the highest version, as they did."""
    def rotation(request_id: str, version: int, fingerprint: bytes) -> PendingOp:
        return PendingOp.admin(key(request_id, (L.CALLER_SYSTEM, 0)), L.OP_DATA_KEY_ROTATED,
                               version.to_bytes(4, "little") + fingerprint + bytes(4), b"", 0,
                               client_time_us=NOW)

    assert ledger.read_data_key() == (0, bytes(8))
    got = ledger.apply_group([rotation("old", 2, bytes(8)), rotation("old-again", 2, bytes(8)),
                              rotation("a", 3, b"A" * 8), rotation("b", 3, b"B" * 8),
                              rotation("older", 2, bytes(8)), rotation("c", 4, b"C" * 8)], NOW)
    assert [o.reason for o in got] == [L.R_OK, L.R_OK, L.R_OK, L.R_ILLEGAL_TRANSITION, L.R_OK,
                                       L.R_OK]
    assert ledger.read_data_key() == (4, b"C" * 8)


def test_a_new_ledger_journals_its_program_as_version_1(ledger):
    assert ledger.program_version == 1 and ledger.next_seq == 2
    first = L.JOURNAL.unpack(ledger.dump()["journal"][0][1])
    assert first[1] == L.OP_PROGRAM_LOADED and first[23] == 1 and first[24] == L.CALLER_SYSTEM
    assert ledger.verify()["ok"]


def test_a_group_applies_in_order_and_answers_repeats_inside_it(ledger):
    n = new_card_number()
    outcomes = ledger.apply_group([
        open_op("o", n), op("t", L.OP_TOP_UP, n, 1_000), op("p", L.OP_PURCHASE, n, 400),
        op("p", L.OP_PURCHASE, n, 400), op("p", L.OP_PURCHASE, n, 401)], ts_us=NOW)
    assert [o.reason for o in outcomes] == [0, 0, 0, 0, L.R_DUPLICATE_REQUEST_MISMATCH]
    assert [o.replayed for o in outcomes] == [False, False, False, True, False]
    assert outcomes[3].entry == outcomes[2].entry
    assert ledger.next_seq == 5
    assert ledger.read_card(cid(n))[0][5] == 600
    assert ledger.verify()["ok"]


def test_the_map_grows_instead_of_failing(tmp_path):
    led = Ledger(str(tmp_path / "small"), sync=False, map_size=256 << 10)
    numbers = [new_card_number() for _ in range(3_000)]
    for start in range(0, len(numbers), 500):
        chunk = numbers[start:start + 500]
        outcomes = led.apply_group([open_op(f"o{start + i}", n) for i, n in enumerate(chunk)], NOW)
        assert all(o.reason == 0 for o in outcomes)
    assert led.env.info()["map_size"] > 256 << 10
    report = led.verify()
    assert report["ok"] and report["cards"] == 3_000
    led.close()


def test_next_sequence_comes_from_the_journal_after_reopening(tmp_path):
    path = str(tmp_path / "l")
    led = Ledger(path)
    n = new_card_number()
    led.apply_group([open_op("a", n), op("b", L.OP_TOP_UP, n, 5)], NOW)
    led.close()
    led = Ledger(path)
    assert led.next_seq == 4
    assert led.read_operation(key("b")).entry[8:16] == (3).to_bytes(8, "little")
    led.close()


# ---- arrival order, and admin state checked when each operation is applied -----------------

def test_a_swipe_from_a_terminal_revoked_earlier_in_the_same_group_is_refused(ledger):
    """Finding 1: the revocation and the swipe in one group, in arrival order."""
    n = funded(ledger)
    ledger.apply_group([enroll("e", 5, 2)], NOW)
    outcomes = ledger.apply_group([revoke("r", 5), swipe("b", L.OP_PURCHASE, n, 100, 5, 3)], NOW)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_TERMINAL_REVOKED]
    assert ledger.read_card(cid(n))[0][5] == 1_000


def test_a_swipe_before_its_terminals_revocation_in_the_same_group_goes_through_first(ledger):
    n = funded(ledger)
    ledger.apply_group([enroll("e", 5, 2)], NOW)
    before = ledger.next_seq
    outcomes = ledger.apply_group([swipe("b", L.OP_PURCHASE, n, 100, 5, 3), revoke("r", 5)], NOW)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_OK]
    ops = [L.JOURNAL.unpack(v)[1] for k, v in ledger.dump()["journal"]
           if L.SEQ_KEY.unpack(k)[0] >= before]
    assert ops == [L.OP_PURCHASE, L.OP_TERMINAL_REVOKED]  # the journal is in arrival order


def test_a_revocation_is_checked_against_the_terminals_store_in_the_ledger(ledger):
    """Finding 6: a store manager of store 1 cannot revoke a terminal of store 2 enrolled a
    moment before, whatever any registry in memory says."""
    ledger.apply_group([add_operator("a", "mgr1", 2, stores=[1])], NOW)
    (mgr_id,) = [o["id"] for o in ledger.read_operators() if o["name"] == "mgr1"]
    outcomes = ledger.apply_group([enroll("e", 9, 2), revoke("r", 9, by=mgr_id, role=2)], NOW)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_PERMISSION_DENIED]
    assert ledger.read_terminal(9)[1] == L.TERMINAL_ACTIVE
    outcomes = ledger.apply_group([enroll("e2", 10, 1), revoke("r2", 10, by=mgr_id, role=2)], NOW)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_OK]


def test_an_operator_removed_earlier_in_the_group_is_refused_for_the_rest_of_it(ledger):
    import json

    n = funded(ledger)
    ledger.apply_group([add_operator("a", "cashier1", 1, stores=[3])], NOW)
    (oid,) = [o["id"] for o in ledger.read_operators() if o["name"] == "cashier1"]

    def top_up(request_id):
        return op(request_id, L.OP_TOP_UP, n, 50, caller=(L.CALLER_OPERATOR, oid), operator_id=oid,
                  need_role=1, scope=SCOPE_STORE, scope_store_id=3)

    remove = PendingOp.admin(key("rm", (L.CALLER_SYSTEM, 0)), L.OP_OPERATOR_REMOVED, bytes(16),
                             json.dumps({"name": "cashier1"}).encode(), 0, client_time_us=NOW)
    outcomes = ledger.apply_group([top_up("t1"), remove, top_up("t2")], NOW)
    assert [o.reason for o in outcomes] == [L.R_OK, L.R_OK, L.R_UNAUTHENTICATED]
    assert ledger.read_card(cid(n))[0][5] == 1_050
    assert ledger.verify()["ok"]


# ---- request ids scoped to their caller -------------------------------------------------------

def test_two_terminals_may_use_the_same_request_id(ledger):
    """Finding 2: another caller's id neither blocks nor answers for mine."""
    n = funded(ledger)
    missing = new_card_number()
    ledger.apply_group([enroll("e8", 8, 3), enroll("e9", 9, 3)], NOW)
    first = ledger.apply_group([swipe("till9-000001", L.OP_TOP_UP, missing, 100, 8, 1)], NOW)
    assert first[0].reason == L.R_CARD_NOT_FOUND
    second = ledger.apply_group([swipe("till9-000001", L.OP_TOP_UP, n, 100, 9, 1)], NOW)
    assert second[0].reason == L.R_OK and not second[0].replayed
    assert ledger.read_operation(key("till9-000001", (L.CALLER_TERMINAL, 9))).reason == L.R_OK
    assert ledger.read_operation(key("till9-000001", (L.CALLER_TERMINAL, 8))).reason == \
        L.R_CARD_NOT_FOUND
    assert ledger.read_operation(key("till9-000001", (L.CALLER_TERMINAL, 7))) is None


# ---- retention: client time, pruning, the horizon ----------------------------------------------

def test_a_request_older_than_the_window_is_refused_and_changes_nothing(tmp_path):
    led = Ledger(str(tmp_path / "l"), initial_request_window_s=3600)
    n = funded(led)
    t = led._read(lambda txn: _head(led, txn))[2] + 1_000_000  # the group's time, a second on
    outcomes = led.apply_group([op("old", L.OP_TOP_UP, n, 5, at=t - HOUR - 1),
                                op("ahead", L.OP_TOP_UP, n, 5, at=t + CLIENT_TIME_AHEAD_MAX_US + 1),
                                op("edge", L.OP_TOP_UP, n, 5, at=t - HOUR)], t)
    assert [o.reason for o in outcomes] == [L.R_REQUEST_TOO_OLD, L.R_CLIENT_TIME_AHEAD, L.R_OK]
    assert led.read_operation(key("old")) is None and led.read_card(cid(n))[0][5] == 1_005
    led.close()


def test_pruned_request_ids_can_never_apply_twice(tmp_path):
    """Records are pruned in small steps once no re-send could pass the age check; a re-send
    after that is refused as too old, and applies nothing."""
    led = Ledger(str(tmp_path / "l"), initial_request_window_s=3600)
    n = funded(led)
    t0 = NOW
    led.apply_group([op(f"t{i}", L.OP_TOP_UP, n, 1, at=t0) for i in range(300)], t0)
    assert led.stats()["requests"] == 302
    later = t0 + HOUR + 1
    advance(led, t0 + HOUR)                   # time moves at most an hour per group
    assert led.stats()["requests"] == 302     # a client time exactly a window old still counts
    led.apply_group([PendingOp.internal(L.OP_MAINTENANCE)], later)  # a prune step: at most 258
    assert led.stats()["requests"] == 302 - 258
    led.apply_group([PendingOp.internal(L.OP_MAINTENANCE)], later + 1)
    assert led.stats()["requests"] == 0
    balance = led.read_card(cid(n))[0][5]
    resent = led.apply_group([op(f"t{i}", L.OP_TOP_UP, n, 1, at=t0) for i in range(5)], later + 2)
    assert {o.reason for o in resent} == {L.R_REQUEST_TOO_OLD}
    assert led.read_card(cid(n))[0][5] == balance
    assert led.verify()["ok"]
    led.close()
    # A longer window later does not reopen the hole: the pruned horizon still refuses them.
    led = Ledger(str(tmp_path / "l"))
    assert led.apply_group([window_op(30 * 24 * 3600)], later + 3)[0].reason == L.R_OK
    resent = led.apply_group([op("t0", L.OP_TOP_UP, n, 1, at=t0)], later + 4)
    assert resent[0].reason == L.R_REQUEST_TOO_OLD
    led.close()


def advance(led: Ledger, to_us: int) -> None:
    """Groups that change nothing (a floor of no terminal) until the ledger's time reaches
    ``to_us`` (an idle maintenance group with nothing to prune does not even write its time)."""
    from cardcore.admin import FLOOR_TERMINAL_KSN, floor_op

    for _ in range(100):
        led.apply_group([floor_op(FLOOR_TERMINAL_KSN, 0, 0)], to_us)
        if led._read(lambda txn: _head(led, txn))[2] >= to_us:
            return
    raise AssertionError("the ledger's time does not reach the clock")


def test_one_wild_clock_step_moves_the_ledgers_time_an_hour_at_most(ledger):
    """A clock that jumps a month ahead for one group and comes back does not leave the ledger a
    month ahead, refusing every request as too old."""
    n = funded(ledger)
    before = ledger._read(lambda txn: _head(ledger, txn))[2]
    ledger.apply_group([op("wild", L.OP_TOP_UP, n, 1)], NOW + 30 * 24 * HOUR)
    assert ledger._read(lambda txn: _head(ledger, txn))[2] == before + HOUR
    fine = ledger.apply_group([op("fine", L.OP_TOP_UP, n, 1, at=NOW + 5)], NOW + 10)
    assert fine[0].reason == L.R_OK


def test_timestamps_never_go_back(ledger):
    n = funded(ledger)
    ledger.apply_group([op("a", L.OP_TOP_UP, n, 1)], NOW + 1_000)
    ledger.apply_group([op("b", L.OP_TOP_UP, n, 1)], NOW - 5_000_000)  # the clock went back
    entries = [L.JOURNAL.unpack(v) for _, v in ledger.dump()["journal"]]
    assert entries[-1][17] == entries[-2][17] + 1
    assert ledger.verify()["ok"]


# ---- the journal's digest chain and the stored programs ----------------------------------------

def tamper(ledger: Ledger, db, k: bytes, offset: int, value: bytes) -> None:
    with ledger.env.begin(write=True, db=db) as txn:
        raw = bytearray(txn.get(k))
        raw[offset:offset + len(value)] = value
        txn.put(k, bytes(raw))


def test_a_flipped_bit_in_a_stored_entry_is_found_where_it_is(ledger):
    n = funded(ledger)
    ledger.apply_group([op("p", L.OP_PURCHASE, n, 100)], NOW)
    assert ledger.verify()["ok"]
    raw = ledger.dump()["journal"][2][1]
    tamper(ledger, ledger.journal, L.SEQ_KEY.pack(3), 108, bytes([raw[108] ^ 0x01]))  # terminal id
    report = ledger.verify()
    assert not report["ok"]
    assert any("journal entry 3: its digest does not chain" in p for p in report["problems"])


def test_a_forged_entry_with_a_recomputed_digest_is_found_at_the_next_one(ledger):
    import hashlib

    n = funded(ledger)
    ledger.apply_group([op("p", L.OP_PURCHASE, n, 100)], NOW)
    journal = ledger.dump()["journal"]
    forged = bytearray(journal[2][1])
    forged[112:116] = (77).to_bytes(4, "little")   # a staff id that was never there
    forged[224:] = hashlib.sha256(journal[1][1][224:] + bytes(forged[:224])).digest()
    tamper(ledger, ledger.journal, L.SEQ_KEY.pack(3), 0, bytes(forged))
    report = ledger.verify()
    assert any("journal entry 4: its digest does not chain" in p for p in report["problems"])


def load(source: str) -> PendingOp:
    return PendingOp.admin(key(f"prog{hash(source)}", (L.CALLER_SYSTEM, 0)), L.OP_PROGRAM_LOADED,
                           bytes(16), source.encode(), 0, client_time_us=NOW)


GOLD_80 = """
[[tiers]]
name = "standard"
rate_bp = 10000
[[tiers]]
name = "silver"
rate_bp = 9000
[[tiers]]
name = "gold"
rate_bp = 8000
"""


def test_a_program_change_mid_run_leaves_earlier_entries_verifying_with_their_own_version(ledger):
    n = new_card_number()
    ledger.apply_group([open_op("o", n, tier=1), op("t", L.OP_TOP_UP, n, 10_000)], NOW)
    outcomes = ledger.apply_group([op("p1", L.OP_PURCHASE, n, 1_000), load(GOLD_80),
                                   op("p2", L.OP_PURCHASE, n, 1_000)], NOW)
    assert [o.reason for o in outcomes] == [0, 0, 0]
    paid = [-(L.JOURNAL.unpack(o.entry)[11]) for o in (outcomes[0], outcomes[2])]
    assert paid == [950, 900]    # silver pays 95 % under version 1, 90 % under version 2
    versions = [L.JOURNAL.unpack(o.entry)[23] for o in outcomes]
    assert versions == [1, 2, 2] and ledger.program_version == 2
    assert ledger.verify()["ok"]
    # verify recomputes the discount with the version the entry names
    tamper(ledger, ledger.journal, L.SEQ_KEY.pack(L.JOURNAL.unpack(outcomes[2].entry)[7]), 128,
           (1).to_bytes(4, "little"))
    assert any("program version" in p for p in ledger.verify()["problems"])


def test_a_program_that_strands_cards_or_does_not_parse_is_refused_and_changes_nothing(ledger):
    n = new_card_number()
    ledger.apply_group([open_op("o", n, tier=2)], NOW)
    two_tiers = "[[tiers]]\nname = \"a\"\nrate_bp = 10000\n[[tiers]]\nname = \"b\"\nrate_bp = 9000\n"
    outcomes = ledger.apply_group([load(two_tiers), load("points_per_unit = true\n")], NOW)
    assert [o.reason for o in outcomes] == [L.R_PROGRAM_STRANDS_CARDS, L.R_PROGRAM_INVALID]
    assert ledger.program_version == 1 and sorted(ledger.read_programs()) == [1]


# ---- recovery after a storage error, and the housekeeping ---------------------------------------

def test_what_landed_skips_the_servers_own_operations(ledger):
    """Finding 3: a group holding a re-seal is asked about without crashing the writer."""
    n = funded(ledger)
    reseal = PendingOp.internal(L.OP_RESEAL, reseal_payload([]))
    applied = op("t", L.OP_TOP_UP, n, 5)
    ledger.apply_group([applied], NOW)
    outcomes = ledger.landed([reseal, applied, op("u", L.OP_TOP_UP, n, 5)])
    assert [o.reason for o in outcomes] == [L.R_STORAGE_UNAVAILABLE, L.R_OK,
                                            L.R_STORAGE_UNAVAILABLE]


def test_map_usage_is_read_under_the_resize_gate(ledger):
    """Finding 7: a metrics scrape waits while the writer grows the map."""
    done = threading.Event()
    with ledger._resize_gate:
        t = threading.Thread(target=lambda: (ledger.map_usage(), done.set()))
        t.start()
        time.sleep(0.2)
        assert not done.is_set()
    t.join(5)
    assert done.is_set()


def test_no_card_number_reaches_the_data_file(tmp_path):
    path = str(tmp_path / "l")
    led = Ledger(path)
    numbers = [new_card_number() for _ in range(50)]
    led.apply_group([open_op(f"o{i}", n) for i, n in enumerate(numbers)], NOW)
    led.close()
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        data = f.read()
    assert not [n for n in numbers if n.encode() in data or n[-10:].encode() in data]


def test_a_failing_group_writes_nothing(ledger, monkeypatch):
    n = new_card_number()
    ledger.apply_group([open_op("o", n)], NOW)
    from cardcore import ledger as ledger_module

    def broken(*args):
        raise ValueError("card record breaks an invariant")

    monkeypatch.setattr(ledger_module.kernel, "apply_batch", broken)
    with pytest.raises(ValueError):
        ledger.apply_group([op("t", L.OP_TOP_UP, n, 5)], NOW)
    monkeypatch.undo()
    assert ledger.read_operation(key("t")) is None and ledger.next_seq == 3
    with ledger.env.begin() as txn:
        assert txn.stat(ledger.journal)["entries"] == 2


# ---- verify finds what does not add up ------------------------------------------------------

def forge(ledger: Ledger, cid_: bytes, seq: int, offset: int, value: int) -> None:
    """Change one i64 field of a journal entry and carry it through the later entries, the card
    record and the digest chain, so every running sum and digest still agrees: only the entry's
    meaning is wrong."""
    from cardcore.chain import chain

    delta = value - int.from_bytes(ledger.env.begin(db=ledger.journal).get(L.SEQ_KEY.pack(seq))[
        offset:offset + 8], "little", signed=True)
    with ledger.env.begin(write=True) as txn:
        raw = bytearray(txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal))
        raw[offset:offset + 8] = value.to_bytes(8, "little", signed=True)
        txn.put(L.SEQ_KEY.pack(seq), bytes(raw), db=ledger.journal)
        cur = txn.cursor(db=ledger.journal)
        cur.last()
        last = L.SEQ_KEY.unpack(cur.key())[0]
        if offset == 48:  # principal delta: shift every later principal-after and the card
            for later in range(seq, last + 1):
                e = bytearray(txn.get(L.SEQ_KEY.pack(later), db=ledger.journal))
                after = int.from_bytes(e[72:80], "little", signed=True) + delta
                e[72:80] = after.to_bytes(8, "little", signed=True)
                txn.put(L.SEQ_KEY.pack(later), bytes(e), db=ledger.journal)
            rec = bytearray(txn.get(cid_, db=ledger.cards))
            rec[8:16] = (int.from_bytes(rec[8:16], "little", signed=True) + delta).to_bytes(8, "little", signed=True)
            txn.put(cid_, bytes(rec), db=ledger.cards)
        # re-chain every digest, as a forger with write access would
        entries = bytearray(b"".join(v for _, v in txn.cursor(db=ledger.journal)))
        chain(entries, bytes(32), L.JOURNAL_SIZE, L.JOURNAL_DIGEST_OFFSET)
        for k in range(last):
            txn.put(L.SEQ_KEY.pack(k + 1), bytes(entries[k * 256:(k + 1) * 256]), db=ledger.journal)


@pytest.mark.parametrize("seq,offset,value,what", [
    (2, 48, 1_000_000_000, "an opening that mints principal"),
    (3, 48, 5_000, "a top-up of 1,000 that adds 5,000"),
    (4, 40, 101, "a discount larger than the gross"),
    (4, 40, 3, "a discount the program does not give"),
])
def test_verify_finds_entries_that_add_up_but_mean_the_wrong_thing(ledger, seq, offset, value, what):
    n = new_card_number()
    ledger.apply_group([open_op("o", n, tier=1), op("t", L.OP_TOP_UP, n, 1_000),
                        op("p", L.OP_PURCHASE, n, 100)], NOW)
    assert ledger.verify()["ok"]
    forge(ledger, cid(n), seq, offset, value)
    report = ledger.verify()
    assert not report["ok"], what


@pytest.mark.parametrize("what", ["balance", "journal delta", "journal gap", "request record",
                                  "tier count"])
def test_verify_finds_a_ledger_that_does_not_add_up(ledger, what):
    n = new_card_number()
    ledger.apply_group([open_op("o", n), op("t", L.OP_TOP_UP, n, 1_000),
                        op("p", L.OP_PURCHASE, n, 100)], NOW)
    assert ledger.verify()["ok"]
    if what == "balance":
        tamper(ledger, ledger.cards, cid(n), 8, (1_001).to_bytes(8, "little"))
    elif what == "journal delta":
        tamper(ledger, ledger.journal, L.SEQ_KEY.pack(3), 48, (999).to_bytes(8, "little"))
    elif what == "journal gap":
        with ledger.env.begin(write=True, db=ledger.journal) as txn:
            txn.delete(L.SEQ_KEY.pack(3))
    elif what == "request record":
        tamper(ledger, ledger.requests, key("p"), 24, (3).to_bytes(8, "little"))
    else:
        tamper(ledger, ledger.meta, b"tier_cards", 0, (2).to_bytes(8, "little"))
    report = ledger.verify()
    assert not report["ok"] and report["problems"]


# ---- arrival order against a model: admin and card operations mixed, split into groups -------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TERMINAL_STORES = {1: 1, 2: 2, 3: 1}     # terminal id -> store
MANAGER_STORE = 1                      # the store manager's scope


@st.composite
def mixed_runs(draw):
    """A sequence of operations and how it is cut into groups."""
    kinds = st.sampled_from(["enroll", "revoke", "remove", "swipe", "stale", "operator"])
    ops = [(draw(kinds), draw(st.sampled_from(sorted(TERMINAL_STORES))))
           for _ in range(draw(st.integers(1, 14)))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(ops) - 1)), max_size=3))))
    return ops, cuts


class Model:
    """What each operation must answer when applied one after another, in arrival order."""

    def __init__(self):
        self.terminals: dict[int, dict] = {}
        self.manager_removed = False
        self.balance = 1_000

    def answer(self, kind: str, tid: int) -> int:
        t = self.terminals.get(tid)
        if kind == "enroll":
            if t is not None:
                return L.R_TERMINAL_EXISTS
            self.terminals[tid] = {"store": TERMINAL_STORES[tid], "revoked": False, "ksn": 0}
            return L.R_OK
        if kind == "revoke":
            if self.manager_removed:
                return L.R_UNAUTHENTICATED
            if t is not None and t["store"] != MANAGER_STORE:
                return L.R_PERMISSION_DENIED
            if t is None:
                return L.R_TERMINAL_NOT_FOUND
            if t["revoked"]:
                return L.R_TERMINAL_REVOKED
            t["revoked"] = True
            return L.R_OK
        if kind == "remove":
            if self.manager_removed:
                return L.R_OPERATOR_NOT_FOUND
            self.manager_removed = True
            return L.R_OK
        if kind == "operator":
            if self.manager_removed:
                return L.R_UNAUTHENTICATED
            self.balance += 1
            return L.R_OK
        if t is None:
            return L.R_TERMINAL_UNKNOWN
        if t["revoked"]:
            return L.R_TERMINAL_REVOKED
        ksn = self.ksn(tid, kind)
        if ksn <= t["ksn"]:
            return L.R_KSN_REPLAYED
        t["ksn"] = ksn
        self.balance += 10
        return L.R_OK

    def ksn(self, tid: int, kind: str) -> int:
        """The counter a swipe carries: the next one, or (stale) the last one used again."""
        t = self.terminals.get(tid)
        last = t["ksn"] if t else 0
        return max(last, 1) if kind == "stale" else last + 1


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(run=mixed_runs())
def test_mixed_admin_and_card_operations_apply_in_arrival_order_against_a_model(tmp_path_factory,
                                                                                run):
    import json

    ops, cuts = run
    led = Ledger(str(tmp_path_factory.mktemp("mixed") / "l"), sync=False)
    try:
        n = funded(led)
        led.apply_group([add_operator("m", "mgr", 2, stores=[MANAGER_STORE])], NOW)
        (mgr,) = [o["id"] for o in led.read_operators() if o["name"] == "mgr"]
        model = Model()
        expected, pending = [], []
        for i, (kind, tid) in enumerate(ops):
            rid_ = f"{kind}-{i}"
            if kind == "enroll":
                pending.append(enroll(rid_, tid, TERMINAL_STORES[tid]))
            elif kind == "revoke":
                pending.append(revoke(rid_, tid, by=mgr, role=2))
            elif kind == "remove":
                pending.append(PendingOp.admin(key(rid_, (L.CALLER_SYSTEM, 0)),
                                               L.OP_OPERATOR_REMOVED, bytes(16),
                                               json.dumps({"name": "mgr"}).encode(), 0,
                                               client_time_us=NOW))
            elif kind == "operator":
                pending.append(op(rid_, L.OP_TOP_UP, n, 1, caller=(L.CALLER_OPERATOR, mgr),
                                  operator_id=mgr, need_role=1, scope=SCOPE_STORE,
                                  scope_store_id=MANAGER_STORE))
            else:
                pending.append(swipe(rid_, L.OP_TOP_UP, n, 10, tid, model.ksn(tid, kind)))
            expected.append(model.answer(kind, tid))
        got = []
        for start, end in zip([0, *cuts], [*cuts, len(pending)]):
            got += [o.reason for o in led.apply_group(pending[start:end], NOW)]
        assert got == expected
        assert led.read_card(cid(n))[0][5] == model.balance
        assert led.verify()["ok"]
    finally:
        led.close()


def test_a_stored_program_changed_behind_the_journals_back_is_found(ledger):
    """The journal's load entry names the document's digest: rewriting a stored program (and its
    SHA-256 field) so purchases would verify with other rates is found."""
    import hashlib
    import json

    n = new_card_number()
    ledger.apply_group([open_op("o", n), op("t", L.OP_TOP_UP, n, 10_000),
                        op("p", L.OP_PURCHASE, n, 10_000)], NOW)
    with ledger.env.begin(write=True, db=ledger.programs) as txn:
        rec = json.loads(txn.get(L.VERSION_KEY.pack(1)))
        rec["source"] = rec["source"].replace("rate_bp = 10000", "rate_bp = 100", 1)
        rec["sha256"] = hashlib.sha256(rec["source"].encode()).hexdigest()
        txn.put(L.VERSION_KEY.pack(1), json.dumps(rec).encode())
    problems = ledger.verify()["problems"]
    assert any("differs from the stored document" in p for p in problems)


def test_an_idle_maintenance_group_with_nothing_to_prune_writes_nothing(ledger):
    before = ledger.dump()
    ledger.apply_group([PendingOp.internal(L.OP_MAINTENANCE)], NOW + 5_000_000)
    assert ledger.dump() == before
