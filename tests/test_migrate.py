"""A ledger made by release 1 (tests/fixtures/v1, from commit 5c616b6) upgraded to format 2."""
from __future__ import annotations

import json
import os
import shutil

import grpc
import pytest

from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.migrate import ledger_format, migrate
from cardcore.terminal import Terminal, TerminalKeys, now_us
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import bearer, failure_of, journal_entries, rid, verify

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
EXPECTED = json.load(open(os.path.join(FIXTURE, "expected.json")))
R = cpb.Reason


def fixture_copy(tmp_path) -> str:
    """The fixture's data folder (ledger, keyring, admin token), copied: tests change it."""
    data = tmp_path / "data"
    os.makedirs(data / "ledger")
    shutil.copyfile(os.path.join(FIXTURE, "ledger", "data.mdb"), data / "ledger" / "data.mdb")
    for name in ("keyring.json", "admin.token"):
        shutil.copyfile(os.path.join(FIXTURE, name), data / name)
        os.chmod(data / name, 0o600)
    return str(data)


def card(key: str) -> dict:
    return next(c for c in EXPECTED["cards"] if c["key"] == key)


def test_a_v1_ledger_migrates_verified_and_keeps_its_v1_copy(tmp_path):
    path = os.path.join(fixture_copy(tmp_path), "ledger")
    assert ledger_format(path) == 1
    report = migrate(path)
    assert ledger_format(path) == 2 and ledger_format(report["v1_kept_at"]) == 1
    before, after = report["before"], report["after"]
    assert before["problems"] == [] and after["ok"]
    assert before["journal_entries"] == EXPECTED["counts"]["journal_entries"] == 32
    assert after["journal_entries"] == 33          # the program, stored as version 1
    assert (after["cards"], after["requests"]) == (8, 34)
    ledger = Ledger(path, readonly=True)
    try:
        assert ledger.program_version == 1
        for c in EXPECTED["cards"]:
            rec = ledger.read_card(bytes.fromhex(c["card_id"]))[0]
            assert (rec[5], rec[6], rec[7], rec[9], rec[3]) == (
                c["principal_minor"], c["bonus_minor"], c["points"], c["lifetime_paid_minor"],
                c["pin"]["tries"])
        journal = [L.JOURNAL.unpack(v) for _, v in ledger.dump()["journal"]]
        assert {e[0] for e in journal} == {2}
        assert [e[23] for e in journal] == [0] * 32 + [1]  # migrated: version unknown
        assert {e[24] for e in journal[:32]} == {L.CALLER_LEGACY}
        keys = [k for k, _ in ledger.dump()["requests"]]
        assert all(k[0] == L.CALLER_LEGACY for k in keys) and len(keys) == 34
    finally:
        ledger.close()


def test_a_migration_refuses_a_v1_ledger_that_does_not_verify(tmp_path):
    import lmdb

    from cardcore.migrate import MigrationError

    path = os.path.join(fixture_copy(tmp_path), "ledger")
    env = lmdb.open(path, max_dbs=16)
    cards_db = env.open_db(b"cards")
    with env.begin(write=True, db=cards_db) as txn:
        key, raw = next(iter(txn.cursor()))
        txn.put(key, raw[:8] + (10**9).to_bytes(8, "little") + raw[16:])  # minted principal
    env.close()
    with pytest.raises(MigrationError):
        migrate(path)
    assert ledger_format(path) == 1 and not os.path.exists(path + ".v1")


@pytest.fixture
def migrated(start_server, tmp_path):
    """The fixture served by the current release: it migrates the ledger at start."""
    server = start_server(data_dir=fixture_copy(tmp_path))
    assert "migrated from format 1 to 2" in server.log()
    return server


def clear_purchase(request_id: str, number: str, gross: int) -> pb.PurchaseRequest:
    """As release 1's fixture sent it: development mode, store 3, no terminal, no staff."""
    return pb.PurchaseRequest(request_id=request_id, card=cpb.CardRef(card_number=number),
                              gross_amount_minor=gross, till=cpb.Till(store_id=3),
                              client_time_us=now_us())


def test_the_server_migrates_at_start_and_keeps_every_balance(migrated):
    for c in EXPECTED["cards"]:
        got = migrated.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=c["number"])))
        assert (got.balance.principal_minor, got.balance.points, got.tier) == (
            c["principal_minor"], c["points"], c["tier"])
    assert verify(migrated.data_dir)["ok"]


def test_a_retry_that_crosses_the_upgrade_is_answered_as_before(migrated):
    """v1-buy-1 was applied by release 1; re-sent after the upgrade with the same payload it
    replays (release 1's digest), never applies twice. Another payload under that id is a new
    request of its caller, not a collision with somebody's old id."""
    one = card("card-1")
    again = migrated.stub.Purchase(clear_purchase("v1-buy-1", one["number"], 12345))
    assert again.replayed and again.seq == 18
    other = migrated.stub.Purchase(clear_purchase("v1-buy-1", one["number"], 1))
    assert other.reason == R.REASON_OK and not other.replayed
    got = migrated.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=one["number"])))
    assert got.balance.principal_minor == one["principal_minor"] - 1
    legacy = migrated.stub.GetOperation(pb.GetOperationRequest(
        request_id="v1-buy-1", caller=cpb.Caller(kind=cpb.CALLER_KIND_LEGACY)))
    assert legacy.state == pb.OPERATION_STATE_APPLIED and legacy.result.seq == 18


def test_terminals_keep_their_counters_and_revocations_and_operators_their_tokens(migrated):
    keys = json.load(open(os.path.join(FIXTURE, "terminal-7.json")))
    seven = card("card-7")

    def terminal(counter: int) -> Terminal:
        return Terminal(TerminalKeys(7, 3, bytes.fromhex(keys["initial_key"]),
                                     bytes.fromhex(keys["initial_key_id"]), counter))

    old = terminal(4).purchase(rid(), seven["number"], seven["pin"]["pin"], 100)  # counter 5
    with pytest.raises(grpc.RpcError) as err:
        migrated.stub.Purchase(old)
    assert failure_of(err.value).reason == R.REASON_KSN_REPLAYED
    paid = migrated.stub.Purchase(terminal(keys["counter"]).purchase(
        rid(), seven["number"], seven["pin"]["pin"], 100))
    assert paid.reason == R.REASON_OK
    keys8 = json.load(open(os.path.join(FIXTURE, "terminal-8.json")))
    eight = Terminal(TerminalKeys(8, 3, bytes.fromhex(keys8["initial_key"]),
                                  bytes.fromhex(keys8["initial_key_id"]), keys8["counter"]))
    with pytest.raises(grpc.RpcError) as err:
        migrated.stub.Purchase(eight.purchase(rid(), seven["number"], seven["pin"]["pin"], 100))
    assert failure_of(err.value).reason == R.REASON_TERMINAL_REVOKED
    tokens = {o["name"]: o["token"] for o in EXPECTED["operators"]}
    top_up = pb.TopUpRequest(request_id=rid(), card=cpb.CardRef(card_number=card("card-5")["number"]),
                             amount_minor=500, till=cpb.Till(store_id=3), client_time_us=now_us())
    assert migrated.stub.TopUp(top_up, metadata=bearer(tokens["cashier1"])).reason == R.REASON_OK
    with pytest.raises(grpc.RpcError) as err:
        migrated.stub.TopUp(top_up, metadata=bearer(tokens["temp"]))
    assert failure_of(err.value).reason == R.REASON_UNAUTHENTICATED
    entries = journal_entries(migrated.data_dir)
    assert entries[-1][1] == L.OP_TOP_UP and entries[-1][23] == 1
    assert entries[-1][24] == L.CALLER_OPERATOR and entries[-2][24] == L.CALLER_TERMINAL
    assert verify(migrated.data_dir)["ok"]


def test_cardcore_migrate_upgrades_a_stopped_servers_folder(tmp_path):
    import subprocess
    import sys

    data = fixture_copy(tmp_path)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args],
                              capture_output=True, text=True, timeout=120)

    out = run("migrate", "--data-dir", data)
    assert out.returncode == 0 and "format 1 kept at" in out.stdout, out.stderr
    assert "33 (one more: the program, v1)" in out.stdout
    out = run("migrate", "--data-dir", data)
    assert out.returncode == 0 and "already of format 2" in out.stdout
    out = run("verify", "--data-dir", data, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"]


def test_an_admin_request_id_of_release_1_is_no_replay_for_anyone(migrated):
    """Release 1's ids were one namespace: re-using "bootstrap-admin" or "v1-enroll-7" after the
    upgrade must not be answered from those records (a fresh token for the chain admin, the key
    of a terminal of another store): admin requests are judged afresh."""
    from cardcore.v1 import admin_service_pb2 as apb
    from conftest import Admin

    admin = Admin(migrated.channel, open(os.path.join(migrated.data_dir, "admin.token")).read().strip())
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.AddOperator(apb.AddOperatorRequest(
            request_id="bootstrap-admin", name="admin", role=cpb.OPERATOR_ROLE_CASHIER,
            store_ids=[3], client_time_us=now_us()), metadata=admin.metadata)
    assert failure_of(err.value).reason == R.REASON_OPERATOR_EXISTS
    enrolled = admin.stub.EnrollTerminal(apb.EnrollTerminalRequest(
        request_id="v1-enroll-7", terminal_id=50, store_id=9, client_time_us=now_us()),
        metadata=admin.metadata)
    assert enrolled.terminal.terminal_id == 50 and enrolled.terminal.store_id == 9
    assert admin.stub.ListOperators(apb.ListOperatorsRequest(), metadata=admin.metadata).operators


def test_a_ledger_older_than_the_retention_window_migrates_with_every_request_record(tmp_path,
                                                                                     monkeypatch):
    """Release 1's records are kept a whole window from the upgrade, whatever their age: a retry
    in flight at the upgrade is still recognised, and the migration's own count holds."""
    import time

    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 8 * 24 * 3600 * 10**9)  # 8 days on
    path = os.path.join(fixture_copy(tmp_path), "ledger")
    report = migrate(path)
    assert report["after"]["ok"] and report["after"]["requests"] == 34


@pytest.mark.parametrize("ready", [True, False], ids=["new-one-ready", "new-one-not-ready"])
def test_a_swap_stopped_between_its_renames_never_starts_an_empty_ledger(tmp_path, monkeypatch,
                                                                         start_server, ready):
    """Power cut after the live ledger was renamed aside and before the new one took its place:
    the next start finishes the swap (the new ledger was verified and marked ready before the
    first rename). A folder with no ledger but ledgers beside it (here: a new one not marked
    ready, which the code never leaves) is refused, never served empty nor guessed at."""
    from cardcore import swap

    data = fixture_copy(tmp_path)
    path = os.path.join(data, "ledger")
    real_rename, renames = os.rename, []

    def cut(src, dst):
        renames.append(src)
        if len(renames) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", cut)
    with pytest.raises(OSError):
        migrate(path)
    monkeypatch.undo()
    assert not os.path.exists(path) and os.path.exists(path + ".v1")
    if not ready:
        os.unlink(os.path.join(path + ".v2-migrating", swap.READY))
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure",
                              "--data-dir", data, "--listen", "127.0.0.1:0"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "holds no ledger but" in out.stderr
        assert not os.path.exists(path) and os.path.exists(path + ".v1")
        return
    server = start_server(data_dir=data)
    assert "finished swapping" in server.log()
    one = card("card-1")
    got = server.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=one["number"])))
    assert got.balance.principal_minor == one["principal_minor"]
    assert verify(data)["ok"] and ledger_format(path) == 2


def test_an_admin_and_a_card_operation_with_one_legacy_id_in_one_group(tmp_path):
    """The legacy look-up is for card operations: an admin operation sharing the group and an
    old id with one must not stop the writer."""
    from cardcore import cards
    from cardcore.idempotency import PendingOp, request_key

    path = os.path.join(fixture_copy(tmp_path), "ledger")
    migrate(path)
    ledger = Ledger(path)
    try:
        now = now_us()
        index_key = json.load(open(os.path.join(FIXTURE, "keyring.json")))["index_key"]
        cid = cards.card_id(bytes.fromhex(index_key), card("card-1")["number"])
        top_up = PendingOp.build(request_key(L.CALLER_DEVELOPMENT, 0, b"bootstrap-admin"),
                                 L.OP_TOP_UP, cid, 5, 3, client_time_us=now)
        subject = (50).to_bytes(4, "little") + (3).to_bytes(4, "little") + bytes(8)
        enroll = PendingOp.admin(request_key(L.CALLER_OPERATOR, 1, b"bootstrap-admin"),
                                 L.OP_TERMINAL_ENROLLED, subject, b"", 1, client_time_us=now)
        outcomes = ledger.apply_group([top_up, enroll], now)
        assert [o.reason for o in outcomes] == [L.R_OK, L.R_OK]
        assert ledger.verify()["ok"]
    finally:
        ledger.close()
