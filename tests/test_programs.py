"""Card programs stored in the ledger by version: loaded through the writer, refused with the line
and the problem, never stranding a tier that holds cards, and every entry explained by its own
version."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from cardcore import layout as L
from cardcore.terminal import now_us
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import common_pb2 as cpb
from conftest import Admin, Client, failure_of, journal_entries, new_card_number, rid, verify

R = cpb.Reason
SILVER_95 = ('points_unit_minor = 100\npoints_per_unit = 1\n'
             '[[tiers]]\nname = "member"\nrate_bp = 10000\n'
             '[[tiers]]\nname = "silver"\nrate_bp = 9500\n')
SILVER_90 = SILVER_95.replace("9500", "9000")


def cli(server, *args, token=True):
    env = dict(os.environ, CARDCORE_DATA_DIR=server.data_dir)
    if not token:
        env["CARDCORE_TOKEN_FILE"] = os.devnull
    return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args, "--target",
                           server.target], capture_output=True, text=True, timeout=60, env=env)


def load(admin: Admin, document: str, token_metadata=None):
    return admin.stub.LoadProgram(apb.LoadProgramRequest(
        request_id=rid(), client_time_us=now_us(), document=document),
        metadata=token_metadata or admin.metadata)


@pytest.fixture
def program_server(start_server, tmp_path):
    path = tmp_path / "program.toml"
    path.write_text(SILVER_95)
    return start_server("--program", str(path)), path


def test_a_loaded_program_applies_from_then_on_and_earlier_entries_keep_theirs(program_server,
                                                                               tmp_path):
    """silver pays 95 % of 100.00 under version 1 (95.00, 95 points), 90 % under version 2."""
    server, _ = program_server
    c = Client(server.stub)
    number = c.funded_card(100_000, tier=1)
    before = c.purchase(number, 10_000)
    assert (before.paid_minor, before.points_earned, before.program_version) == (9_500, 95, 1)
    path = tmp_path / "v2.toml"
    path.write_text(SILVER_90)
    out = cli(server, "program", "load", str(path))
    assert out.returncode == 0 and "program version 2 is current" in out.stdout, out.stderr
    after = c.purchase(number, 10_000)
    assert (after.paid_minor, after.points_earned, after.program_version) == (9_000, 90, 2)
    report = verify(server.data_dir)
    assert report["ok"] and report["program_version"] == 2
    loads = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_PROGRAM_LOADED]
    assert [(e[23], e[21]) for e in loads] == [(1, 0), (2, 1)]  # version, operator (0: the server)
    shown = cli(server, "program", "show", "--version", "1")
    assert shown.returncode == 0 and 'rate_bp = 9500' in shown.stdout


def test_a_bad_program_is_refused_with_its_line_and_the_running_one_is_unchanged(program_server,
                                                                                 tmp_path):
    server, _ = program_server
    admin = Admin(server.channel, server.admin_token)
    bad = SILVER_95 + '[[tiers]]\nname = "gold"\nrate_bp = 12000\n'
    with pytest.raises(grpc.RpcError) as err:
        load(admin, bad)
    fail = failure_of(err.value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fail.reason == R.REASON_PROGRAM_INVALID
    assert fail.detail == "line 11: tier 'gold': rate_bp must be 1..10000"
    path = tmp_path / "typo.toml"
    path.write_text(SILVER_95.replace("points_per_unit", "point_per_unit"))
    out = cli(server, "program", "load", str(path))
    assert out.returncode == 2 and "line 2: unknown key 'point_per_unit'" in out.stderr
    current = admin.stub.GetProgram(apb.GetProgramRequest(), metadata=admin.metadata)
    assert current.version == 1 and current.current and current.document == SILVER_95


def test_a_program_that_drops_a_tier_holding_cards_is_refused(program_server):
    server, _ = program_server
    admin = Admin(server.channel, server.admin_token)
    Client(server.stub).open(new_card_number(), tier=1)
    one_tier = '[[tiers]]\nname = "member"\nrate_bp = 10000\n'
    with pytest.raises(grpc.RpcError) as err:
        load(admin, one_tier)
    assert failure_of(err.value).reason == R.REASON_PROGRAM_STRANDS_CARDS
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # only a chain admin loads programs
    manager = admin.add_operator("mgr", cpb.OPERATOR_ROLE_STORE_MANAGER, [3])
    with pytest.raises(grpc.RpcError) as err:
        load(admin, SILVER_90, (("authorization", f"Bearer {manager}"),))
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED


def test_an_edited_program_file_becomes_a_new_version_at_start_and_a_bad_one_stops_it(
        program_server, start_server):
    server, path = program_server
    data_dir = server.data_dir
    server.stop()
    again = start_server("--program", str(path), data_dir=data_dir)  # the same file: no new version
    assert verify(data_dir)["program_version"] == 1
    again.stop()
    path.write_text(SILVER_90)
    edited = start_server("--program", str(path), data_dir=data_dir)
    assert "stored as version 2" in edited.log()
    number = Client(edited.stub).funded_card(10_000, tier=1)
    assert Client(edited.stub).purchase(number, 1_000).paid_minor == 900
    edited.stop()
    path.write_text(SILVER_90 + "rate_bp = 5\n")
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure",
                          "--data-dir", data_dir, "--listen", "127.0.0.1:0", "--program",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not valid: line 9: Cannot overwrite a value" in out.stderr
    assert verify(data_dir)["program_version"] == 2
