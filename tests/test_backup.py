"""Hot backup while serving, and restore: the copy verifies and equals the original."""
import subprocess

import pytest
import sys

from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, checkpointed, journal_entries, new_card_number, sent_at, verify


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args], capture_output=True,
                          text=True, timeout=120)


def dump(data_dir: str) -> dict:
    checkpointed(data_dir)
    ledger = Ledger(f"{data_dir}/ledger", readonly=True)
    try:
        return ledger.dump()
    finally:
        ledger.close()


def test_backup_while_serving_and_restore_give_an_equal_verified_ledger(start_server, tmp_path):
    server = start_server()
    c = Client(server.stub)
    numbers = [new_card_number() for _ in range(200)]
    ops = []
    for i, n in enumerate(numbers):
        ops += [pb.Operation(open_card=pb.OpenCardRequest(client_time_us=sent_at(f"b-o-{i}"), request_id=f"b-o-{i}", card=cpb.CardRef(card_number=n), tier=i % 3)),
                pb.Operation(top_up=pb.TopUpRequest(client_time_us=sent_at(f"b-t-{i}"), request_id=f"b-t-{i}", card=cpb.CardRef(card_number=n), amount_minor=10_000 + i))]
    server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops))
    for n in numbers[:50]:
        c.purchase(n, 1_234)

    backup_dir = str(tmp_path / "backup")
    out = cli("backup", "--data-dir", server.data_dir, "--to", backup_dir)  # the server keeps serving
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
    c.purchase(numbers[60], 500)  # after the backup: must not be in it
    original = dump(server.data_dir)
    server.stop()

    restored_dir = str(tmp_path / "restored")  # another machine: the original ledger is "lost"
    out = cli("restore", "--from", backup_dir, "--data-dir", restored_dir, "--lost-ledger")
    assert out.returncode == 0, out.stderr
    restored = dump(restored_dir)
    assert verify(restored_dir)["ok"]
    kept = len(original["journal"]) - 1               # all but the purchase after the backup
    assert restored["journal"][:kept] == original["journal"][:kept]
    carried = [L.JOURNAL.unpack(v) for _, v in restored["journal"][kept:]]
    assert [(e[1], e[24]) for e in carried] == [(L.OP_OPERATOR_REMOVED, L.CALLER_SYSTEM)]
    changed = {cid for cid, _ in original["cards"]} - {cid for cid, _ in restored["cards"]}
    assert not changed and restored["profiles"] == original["profiles"]
    assert sum(1 for a, b in zip(original["cards"], restored["cards"], strict=True) if a != b) == 1

    # the restored folder serves, with the original's key (keys travel apart from backups)
    import shutil

    shutil.copy(f"{server.data_dir}/keyring.json", f"{restored_dir}/keyring.json")
    again = start_server(data_dir=restored_dir)
    assert Client(again.stub).card(numbers[0]).balance.available_minor == 10_000 - 1_234
    assert cli("restore", "--from", backup_dir, "--data-dir", restored_dir).returncode == 2  # in use


def test_restore_refuses_a_backup_that_does_not_verify(start_server, tmp_path):
    server = start_server()
    n = new_card_number()
    Client(server.stub).open(n)
    Client(server.stub).top_up(n, 100)
    server.stop()
    backup_dir = str(tmp_path / "backup")
    assert cli("backup", "--data-dir", server.data_dir, "--to", backup_dir).returncode == 0
    ledger = Ledger(f"{backup_dir}/ledger")
    with ledger.env.begin(write=True, db=ledger.cards) as txn:  # damage the copy
        cid, raw = next(iter(txn.cursor()))
        txn.put(cid, raw[:8] + (5_000).to_bytes(8, "little") + raw[16:])
    ledger.close()
    out = cli("restore", "--from", backup_dir, "--data-dir", str(tmp_path / "r"), "--lost-ledger")
    assert out.returncode == 1 and "does not verify" in out.stderr


def test_a_restore_never_lowers_a_terminals_ksn_counter_nor_forgets_a_revocation(start_server,
                                                                                   tmp_path):
    """Finding 4: after a restore, the same TopUp bytes sent again are a replayed KSN; a
    terminal revoked and an operator removed since the backup stay so."""
    from conftest import Admin, bearer, failure_of, rid

    from cardcore import layout as L
    from cardcore.v1 import admin_service_pb2 as apb

    server = start_server()
    admin = Admin(server.channel, server.admin_token)
    t7, t8 = admin.enroll(7, 3), admin.enroll(8, 3)
    night = admin.add_operator("night", cpb.OPERATOR_ROLE_CASHIER, [3])
    number = new_card_number()
    server.stub.OpenCard(t7.open_card(rid(), number, "482916"))
    server.stub.TopUp(t7.top_up(rid(), number, 10_000))
    backup_dir = str(tmp_path / "backup")
    assert cli("backup", "--data-dir", server.data_dir, "--to", backup_dir).returncode == 0
    lost = t7.top_up(rid(), number, 1_000)         # applied after the backup: lost by the restore
    assert server.stub.TopUp(lost).reason == cpb.REASON_OK
    admin.stub.RevokeTerminal(apb.RevokeTerminalRequest(request_id=rid(), terminal_id=8,
                                                        client_time_us=sent_at(rid())),
                              metadata=admin.metadata)
    admin.stub.RemoveOperator(apb.RemoveOperatorRequest(request_id=rid(), name="night",
                                                        client_time_us=sent_at(rid())),
                              metadata=admin.metadata)
    server.stop()
    out = cli("restore", "--from", backup_dir, "--data-dir", server.data_dir, "--force")
    assert out.returncode == 0 and "carried over" in out.stdout, out.stderr
    server = start_server(data_dir=server.data_dir)
    import grpc

    def reason(call, request, **kw):
        try:
            call(request, **kw)
            return cpb.REASON_OK
        except grpc.RpcError as err:
            return failure_of(err).reason

    assert reason(server.stub.TopUp, lost) == cpb.REASON_KSN_REPLAYED   # the same bytes again
    assert reason(server.stub.TopUp, t8.top_up(rid(), number, 1)) == cpb.REASON_TERMINAL_REVOKED
    top_up = pb.TopUpRequest(request_id=rid(), card=cpb.CardRef(card_number=number),
                             amount_minor=1, till=cpb.Till(store_id=3), client_time_us=sent_at(rid()))
    assert reason(server.stub.TopUp, top_up, metadata=bearer(night)) == cpb.REASON_UNAUTHENTICATED
    balance = lambda: Client(server.stub).card(number).balance.principal_minor  # noqa: E731
    assert balance() == 10_000
    # The terminal re-sends what the restore lost (same request_id and time, a fresh KSN).
    again = t7.top_up(lost.request_id, number, 1_000, client_time_us=lost.client_time_us)
    assert server.stub.TopUp(again).reason == cpb.REASON_OK and balance() == 11_000
    system = [e for e in journal_entries(server.data_dir) if e[24] == L.CALLER_SYSTEM]
    assert [e[1] for e in system][-2:] == [L.OP_TERMINAL_REVOKED, L.OP_OPERATOR_REMOVED]
    assert verify(server.data_dir)["ok"]


def test_a_restore_of_a_lost_ledger_trusts_no_terminal_and_no_operator_of_the_backup(
        start_server, tmp_path):
    """With no ledger to replace, what was revoked since the backup is unknown: only when told
    the ledger is lost does it restore, revoking the terminals and removing the operators; the
    next start writes a new chain admin token."""
    from conftest import Admin, bearer

    from cardcore import layout as L

    server = start_server()
    admin = Admin(server.channel, server.admin_token)
    admin.enroll(7, 3)
    fired = admin.add_operator("fired", cpb.OPERATOR_ROLE_CASHIER, [3])
    server.stop()
    backup_dir = str(tmp_path / "backup")
    assert cli("backup", "--data-dir", server.data_dir, "--to", backup_dir).returncode == 0
    fresh = str(tmp_path / "fresh")
    out = cli("restore", "--from", backup_dir, "--data-dir", fresh)
    assert out.returncode == 2 and "--lost-ledger" in out.stderr
    out = cli("restore", "--from", backup_dir, "--data-dir", fresh, "--lost-ledger")
    assert out.returncode == 0, out.stderr
    ledger = Ledger(f"{fresh}/ledger", readonly=True)
    try:
        assert ledger.read_terminal(7)[1] == L.TERMINAL_REVOKED
        assert all(o["removed"] for o in ledger.read_operators())
        assert ledger.verify()["ok"]
    finally:
        ledger.close()
    import shutil

    shutil.copy(f"{server.data_dir}/keyring.json", f"{fresh}/keyring.json")
    again = start_server(data_dir=fresh)
    assert "created the chain admin 'admin-2'" in again.log()
    number = new_card_number()
    open_card = pb.OpenCardRequest(request_id="o-1", card=cpb.CardRef(card_number=number),
                                   till=cpb.Till(store_id=3), client_time_us=sent_at("o-1"))
    import grpc

    with pytest.raises(grpc.RpcError):
        again.stub.OpenCard(open_card, metadata=bearer(fired))
    assert again.stub.OpenCard(open_card, metadata=bearer(again.admin_token)).reason == 0


def test_a_lost_ledger_restore_never_serves_an_old_copy_kept_beside_it(start_server, tmp_path):
    """A ledger.v1 kept after an upgrade is not the ledger: a restore of a lost ledger uses the
    backup, and a start on a folder whose ledger is gone refuses instead of guessing."""
    import shutil

    from cardcore.backup import restore
    from cardcore.migrate import ledger_format
    from test_migrate import fixture_copy

    data = fixture_copy(tmp_path)
    server = start_server(data_dir=data)  # migrates: ledger.v1 is kept beside ledger
    server.stop()
    backup_dir = str(tmp_path / "backup")
    assert cli("backup", "--data-dir", data, "--to", backup_dir).returncode == 0
    shutil.rmtree(f"{data}/ledger")  # the disk under the live ledger is gone
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure",
                          "--data-dir", data, "--listen", "127.0.0.1:0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "holds no ledger but" in out.stderr
    report = restore(f"{backup_dir}/ledger", f"{data}/ledger", replace=False, lost_ledger=True)
    assert report["ok"] and ledger_format(f"{data}/ledger") == 2
    ledger = Ledger(f"{data}/ledger", readonly=True)
    try:
        assert all(o["removed"] for o in ledger.read_operators())
        assert all(t[1] != 1 for t in ledger.read_terminals())
    finally:
        ledger.close()
