"""A CLI without traps (issue 14): every bad input a user can give the `cardcore` command, driven
through the real command (a subprocess), against a real server on a loopback port where one is
needed. A user's error is one line on stderr, never a traceback, and a non-zero exit: 2 for a
bad argument (found before anything is sent), 1 for a refusal or a server that cannot be
reached. No message shows a card number, a PIN or a token."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from cardcore.server import certs

from conftest import ServerProcess, new_card_number

PIN, NEW_PIN, OTHER_PIN = "2580", "7391", "4862"


def _clean_env(**extra: str) -> dict:
    """The environment without a developer's CARDCORE_* settings (a token, TLS files, a data
    folder whose admin.token would be sent), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDCORE_", "GRPC_"))}
    env.update(extra)
    return env


NO_DATA_DIR = "/nonexistent/cardcore-data"  # no admin.token there: no default token


def cli(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 60,
        stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args], input=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          env=env if env is not None else _clean_env(CARDCORE_DATA_DIR=NO_DATA_DIR))


def user_error(out: subprocess.CompletedProcess, code: int, *words: str,
               secrets: tuple[str, ...] = ()) -> str:
    """The run failed the way a user's error must: exit ``code``, one line on stderr naming
    ``words``, no traceback, no secret anywhere. Returns the line."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line: {out.stderr!r}"
    assert out.returncode == code, (out.returncode, out.stderr)
    for word in words:
        assert word in lines[0], (word, lines[0])
    for secret in secrets:
        assert secret not in out.stderr and secret not in (out.stdout or ""), secret
    return lines[0]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- bad arguments: refused before anything is sent (no server needed) ----------------------

NUMBER = "6225880000001231"  # a valid number: only the argument under test is wrong
CLOSED = f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("args, words", [
    # a huge amount: protobuf's "ValueError: Value out of range" before
    (("top-up", NUMBER, "99999999999999999999"), ("amount", "out of range")),
    (("purchase", NUMBER, "99999999999999999999"), ("amount", "out of range")),
    (("purchase", NUMBER, "92233720368547758.08"), ("amount", "out of range")),
    (("top-up", NUMBER, "0"), ("amount", "above 0")),
    (("top-up", NUMBER, "-5"), ("amount", "above 0")),
    (("purchase", NUMBER, "12.345"), ("amount", "two decimals")),
    (("purchase", NUMBER, "1e5"), ("amount", "two decimals")),
    (("refund", NUMBER, "7", "--amount", "99999999999999999999"), ("--amount", "out of range")),
    # ids and times past their wire fields (were "Value out of range" too)
    (("card", NUMBER, "--store", "-1"), ("--store", "0..4294967295")),
    (("open-card", NUMBER, "--tier", "99999999999"), ("--tier", "out of range")),
    (("top-up", NUMBER, "5", "--client-time-us", "99999999999999999999"), ("--client-time-us",)),
    (("terminals", "enroll", "99999999999", "--store", "1"), ("terminal_id", "out of range")),
    (("refund", NUMBER, "0"), ("seq", "out of range")),
    (("history", NUMBER, "--limit", "1000"), ("--limit", "1..100")),
    (("card", NUMBER, "--timeout-s", "-1"), ("--timeout-s", "above 0")),
    (("card", NUMBER, "--timeout-s", "0"), ("--timeout-s", "above 0")),
    # values that were int() or enum lookups deep in the commands
    (("operation", "r1", "--caller", "bogus"), ("--caller", "KIND:ID")),
    (("operation", "r1", "--caller", "terminal:x"), ("--caller", "whole number")),
    (("operators", "add", "bob", "--stores", "a,b"), ("--stores",)),
    (("history", NUMBER, "--type", "bogus"), ("--type", "purchase")),
    (("--log-level", "bogus", "card", NUMBER), ("--log-level", "INFO")),
    # targets: a bare IPv6 address, a port out of range
    (("card", NUMBER, "--target", "::1"), ("--target", "brackets")),
    (("card", NUMBER, "--target", "localhost:99999"), ("--target", "1..65535")),
    (("card", NUMBER, "--target", "localhost:"), ("--target", "port")),
    # commands missing what they need
    (("terminals", "enroll", "30", "--target", CLOSED), ("--store",)),
    (("terminals", "enroll", "--store", "3", "--target", CLOSED), ("terminal's id",)),
    (("terminals", "revoke", "30", "--store", "3", "--target", CLOSED), ("--store",)),
    (("operators", "add", "--target", CLOSED), ("name",)),
    (("program", "load", "--target", CLOSED), ("program file",)),
    (("card", NUMBER, "--token-file", "/nonexistent/token", "--target", CLOSED), ("--token-file",)),
    # an argument's own check refuses it while it is parsed: the line still names the command
    (("--log-level", "INFO", "close-day", "12", "2026-13-01"), ("cardcore close-day:", "date")),
    (("members", "--from", "2026-01", "--to", "2026-13"), ("cardcore members:", "month")),
])
def test_a_bad_argument_is_one_line_and_exit_2(args, words):
    user_error(cli(*args), 2, *words)


@pytest.mark.parametrize("args, stdin", [
    (("top-up", "1234", "5"), ""),                       # too short
    (("top-up", "62258800000012310000", "5"), ""),       # too long
    (("card", "6225-8800-0000-1231"), ""),               # not digits
    (("card", "-"), "62258800abc01231\n"),                # from standard input
    (("card", "-"), ""),                                  # standard input empty
])
def test_a_bad_card_number_is_refused_without_being_shown(args, stdin):
    shown = args[1] if args[1] != "-" else stdin.strip()
    user_error(cli(*args, "--target", CLOSED, stdin=stdin), 2, "card number",
               secrets=(shown,) if len(shown) >= 4 else ())


def test_tokens_the_parser_echoes_are_masked():
    """A card number or a PIN typed where the parser does not expect one is not repeated."""
    out = cli("card", NUMBER, "--pin", "482913", "6225880000001249", "--target", CLOSED)
    user_error(out, 2, "unrecognized arguments", secrets=("482913", "6225880000001249"))
    out = cli("6225880000001249")
    user_error(out, 2, "invalid choice", secrets=("6225880000001249",))


def test_version_and_help_on_every_option():
    from cardcore.server.cli import build_parser

    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("cardcore ") and out.stdout.split()[1][0].isdigit()
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "cardcore")
    assert not missing, missing
    for command in ("serve", "top-up", "pos", "terminals", "certs"):
        out = cli(command, "--help")
        assert out.returncode == 0 and "--" in out.stdout, out.stderr


# ---- files: the terminal's keys, TLS files, a keyring ---------------------------------------

def test_a_missing_or_bad_keys_file_is_one_line(tmp_path):
    def pos(keys):
        return cli("pos", "--keys", str(keys), "balance", "-", "--target", CLOSED,
                   stdin=f"{NUMBER}\n")

    user_error(pos(tmp_path / "nope.json"), 2, "--keys", "No such file")  # was FileNotFoundError
    good = {"terminal_id": 7, "store_id": 3, "initial_key": "00" * 16,
            "initial_key_id": "11" * 8, "counter": 0}
    cases = {"not JSON": "xx", "terminal_id": json.dumps({}),  # {} was KeyError: 'terminal_id'
             "initial_key": json.dumps(dict(good, initial_key="abcd")),
             "store_id": json.dumps(dict(good, store_id="three")),
             "JSON object": json.dumps([1, 2])}
    for word, text in cases.items():
        path = tmp_path / "t.keys.json"
        path.write_text(text)
        user_error(pos(path), 2, "--keys", "not a terminal's keys file", word,
                   secrets=("00" * 16,))
    user_error(pos(tmp_path), 2, "--keys")  # a folder


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    """A local CA with a server certificate, a back-office and a terminal certificate, and a
    second CA the server does not trust."""
    path = str(tmp_path_factory.mktemp("certs"))
    certs.make_ca(path)
    certs.make_server_cert(path, ["127.0.0.1"])
    certs.make_client_cert(path, "backoffice:hq")
    certs.make_client_cert(path, "terminal:21")
    other = os.path.join(path, "other")
    certs.make_ca(other)
    certs.make_client_cert(other, "backoffice:hq")
    return path


def test_bad_tls_files_are_named_before_anything_is_sent(ca_dir, tmp_path):
    ca, cert, key = (os.path.join(ca_dir, f) for f in ("ca.pem", "backoffice-hq.pem",
                                                        "backoffice-hq.key"))
    base = ("card", NUMBER, "--target", CLOSED)
    cases = [
        # a missing client certificate said only "Socket closed"
        (("--tls-ca", ca), ("no client certificate", "--tls-cert", "--tls-key")),
        (("--tls-ca", ca, "--tls-cert", cert), ("--tls-key missing",)),
        (("--tls-cert", cert, "--tls-key", key), ("--tls-ca",)),  # was plaintext, silently
        (("--tls-ca", "/nonexistent/ca.pem", "--tls-cert", cert, "--tls-key", key),
         ("--tls-ca", "No such file")),  # was FileNotFoundError
        (("--tls-ca", ca, "--tls-cert", cert, "--tls-key", "/nonexistent/k"),
         ("--tls-key", "No such file")),
        (("--tls-ca", key, "--tls-cert", cert, "--tls-key", key), ("--tls-ca", "no PEM certificate")),
        (("--tls-ca", ca, "--tls-cert", key, "--tls-key", key), ("--tls-cert", "no PEM certificate")),
        (("--tls-ca", ca, "--tls-cert", cert, "--tls-key", cert), ("--tls-key", "private key")),
        (("--tls-ca", ca, "--tls-cert", cert, "--tls-key", os.path.join(ca_dir, "ca.key")),
         ("is not the key of",)),
    ]
    for extra, words in cases:
        user_error(cli(*base, *extra), 2, *words)


def test_a_missing_or_damaged_keyring_is_one_line(tmp_path):
    user_error(cli("keys", "check", "--data-dir", str(tmp_path), "--keyring", str(tmp_path / "k")),
               2, "no ledger")
    os.makedirs(tmp_path / "ledger")
    (tmp_path / "ledger" / "data.mdb").write_bytes(b"")
    user_error(cli("keys", "check", "--data-dir", str(tmp_path), "--keyring",
                   str(tmp_path / "nope.json")), 2, "--keyring", "No such file")
    damaged = tmp_path / "ring.json"
    damaged.write_text('{"format": 1}')
    damaged.chmod(0o600)
    user_error(cli("keys", "check", "--data-dir", str(tmp_path), "--keyring", str(damaged)),
               2, "--keyring", "not a cardcore keyring")


def test_serve_refuses_bad_start_up_input_on_one_line(ca_dir, tmp_path):
    def serve(*args):
        return cli("serve", "--data-dir", str(tmp_path / "data"), *args, timeout=60)

    user_error(serve("--insecure", "--listen", "127.0.0.1:99999"), 2, "--listen")
    user_error(serve("--insecure", "--listen", "127.0.0.1:0", "--group-max-ops", "0"), 2,
               "--group-max-ops")  # was an AssertionError in the writer
    user_error(serve("--insecure", "--listen", "127.0.0.1:0", "--metrics-listen", "bogus"), 2,
               "--metrics-listen")  # was int('bogus')
    user_error(serve("--insecure", "--listen", "127.0.0.1:0", "--reader-check-s", "-1"), 2,
               "--reader-check-s")  # the writer died after start
    swapped = ("--tls-cert", os.path.join(ca_dir, "server.key"), "--tls-key",
               os.path.join(ca_dir, "server.pem"), "--tls-client-ca", os.path.join(ca_dir, "ca.pem"))
    user_error(serve("--listen", "127.0.0.1:0", *swapped), 2, "--tls-cert", "no PEM certificate")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = cli("serve", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(blocker / "d"))
    user_error(out, 2, "data folder")  # was a traceback from os.makedirs


# ---- against a real server -------------------------------------------------------------------

def test_an_unreachable_server_is_one_line():
    user_error(cli("card", NUMBER, "--target", CLOSED), 1, "UNAVAILABLE", "nothing listens", CLOSED)
    user_error(cli("card", NUMBER, "--target", "nosuchhost.invalid:50051", "--timeout-s", "5"), 1,
               "UNAVAILABLE", "nosuchhost.invalid")


def test_a_host_without_a_port_means_the_default_port(start_server):
    """--target 127.0.0.1 went to port 443; serve --listen 127.0.0.1 bound 443 too."""
    try:
        server = start_server("--listen", "127.0.0.1")
    except RuntimeError as exc:
        if "cannot listen" in str(exc):
            pytest.skip("port 50051 is in use on this machine")
        raise
    assert server.target == "127.0.0.1:50051"
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)
    number = new_card_number()
    assert cli("open-card", number, "--target", "127.0.0.1", env=env).returncode == 0
    out = cli("card", number, "--target", "127.0.0.1", env=env)
    assert out.returncode == 0 and "active" in out.stdout, out.stderr


def test_bad_token_timeout_and_refusals_against_a_plaintext_server(server, tmp_path):
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)  # its admin.token: the default token
    number = new_card_number()
    assert cli("open-card", number, "--target", server.target, env=env).returncode == 0
    assert cli("top-up", number, "100", "--target", server.target, env=env).returncode == 0
    # a bad token: one line that says where the token came from, never the token
    token = "cc_not-a-real-token-0123456789"
    line = user_error(cli("card", number, "--target", server.target,
                          env=_clean_env(CARDCORE_TOKEN=token)), 1, "UNAUTHENTICATED",
                      "CARDCORE_TOKEN", secrets=(token, number))
    assert "env CARDCORE_TOKEN" in line
    bad_file = tmp_path / "token"
    bad_file.write_text(token)
    user_error(cli("terminals", "list", "--target", server.target, "--token-file", str(bad_file),
                   env=env), 1, "UNAUTHENTICATED", str(bad_file), secrets=(token,))
    # no operator token in plaintext off loopback
    user_error(cli("card", number, "--target", "192.0.2.1:50051", env=env), 2, "only over TLS",
               secrets=(server.admin_token,))
    # refusals from the server: one line each
    user_error(cli("purchase", number, "5000", "--target", server.target, env=env), 1,
               "REASON_INSUFFICIENT_FUNDS", secrets=(number,))
    user_error(cli("top-up", "6225880000001232", "5", "--target", server.target, env=env), 1,
               "REASON_INVALID_CARD_NUMBER", secrets=("6225880000001232",))  # bad check digit
    # a timeout on a request: one line that says how to repeat it. The request goes to a port
    # that takes the connection and never answers (a deadline against the real server races it:
    # a sub-millisecond answer can beat gRPC's timer), then again to the server.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        line = user_error(cli("purchase", number, "1", "--target",
                              f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "0.3",
                              "--request-id", "cli-timeout-1", env=env), 1,
                          "DEADLINE_EXCEEDED", "--request-id cli-timeout-1", "--client-time-us")
    at = line.split("--client-time-us ")[1].split(":")[0].split()[0]
    again = cli("purchase", number, "1", "--target", server.target, "--request-id",
                "cli-timeout-1", "--client-time-us", at, env=env)
    assert again.returncode == 0, again.stderr
    out = cli("card", number, "--target", server.target, env=env)
    assert "99.00" in out.stdout  # applied once


def test_enroll_without_store_enrolls_nothing(server, tmp_path):
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)
    keys = str(tmp_path / "t30.keys.json")
    user_error(cli("terminals", "enroll", "30", "--out", keys, "--target", server.target, env=env),
               2, "--store")
    user_error(cli("terminals", "enroll", "30", "--store", "3", "--out",
                   str(tmp_path / "no" / "t.json"), "--target", server.target, env=env),
               2, "--out", "nothing was enrolled")
    out = cli("terminals", "list", "--target", server.target, env=env)
    assert out.returncode == 0 and "terminal 30" not in out.stdout
    assert not os.path.exists(keys)
    out = cli("terminals", "enroll", "30", "--store", "3", "--out", keys, "--target",
              server.target, env=env)
    assert out.returncode == 0, out.stderr
    assert "terminal 30  store 3  active" in cli("terminals", "list", "--target", server.target,
                                                 env=env).stdout


def _enrolled_till(server, tmp_path, terminal_id: int = 21) -> tuple[dict, tuple]:
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)
    keys = str(tmp_path / f"t{terminal_id}.keys.json")
    out = cli("terminals", "enroll", str(terminal_id), "--store", "3", "--out", keys, "--target",
              server.target, env=env)
    assert out.returncode == 0, out.stderr
    return env, ("pos", "--keys", keys, "--target", server.target)


def test_set_pin_reads_standard_input_in_the_order_of_its_flags(server, tmp_path):
    """'set-pin - --pin - --old-pin -' read the current PIN first: the member's new PIN was
    checked as the current one, and the wrong order cost a try."""
    env, pos = _enrolled_till(server, tmp_path)
    number = new_card_number()
    out = cli(*pos, "open-card", "-", "--pin", "-", stdin=f"{number}\n{PIN}\n", env=env)
    assert out.returncode == 0, out.stderr
    assert cli(*pos, "top-up", "-", "50", stdin=f"{number}\n", env=env).returncode == 0
    # the README's order: --pin (the new PIN) first, then --old-pin
    out = cli(*pos, "set-pin", "-", "--pin", "-", "--old-pin", "-",
              stdin=f"{number}\n{NEW_PIN}\n{PIN}\n", env=env)
    assert out.returncode == 0, out.stderr
    # the other order on the command line reads the other order
    out = cli(*pos, "set-pin", "-", "--old-pin", "-", "--pin", "-",
              stdin=f"{number}\n{NEW_PIN}\n{OTHER_PIN}\n", env=env)
    assert out.returncode == 0, out.stderr
    out = cli(*pos, "balance", "-", "--pin", "-", stdin=f"{number}\n{OTHER_PIN}\n", env=env)
    assert out.returncode == 0 and "balance" in out.stdout, out.stderr
    out = cli("card", number, "--target", server.target, env=env)
    assert re.search(r"PIN\s+set", out.stdout), out.stdout  # not locked, no try spent
    # bad secrets are refused before a swipe, and never shown
    for stdin, words in ((f"{number}\n12\n", ("--pin", "4 to 12 digits")),
                         (f"{number}\n", ("standard input ended", "--pin")),
                         (f"{number[:-1]}x\n{PIN}\n", ("card number",))):
        user_error(cli(*pos, "purchase", "-", "5", "--pin", "-", stdin=stdin, env=env), 2,
                   *words, secrets=(number, number[:-1], PIN))
    user_error(cli(*pos, "purchase", "-", "--pin", "-", stdin=f"{number}\n{PIN}\n", env=env), 2,
               "needs an amount")
    user_error(cli(*pos, "balance", "-", "--old-pin", "-", stdin=f"{number}\n{PIN}\n", env=env), 2,
               "--old-pin")
    # a wrong PIN is the server's refusal: one line with the tries left, not the PIN
    user_error(cli(*pos, "purchase", "-", "1", "--pin", "-", stdin=f"{number}\n{PIN}\n", env=env),
               1, "REASON_PIN_WRONG", "tries_left=2", secrets=(number, PIN))


def test_output_cut_short_ends_quietly(server):
    """| head: BrokenPipeError's traceback before; now nothing on stderr and exit 141."""
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)
    number = new_card_number()
    assert cli("open-card", number, "--target", server.target, env=env).returncode == 0
    for args in (("card", number, "--target", server.target), ("--help",),
                 ("verify", "--data-dir", server.data_dir)):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        try:
            out = cli(*args, env=env, stdout=write_end)
        finally:
            os.close(write_end)
        assert out.stderr == "", (args, out.stderr)
        if args != ("--help",):  # argparse itself ignores a failed write of the help
            assert out.returncode == 141, (args, out.returncode)


def test_interrupted_while_reading_a_card_number(server):
    env = _clean_env(CARDCORE_DATA_DIR=server.data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "cardcore.server.cli", "card", "-", "--target",
                             server.target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(3)  # started and waiting on standard input
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip() == "cardcore: interrupted"


# ---- mutual TLS ------------------------------------------------------------------------------

@pytest.fixture
def tls_server(start_server, ca_dir) -> ServerProcess:
    return start_server("--tls-cert", os.path.join(ca_dir, "server.pem"), "--tls-key",
                        os.path.join(ca_dir, "server.key"), "--tls-client-ca",
                        os.path.join(ca_dir, "ca.pem"))


def test_tls_failures_say_what_is_wrong(tls_server, ca_dir):
    ca = os.path.join(ca_dir, "ca.pem")
    env = _clean_env(CARDCORE_DATA_DIR=tls_server.data_dir)
    target = ("--target", tls_server.target, "--timeout-s", "10")
    # plaintext to a TLS server
    user_error(cli("card", NUMBER, *target, env=env), 1, "UNAVAILABLE", "mutual TLS", "--tls-ca")
    # a client certificate from a CA the server does not trust
    other = os.path.join(ca_dir, "other")
    user_error(cli("card", NUMBER, *target, "--tls-ca", ca, "--tls-cert",
                   os.path.join(other, "backoffice-hq.pem"), "--tls-key",
                   os.path.join(other, "backoffice-hq.key"), env=env), 1, "UNAVAILABLE",
               "did not accept the client certificate")
    # a server certificate --tls-ca did not sign
    user_error(cli("card", NUMBER, *target, "--tls-ca", os.path.join(other, "ca.pem"),
                   "--tls-cert", os.path.join(ca_dir, "backoffice-hq.pem"), "--tls-key",
                   os.path.join(ca_dir, "backoffice-hq.key"), env=env), 1, "UNAVAILABLE",
               "not signed by --tls-ca")
    # no client certificate at all: said before connecting
    user_error(cli("card", NUMBER, *target, "--tls-ca", ca, env=env), 2, "no client certificate")


def test_card_commands_over_tls_use_the_default_token(tls_server, ca_dir):
    """card, top-up and purchase ignored <CARDCORE_DATA_DIR>/admin.token (admin commands read
    it): over TLS they answered UNAUTHENTICATED."""
    env = _clean_env(CARDCORE_DATA_DIR=tls_server.data_dir,
                     CARDCORE_TLS_CA=os.path.join(ca_dir, "ca.pem"),
                     CARDCORE_TLS_CERT=os.path.join(ca_dir, "backoffice-hq.pem"),
                     CARDCORE_TLS_KEY=os.path.join(ca_dir, "backoffice-hq.key"))
    number = new_card_number()
    target = ("--target", tls_server.target)
    for args in (("open-card", number, "--store", "3"), ("top-up", number, "50"),
                 ("card", number), ("terminals", "list")):
        out = cli(*args, *target, env=env)
        assert out.returncode == 0, (args, out.stderr)
    out = cli("card", number, *target, env=dict(env, CARDCORE_DATA_DIR=NO_DATA_DIR))
    user_error(out, 1, "UNAUTHENTICATED", "none sent")


def test_the_load_kit_reads_cardcore_token_and_still_the_old_name(tmp_path):
    """bench/load.py --target: CARDCORE_TOKEN, as the cardcore command; CARDCORE_ADMIN_TOKEN
    after it, with a deprecation note; --admin-token-file first, --data-dir's admin.token last."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

    def token(*args, **env):
        code = f"import sys; sys.path.insert(0, {bench!r}); import load; print(load.admin_token(*{args!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=_clean_env(**env))

    (tmp_path / "admin.token").write_text("cc_from-data-dir\n")
    (tmp_path / "file.token").write_text("cc_from-file\n")
    out = token(None, None, CARDCORE_TOKEN="cc_new", CARDCORE_ADMIN_TOKEN="cc_old")
    assert out.stdout.strip() == "cc_new" and out.stderr == ""
    out = token(None, str(tmp_path), CARDCORE_ADMIN_TOKEN="cc_old")
    assert out.stdout.strip() == "cc_old" and "deprecated" in out.stderr and "cc_old" not in out.stderr
    assert token(None, str(tmp_path)).stdout.strip() == "cc_from-data-dir"
    out = token(str(tmp_path / "file.token"), str(tmp_path), CARDCORE_TOKEN="cc_new")
    assert out.stdout.strip() == "cc_from-file"
    out = token(str(tmp_path / "missing.token"), None)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "missing.token" in out.stderr


def test_the_command_line_builds_its_parser_without_importing_nats():
    """Every command builds the whole parser: cluster-config's names come from
    cardcore.natsnames, so nats-py (about 60 ms a command) is imported only by what talks to
    NATS."""
    code = ("import sys; from cardcore.server.cli import build_parser; build_parser(); "
            "print('nats' in sys.modules, 'cardcore.jetlog' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.parametrize("argv", [["purchase", "--help"], ["--log-level", "DEBUG", "report", "-h"],
                                  ["members", "--help"], ["import", "--help"]])
def test_a_client_command_starts_without_importing_the_server(argv):
    """About 270 client commands run per suite, and a till's script runs many: a client
    command's parser leaves out the server's commands, whose defaults would import the ledger,
    the writer and cryptography's X.509 (about 0.25 s of CPU a command). The server's commands
    are still there when the command is one of them."""
    code = ("import sys; from cardcore.server.cli import main\n"
            "try: main(sys.argv[1:])\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in ('cardcore.ledger', 'cardcore.server.writer', "
            "'cardcore.daytotals', 'cardcore.members', 'cryptography.x509', 'lmdb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    assert "usage: cardcore" in out.stdout and out.stdout.strip().endswith("[]"), out
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert "--checkpoint-ms" in out.stdout and "--group-max-ops" in out.stdout, out.stderr
