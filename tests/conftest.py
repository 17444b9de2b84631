"""Real parts: a real server process on a free loopback port, real LMDB in a temp folder."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from cardcore.terminal import now_us
from cardcore.cards import random_number
from cardcore.server import certs
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb
from cluster_fixtures import nats_cluster, start_replica, tls_cluster  # noqa: F401  (the cluster tests' fixtures)

START_TIMEOUT_S = 30
PACKAGE_DIRS = ("core", "server", "ext", "proto/cardcore/v1")  # setup.py's package_dir


def pytest_configure(config):
    """cardcore's modules compiled to bytecode once (their __pycache__, as pip does for what it
    installs). Where PYTHONDONTWRITEBYTECODE is set (this machine and CI), every server,
    writer, replica and CLI process the suite starts would compile them from source again:
    about 0.35 s of CPU each, over a thousand processes."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: its controller did it
    import compileall

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in PACKAGE_DIRS:
        compileall.compile_dir(os.path.join(root, folder), maxlevels=0, quiet=1)


LISTEN_RE = re.compile(rb"cardcore listening on ([\d.]+):(\d+)")


_RNG = random.Random()


def new_card_number(rng: random.Random | None = None) -> str:
    """A random 16-digit card number with a valid Luhn check digit."""
    return random_number(rng or _RNG)


EXAMPLES_SCALE = float(os.environ.get("CARDCORE_EXAMPLES_SCALE", "0.15"))


def examples(n: int) -> int:
    """The hypothesis examples of a heavy differential test (kernel against reference, wire, batch wire):
    ``n`` (what these tests ran until 2026-12-01) scaled by CARDCORE_EXAMPLES_SCALE: 0.15 in the
    suite since 2026-12-02, 0.25 before (its 10-minute budget; each run draws new examples, so
    the runs add up), 1.5 in ``make test-deep`` (10x the suite's); at least 50."""
    return max(50, round(n * EXAMPLES_SCALE))


def rid() -> str:
    return str(uuid.uuid4())


_SENT: dict[str, int] = {}


def sent_at(request_id: str) -> int:
    """The client time of a request_id: now the first time, the same on every retry (a client
    repeats its request, client time and all)."""
    return _SENT.setdefault(request_id, now_us())


class ServerProcess:
    """``cardcore serve`` as a child process; stop() sends SIGTERM, kill() sends SIGKILL."""

    def __init__(self, data_dir: str, *extra: str, python_flags: tuple[str, ...] = ()):
        """Plaintext (--insecure) unless ``extra`` configures TLS; ``python_flags``: the
        interpreter's own (``-X faulthandler``)."""
        self.data_dir = data_dir
        self.tls = "--tls-cert" in extra
        if not self.tls:
            extra = ("--insecure", *extra)
        self.log_path = os.path.join(data_dir, "server.log")
        os.makedirs(data_dir, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "cardcore.server.cli", "serve", "--data-dir",
             data_dir, "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=self._log)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = LISTEN_RE.search(line)
            if m:
                self.target = f"{m.group(1).decode()}:{m.group(2).decode()}"
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(self.log_path).read()[-2000:]}")
        else:
            self.proc.kill()
            raise RuntimeError("server did not start in time")
        self.channel = None if self.tls else grpc.insecure_channel(self.target)
        self.stub = None if self.tls else pb_grpc.CardServiceStub(self.channel)

    @property
    def admin_token(self) -> str:
        """The bootstrap chain admin's token, written by the server on first start."""
        with open(os.path.join(self.data_dir, "admin.token")) as f:
            return f.read().strip()

    def aio_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    def stop(self, timeout_s: float = 30) -> int:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture
def start_server(tmp_path):
    """Start servers on a data folder (default: one per test); all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*extra: str, data_dir: str | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or str(tmp_path / "data"), *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture
def server(start_server) -> ServerProcess:
    return start_server()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """Start servers shared by a module's tests (one per set of arguments; stopped after the
    module): for many cases of one test that each open cards of their own and compare only
    what they changed, so that the suite starts one server (about 1 s of CPU) for them, not
    one a case."""
    started: dict[tuple[str, ...], ServerProcess] = {}

    def start(*extra: str) -> ServerProcess:
        if extra not in started:
            started[extra] = ServerProcess(str(tmp_path_factory.mktemp("module") / "data"),
                                           *extra)
        return started[extra]

    yield start
    for server in started.values():
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture
def tls_server(start_server, tmp_path):
    """A server on mutual TLS with a CA of the test's own: (server, the CA's folder, where
    certs.make_client_cert makes the callers' certificates)."""
    ca_dir = str(tmp_path / "certs")
    certs.make_ca(ca_dir)
    cert, key = certs.make_server_cert(ca_dir, ["127.0.0.1"])
    server = start_server("--tls-cert", cert, "--tls-key", key, "--tls-client-ca",
                          os.path.join(ca_dir, "ca.pem"))
    return server, ca_dir


def tls_channel(server, ca_dir: str, common_name: str | None) -> grpc.Channel:
    """A channel with a client certificate for ``common_name`` (made once per name)."""
    with open(os.path.join(ca_dir, "ca.pem"), "rb") as f:
        root = f.read()
    key = cert = None
    if common_name:
        stem = os.path.join(ca_dir, common_name.replace(":", "-"))
        if os.path.exists(f"{stem}.pem"):
            cert_path, key_path = f"{stem}.pem", f"{stem}.key"
        else:
            cert_path, key_path = certs.make_client_cert(ca_dir, common_name)
        with open(cert_path, "rb") as c, open(key_path, "rb") as k:
            cert, key = c.read(), k.read()
    return grpc.secure_channel(server.target, grpc.ssl_channel_credentials(root, key, cert))


def run_machine(machine, examples: int, steps: int, data_dir: str) -> None:
    """A hypothesis state machine run against a live server, then its ledger verified."""
    from hypothesis import HealthCheck, settings

    settings(max_examples=examples, stateful_step_count=steps, deadline=None,
             suppress_health_check=[HealthCheck.too_slow])(machine).TestCase().runTest()
    report = verify(data_dir)
    assert report["ok"], report["problems"]


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "programs")


CAFE_ARGS = ("--program", os.path.join(EXAMPLES, "cafe.toml"))


@pytest.fixture
def cafe(start_server) -> ServerProcess:
    """A server running the example cafe program."""
    return start_server(*CAFE_ARGS)


class Client:
    """The calls a till makes, with exact arguments; raises grpc.RpcError on refusals."""

    def __init__(self, stub):
        self.stub = stub

    def open(self, number, tier=0, request_id=None, **profile):
        request_id = rid() if request_id is None else request_id
        return self.stub.OpenCard(pb.OpenCardRequest(
            client_time_us=sent_at(request_id), request_id=request_id,
            card=cpb.CardRef(card_number=number), tier=tier,
            profile=pb.MemberProfile(**profile), till=cpb.Till(store_id=1, terminal_id=1)))

    def top_up(self, number, amount_minor, request_id=None):
        request_id = rid() if request_id is None else request_id
        return self.stub.TopUp(pb.TopUpRequest(
            client_time_us=sent_at(request_id), request_id=request_id,
            card=cpb.CardRef(card_number=number),
            amount_minor=amount_minor, till=cpb.Till(store_id=1, terminal_id=1)))

    def purchase(self, number, gross_minor, request_id=None, store_id=1, terminal_id=1, staff_id=0):
        return self.stub.Purchase(purchase_request(number, gross_minor, request_id, store_id,
                                                   terminal_id, staff_id))

    def funded_card(self, amount_minor, tier=0) -> str:
        """A new card, opened and topped up: the start of most stories."""
        number = new_card_number()
        self.open(number, tier=tier)
        self.top_up(number, amount_minor)
        return number

    def card(self, number):
        return self.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=number)))


def purchase_request(number, gross_minor, request_id=None, store_id=1, terminal_id=1, staff_id=0):
    request_id = rid() if request_id is None else request_id
    return pb.PurchaseRequest(client_time_us=sent_at(request_id), request_id=request_id,
                              card=cpb.CardRef(card_number=number),
                              gross_amount_minor=gross_minor,
                              till=cpb.Till(store_id=store_id, terminal_id=terminal_id,
                                            staff_id=staff_id))


@pytest.fixture
def client(server) -> Client:
    return Client(server.stub)


def failure_of(err: grpc.RpcError) -> cpb.Failure:
    """The cardcore.v1.Failure detail of a refused unary call."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None, "refusal carries no status details"
    for detail in status.details:
        fail = cpb.Failure()
        if detail.Unpack(fail):
            return fail
    raise AssertionError("no cardcore.v1.Failure in the status details")


def verify(data_dir: str) -> dict:
    """``cardcore verify --json`` on a data folder (the server may be running): the command's
    own parser and function, run in this process (a process for each cost the suite about
    0.45 s of CPU, over 200 times; the command's process, its exit codes and its table are
    tested by test_service and test_cli_errors). Never with a Ledger of this folder open in this
    process: LMDB allows one environment a file a process (closing one drops its locks)."""
    import contextlib
    import io
    import json

    from cardcore.server.cli import build_parser

    checkpointed(data_dir)
    args = build_parser().parse_args(["verify", "--data-dir", data_dir, "--json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = args.func(args)
    assert rc in (0, 1) and out.getvalue(), rc
    return json.loads(out.getvalue())


class Admin:
    """AdminService calls as an operator (default: the bootstrap chain admin)."""

    def __init__(self, channel, token: str):
        from cardcore.v1 import admin_service_pb2_grpc as apb_grpc

        self.stub = apb_grpc.AdminServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def enroll(self, terminal_id: int, store_id: int):
        """Enroll a terminal and return the terminal library object holding its keys."""
        from cardcore.terminal import Terminal, TerminalKeys
        from cardcore.v1 import admin_service_pb2 as apb

        resp = self.stub.EnrollTerminal(apb.EnrollTerminalRequest(client_time_us=now_us(), 
            request_id=rid(), terminal_id=terminal_id, store_id=store_id), metadata=self.metadata)
        return Terminal(TerminalKeys(terminal_id, store_id, resp.initial_key,
                                     resp.terminal.initial_key_id))

    def add_operator(self, name: str, role: int, store_ids=()) -> str:
        from cardcore.v1 import admin_service_pb2 as apb

        return self.stub.AddOperator(apb.AddOperatorRequest(client_time_us=now_us(), 
            request_id=rid(), name=name, role=role, store_ids=list(store_ids)),
            metadata=self.metadata).token


def operator_cli_command(server: "ServerProcess", *args: str,
                         token: str | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of ``cardcore ARGS --target SERVER`` as an operator (default: the
    bootstrap admin), for subprocess.run or Popen."""
    env = dict(os.environ, CARDCORE_TOKEN=server.admin_token if token is None else token)
    return [sys.executable, "-m", "cardcore.server.cli", *args, "--target", server.target], env


def operator_cli(server: "ServerProcess", *args: str, token: str | None = None,
                 timeout_s: float = 60) -> tuple[int, str]:
    """``cardcore ARGS --target SERVER`` as the bootstrap admin (CARDCORE_TOKEN), or the
    operator of ``token``: (exit code, stdout + stderr)."""
    argv, env = operator_cli_command(server, *args, token=token)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    return out.returncode, out.stdout + out.stderr


def stream_top_ups(target: str, number: str, prefix: str, stop: threading.Event,
                   lock: threading.Lock, sent: list[str], acked: set[str]) -> None:
    """One till streaming 1-fen top-ups (request ids ``prefix-0``, ``prefix-1``, ...) until
    ``stop`` is set or the server goes away: every id sent into ``sent``, every applied one
    into ``acked`` (crash and power-cut tests)."""
    channel = grpc.insecure_channel(target)

    def swipes():
        for i in range(1_000_000):
            if stop.is_set():
                return
            request_id = f"{prefix}-{i}"
            with lock:
                sent.append(request_id)
            yield pb.Operation(top_up=pb.TopUpRequest(
                client_time_us=sent_at(request_id), request_id=request_id,
                card=cpb.CardRef(card_number=number), amount_minor=1))

    try:
        for reply in pb_grpc.CardServiceStub(channel).SwipeStream(swipes()):
            if reply.reason == cpb.REASON_OK:
                with lock:
                    acked.add(reply.request_id)
    except grpc.RpcError:
        pass  # the server died, or the power went, under us: expected
    finally:
        channel.close()


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def admin(server) -> Admin:
    return Admin(server.channel, server.admin_token)


def journal_entries(data_dir: str) -> list[tuple]:
    """Every journal entry of a data folder, unpacked (layout.JOURNAL order)."""
    from cardcore import layout as L
    from cardcore.ledger import Ledger

    checkpointed(data_dir)
    ledger = Ledger(os.path.join(data_dir, "ledger"), readonly=True)
    try:
        return [L.JOURNAL.unpack(v) for _, v in ledger.dump()["journal"]]
    finally:
        ledger.close()


def checkpointed(data_dir: str, timeout_s: float = 30.0) -> None:
    """Until LMDB holds every group the log holds, so a direct read of LMDB sees every answer
    given: a running server's writer checkpoints within --checkpoint-ms (waited for); a stopped
    one's log is replayed here, as `cardcore verify` does."""
    import fcntl

    from cardcore.durable import behind, catch_up
    from cardcore.keyring import Keyring
    from cardcore.lookup import lookup_key
    from cardcore.profiles import profile_key

    path = os.path.join(data_dir, "ledger")
    deadline = time.monotonic() + timeout_s
    while behind(path):
        with open(os.path.join(data_dir, "cardcore.lock"), "a+") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a server runs: its checkpoint is due within a moment
                assert time.monotonic() < deadline, f"{path}: no checkpoint in {timeout_s} s"
                time.sleep(0.02)
                continue
            ring = os.path.join(data_dir, "keyring.json")
            index_key = Keyring.load(ring).index_key if os.path.exists(ring) else None
            catch_up(path, index_key and lookup_key(index_key), index_key and profile_key(index_key))


def ledger_bytes(data_dir: str) -> bytes:
    """Every byte of the ledger's folder: LMDB's files and the group log's segments (secrets
    must be in none of them)."""
    folder = os.path.join(data_dir, "ledger")
    return b"".join(open(os.path.join(top, f), "rb").read()
                    for top, _, files in os.walk(folder) for f in files)
