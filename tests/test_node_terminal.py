"""The Node.js terminal (examples/node-terminal), written from docs/terminal-protocol.md alone,
against a real server over mutual TLS with a terminal certificate and the keys file that
`cardcore terminals enroll` writes: a card opened with a PIN, a top-up, a PIN purchase and its
retry, a wrong PIN, a purchase beyond the balance, balance inquiries, a reversal of a request
never sent (which then is refused), a reversal of the purchase and GetOperation. Then the
server's own state: balances, the journal, the terminal's KSN counter against the counter the
Node terminal saved, verify, and no secret in any output or log.

Needs `node` and the example's node_modules (`npm ci --prefix examples/node-terminal`, as
.ci/run does); skipped with that message where either is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

from cardcore import layout as L
from cardcore.server import certs
from cardcore.terminal import now_us
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb
from conftest import bearer, journal_entries, new_card_number, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "node-terminal")
DOC = os.path.join(ROOT, "docs", "terminal-protocol.md")
NODE = shutil.which("node")
INSTALL = "npm ci --prefix examples/node-terminal"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason=f"node is not installed (apt-get install nodejs npm; "
                                            f"then {INSTALL})"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(EXAMPLE, "node_modules", "@grpc", "grpc-js")),
                       reason=f"the Node terminal's packages are not installed: {INSTALL}"),
]

TERMINAL_ID, STORE_ID = 21, 3
PIN, WRONG_PIN = "482916", "735102"


class NodeTerminal:
    """`node cli.js` with this terminal's keys and certificate; secrets go through stdin."""

    def __init__(self, server, ca_dir: str, keys: str):
        cert, key = certs.make_client_cert(ca_dir, f"terminal:{TERMINAL_ID}")
        self.options = ["--keys", keys, "--target", server.target, "--ca",
                        os.path.join(ca_dir, "ca.pem"), "--cert", cert, "--key", key,
                        "--server-name", "localhost"]
        self.outputs: list[str] = []

    def run(self, *args: str, stdin: str = "") -> tuple[int, dict]:
        out = subprocess.run([NODE, os.path.join(EXAMPLE, "cli.js"), *self.options, *args],
                             input=stdin, capture_output=True, text=True, timeout=60)
        self.outputs += [out.stdout, out.stderr]
        assert out.stderr == "", out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1, out.stdout
        return out.returncode, json.loads(lines[0])

    def ok(self, *args: str, stdin: str = "") -> dict:
        rc, doc = self.run(*args, stdin=stdin)
        assert rc == 0 and doc["ok"], doc
        return doc

    def refused(self, *args: str, stdin: str = "") -> dict:
        rc, doc = self.run(*args, stdin=stdin)
        assert rc == 1 and not doc["ok"] and doc["outcome"] == "refused", doc
        return doc


def enroll(server, ca_dir: str, keys: str) -> None:
    """The keys file as a back office makes it: `cardcore terminals enroll --out`."""
    office_cert, office_key = certs.make_client_cert(ca_dir, "backoffice:hq")
    env = dict(os.environ, CARDCORE_TOKEN=server.admin_token,
               CARDCORE_TLS_CA=os.path.join(ca_dir, "ca.pem"))
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "terminals", "enroll",
                          str(TERMINAL_ID), "--store", str(STORE_ID), "--out", keys,
                          "--target", server.target, "--tls-cert", office_cert,
                          "--tls-key", office_key], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr


def back_office(server, ca_dir: str) -> grpc.Channel:
    with open(os.path.join(ca_dir, "ca.pem"), "rb") as f:
        root = f.read()
    stem = os.path.join(ca_dir, "backoffice-hq")
    with open(f"{stem}.pem", "rb") as c, open(f"{stem}.key", "rb") as k:
        return grpc.secure_channel(server.target, grpc.ssl_channel_credentials(root, k.read(), c.read()))


def test_the_node_terminal_checks_the_documents_worked_example():
    out = subprocess.run([NODE, os.path.join(EXAMPLE, "cli.js"), "check-vectors", DOC],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["checked"] >= 40 and result["failed"] == []


def test_the_node_terminal_swipes_against_a_real_server(tls_server, tmp_path):
    server, ca_dir = tls_server
    keys = str(tmp_path / "t21.keys.json")
    enroll(server, ca_dir, keys)
    with open(keys) as f:
        enrolled = json.load(f)
    node = NodeTerminal(server, ca_dir, keys)
    number = new_card_number()

    opened = node.ok("open-card", stdin=f"{number}\n{PIN}\n")
    assert opened["result"]["type"] == "OPERATION_TYPE_OPEN_CARD" and opened["ksn_counter"] == 1
    topped = node.ok("top-up", "50000", stdin=f"{number}\n")
    assert topped["result"]["balance_after"]["available_minor"] == "50000"

    # A PIN purchase, then its retry: same request_id and client time, a fresh KSN.
    request_id, at_us = "0193f2c4-5b7e-7a61-9d42-6c1f0e8a2b35", str(now_us())
    sale = ("purchase", "12345", "--request-id", request_id, "--client-time-us", at_us)
    paid = node.ok(*sale, stdin=f"{number}\n{PIN}\n")["result"]
    assert (paid["type"], paid["replayed"], paid["paid_minor"], paid["points_earned"]) == \
        ("OPERATION_TYPE_PURCHASE", False, "12345", "123")
    assert paid["balance_after"]["available_minor"] == "37655"
    again = node.ok(*sale, stdin=f"{number}\n{PIN}\n")
    assert again["result"]["replayed"] is True and again["result"]["seq"] == paid["seq"]
    assert again["ksn_counter"] == 4 and again["result"]["balance_after"]["available_minor"] == "37655"

    wrong = node.refused("purchase", "100", stdin=f"{number}\n{WRONG_PIN}\n")
    assert (wrong["code"], wrong["reason"], wrong["metadata"]) == \
        ("PERMISSION_DENIED", "REASON_PIN_WRONG", {"pin_tries_left": "2"})
    short = node.refused("purchase", "9999999", stdin=f"{number}\n{PIN}\n")
    assert (short["code"], short["reason"], short["metadata"]) == \
        ("FAILED_PRECONDITION", "REASON_INSUFFICIENT_FUNDS", {"available_minor": "37655"})

    seen = node.ok("balance", stdin=f"{number}\n{PIN}\n")["card"]
    assert (seen["view"], seen["balance"]["available_minor"], seen["pin_tries"]) == \
        ("CARD_VIEW_BALANCE", "37655", 1)  # the wrong PIN counted; a right one on a declined
    # purchase or an inquiry does not reset the count (only an operation that goes through does)
    bare = node.ok("balance", stdin=f"{number}\n")["card"]
    assert (bare["view"], bare["status"], bare["balance"]) == \
        ("CARD_VIEW_STATUS", "CARD_STATUS_ACTIVE", None)
    assert bare["masked_number"].endswith(number[-4:]) and number not in bare["masked_number"]

    # A swipe given up on before it was ever sent: reversed, then refused when it arrives.
    lost_id, lost_at = "0193f2c4-5b7e-7a61-9d42-6c1f0e8a2b36", str(now_us())
    tombstone = node.ok("reverse", lost_id, lost_at, stdin=f"{number}\n")["result"]
    assert (tombstone["type"], tombstone["original_seq"]) == ("OPERATION_TYPE_REVERSAL", "0")
    late = node.refused("purchase", "500", "--request-id", lost_id, "--client-time-us", lost_at,
                        stdin=f"{number}\n{PIN}\n")
    assert (late["code"], late["reason"]) == ("FAILED_PRECONDITION", "REASON_REVERSED")

    # The purchase given up on after all: undone exactly.
    undone = node.ok("reverse", request_id, at_us, stdin=f"{number}\n")["result"]
    assert undone["original_seq"] == paid["seq"]
    assert undone["balance_after"]["available_minor"] == "50000"
    state = node.ok("operation", request_id, at_us)
    assert state["state"] == "OPERATION_STATE_APPLIED" and state["result"]["seq"] == paid["seq"]

    # The server's own view.
    office = back_office(server, ca_dir)
    admin = bearer(server.admin_token)
    card = pb_grpc.CardServiceStub(office).GetCard(
        pb.GetCardRequest(card=cpb.CardRef(card_number=number)), metadata=admin)
    assert (card.balance.available_minor, card.balance.points, card.pin_set, card.pin_tries) == \
        (50_000, 0, True, 1)
    failed = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_PIN_FAILED]
    assert len(failed) == 1 and failed[0][24] == L.CALLER_TERMINAL and failed[0][26] == TERMINAL_ID
    with open(keys) as f:
        saved = json.load(f)
    assert saved["initial_key"] == enrolled["initial_key"] and saved["counter"] == 11
    assert oct(os.stat(keys).st_mode & 0o777) == "0o600"
    terminal = apb_grpc.AdminServiceStub(office).ListTerminals(
        apb.ListTerminalsRequest(store_id=STORE_ID), metadata=admin).terminals[0]
    assert (terminal.terminal_id, terminal.last_ksn_counter) == (TERMINAL_ID, saved["counter"])
    office.close()
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]

    server.stop()
    for text in [*node.outputs, server.log()]:
        for secret in (number, PIN, WRONG_PIN, enrolled["initial_key"]):
            assert secret not in text
