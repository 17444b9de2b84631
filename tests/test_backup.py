"""Hot backup while serving, and restore: the copy verifies and equals the original."""
import subprocess
import sys

from cardcore.ledger import Ledger
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, new_card_number, verify, sent_at


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args], capture_output=True,
                          text=True, timeout=120)


def dump(data_dir: str) -> dict:
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

    restored_dir = str(tmp_path / "restored")
    out = cli("restore", "--from", backup_dir, "--data-dir", restored_dir)
    assert out.returncode == 0, out.stderr
    restored = dump(restored_dir)
    assert verify(restored_dir)["ok"]
    last = restored["journal"][-1][0]
    assert restored["journal"] == [kv for kv in original["journal"] if kv[0] <= last]
    assert len(original["journal"]) == len(restored["journal"]) + 1  # the later purchase
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
    out = cli("restore", "--from", backup_dir, "--data-dir", str(tmp_path / "r"))
    assert out.returncode == 1 and "does not verify" in out.stderr
