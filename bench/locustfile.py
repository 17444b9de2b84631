"""Locust fleet of POS terminals: each locust user is one enrolled terminal swiping member cards.

Run it through ``bench/load.py`` (``make load``), which starts a server, enrolls the terminals,
seeds the cards and hands this file the population in ``CARDCORE_LOAD_POPULATION``.

Every user builds its requests with the terminal library (``cardcore.terminal``, the same
code as ``cardcore pos``): a fresh DUKPT KSN per transaction, the card number encrypted under
the data key, PIN blocks under the PIN key. A ``Terminal`` object belongs to one user at a
time, so no KSN counter is ever used twice.

The mix, by task weight (new operation types join here as they are built):

    purchase               70   right PIN
    balance inquiry        15   GetCard with the card's PIN (always unary: it is not a stream
                                operation): the writer checks the PIN and the answer must show
                                the balances (CARD_VIEW_BALANCE); without the PIN a terminal
                                would see only the masked number, status and tier
    top-up                 10   no PIN (the default card program asks none on top-ups)
    purchase (wrong PIN)    3   on a small slice of cards reserved for it, so lock-outs never
                                touch the other tasks; REASON_PIN_WRONG and REASON_PIN_LOCKED
                                are the expected answers and count as successes

``CARDCORE_LOAD_MODE``: ``unary`` (one unary call per task) or ``stream`` (each terminal keeps
one SwipeStream open and sends one Operation per task, reading its reply before the next).

Every mutating request carries the terminal's clock (``client_time_us``, set by the terminal
library); the fleet never re-sends a request, so no retry has to repeat one.

Every call is reported to locust's request event; a declined call is a failure whose exception
text (and repr, which locust's failure table shows) is the Reason name, e.g.
REASON_INSUFFICIENT_FUNDS. Besides locust's CSV, the users write what they saw (outcomes by
reason, exact latency percentiles: locust rounds to whole milliseconds) to
``CARDCORE_LOAD_OUTCOMES`` when locust quits.

gRPC under gevent: locust runs all users as greenlets of one process after gevent's monkey
patching, so this file uses gRPC's sync API, and ``init_gevent()`` runs at import, before any
channel exists (grpc.aio has its own event loop and does not mix with gevent).
"""
from __future__ import annotations

import collections
import json
import os
import random
import time
import uuid

import gevent
import gevent.queue
import grpc
import grpc.experimental.gevent as grpc_gevent
from grpc_status import rpc_status
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

from cardcore.terminal import Terminal, TerminalKeys
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb

# gRPC's completion queue polled through gevent's hub: before any channel exists (locust has
# already monkey-patched the process when it imports this file).
grpc_gevent.init_gevent()

R = cpb.Reason
OK = "REASON_OK"
WRONG_PIN_EXPECTED = frozenset({"REASON_PIN_WRONG", "REASON_PIN_LOCKED"})  # REASON_OK would be a bug
# Answers the server counts against the terminal's failure budget (server/access.py PROBE_REASONS);
# every card inquiry from a terminal counts too, whatever its answer.
PROBES = frozenset({"REASON_PIN_WRONG", "REASON_CARD_NOT_FOUND", "REASON_CARD_ALREADY_EXISTS",
                    "REASON_PIN_BLOCK_INVALID", "REASON_CARD_DATA_INVALID"})
MODE = os.environ.get("CARDCORE_LOAD_MODE", "unary")
# The server's per-terminal budget of wrong PINs and unknown cards per minute (`cardcore serve
# --failures-per-minute`): past it, ALL swipes of the terminal are refused for a while. Each
# user counts the answers the server counts (PROBES and every inquiry, with its own clock, which
# runs a little behind the server's) and skips the wrong-PIN and inquiry tasks while one more could
# reach the limit.
FAILURES_PER_MINUTE = int(os.environ.get("CARDCORE_LOAD_FAILURES_PER_MINUTE", "10"))
FAILURE_WINDOW_S = 60.0
PURCHASE_MINOR = (100, 20_000)
TOP_UP_MINOR = (1_000, 50_000)
STREAM_CLOSE_S = 5.0


class Declined(Exception):
    """A call that did not succeed; its text and repr are the Reason (or gRPC status) name."""

    def __repr__(self) -> str:
        return str(self)


def _load_population() -> dict:
    path = os.environ.get("CARDCORE_LOAD_POPULATION")
    if not path:
        raise RuntimeError("CARDCORE_LOAD_POPULATION is not set: run this through bench/load.py")
    with open(path) as f:
        return json.load(f)


POPULATION = _load_population()
CARDS: list[tuple[str, str]] = [tuple(c) for c in POPULATION["cards"]]
WRONG_PIN_CARDS: list[tuple[str, str]] = [tuple(c) for c in POPULATION["wrong_pin_cards"]]
_FREE_TERMINALS = collections.deque(
    Terminal(TerminalKeys(t["terminal_id"], t["store_id"], bytes.fromhex(t["initial_key"]),
                          bytes.fromhex(t["initial_key_id"]), t["counter"]))
    for t in POPULATION["terminals"])


# ---- what the users saw (beside locust's own statistics) ----------------------------------

_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_latencies_ms: dict[str, list[float]] = collections.defaultdict(list)
_skipped = collections.Counter()


@events.test_start.add_listener
def _reset(**_kw) -> None:
    _outcomes.clear()
    _latencies_ms.clear()
    _skipped.clear()


def _percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    """Every user has stopped: write what they saw, then give locust's CSV writer one more turn.

    Locust (2.47) rewrites ``--csv`` files once a second and does not write them again at
    shutdown, so the CSV would miss the run's last second (locustio/locust#1806, #2299);
    its writer greenlet is still alive here and catches up during the sleep.
    """
    _write_outcomes()
    if os.environ.get("CARDCORE_LOAD_OUTCOMES"):  # run by bench/load.py, which reads the CSV
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def _write_outcomes() -> None:
    path = os.environ.get("CARDCORE_LOAD_OUTCOMES")
    if not path:
        return
    doc = {"mode": MODE, "failures_per_minute": FAILURES_PER_MINUTE, "skipped": dict(_skipped),
           "operations": {}}
    for name, counts in _outcomes.items():
        lat = sorted(_latencies_ms[name])
        doc["operations"][name] = {
            "outcomes": dict(counts), "requests": len(lat),
            **{f"p{int(p * 100)}_ms": round(_percentile(lat, p), 3) for p in (0.50, 0.95, 0.99)}}
    tmp = path + ".new"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def _reason_of(err: grpc.RpcError) -> str:
    """The cardcore Reason name of a refused unary call, or the bare gRPC status name."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        status = None
    if status is not None:
        for detail in status.details:
            fail = cpb.Failure()
            if detail.Unpack(fail):
                return R.Name(fail.reason)
    return err.code().name if err.code() else "UNKNOWN"


class _Swipes:
    """One terminal's SwipeStream: send one Operation, read its result, then the next."""

    _END = object()

    def __init__(self, stub: pb_grpc.CardServiceStub):
        self._out: gevent.queue.Queue = gevent.queue.Queue()
        self._call = stub.SwipeStream(iter(self._out.get, self._END))

    def swipe(self, op: pb.Operation) -> pb.OperationResult:
        self._out.put(op)
        return next(self._call)

    def close(self) -> None:
        self._out.put(self._END)  # done writing: the server ends the stream once it has answered
        try:
            with gevent.Timeout(STREAM_CLOSE_S):
                for _ in self._call:
                    pass
        except (grpc.RpcError, gevent.Timeout):
            pass
        finally:
            self._call.cancel()


class PosTerminal(User):
    """One POS terminal: its own keys, its own channel (and connection), its own stream."""

    wait_time = constant(0)  # closed loop: the next swipe as soon as the last one is answered

    def on_start(self) -> None:
        if not _FREE_TERMINALS:
            # More users than enrolled terminals (the web UI can ask for more): sharing a
            # terminal would reuse KSN counters, so this user does not start.
            raise StopUser()
        self.terminal = _FREE_TERMINALS.popleft()
        # A local subchannel pool: each terminal gets its own connection, as real ones do.
        self.channel = grpc.insecure_channel(self.host, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.CardServiceStub(self.channel)
        self.swipes: _Swipes | None = None
        self.rng = random.Random()
        self.top_up_pin = False  # set if the card program turns out to want the PIN on top-ups
        self.probes: collections.deque = collections.deque()  # when this terminal was counted

    def on_stop(self) -> None:
        terminal = getattr(self, "terminal", None)
        if terminal is None:
            return
        if self.swipes is not None:
            self.swipes.close()
            self.swipes = None
        self.channel.close()
        _FREE_TERMINALS.append(terminal)  # its counter has moved on: safe for the next user
        self.terminal = None

    # ---- reporting --------------------------------------------------------------------

    def _report(self, name: str, reason: str, started: float, length: int,
                expected: frozenset = frozenset({OK}), counted: bool = False) -> None:
        ms = (time.perf_counter() - started) * 1e3
        if counted or reason in PROBES:
            self.probes.append(time.monotonic())
        _outcomes[name][reason] += 1
        _latencies_ms[name].append(ms)
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=ms, response_length=length,
            exception=None if reason in expected else Declined(reason), context={})

    def _mutate(self, name: str, kind: str, request, expected: frozenset = frozenset({OK})) -> str:
        """One mutating operation, unary or on this terminal's stream; reported; its reason."""
        started = time.perf_counter()
        length = 0
        if MODE == "stream":
            try:
                if self.swipes is None:
                    self.swipes = _Swipes(self.stub)
                result = self.swipes.swipe(pb.Operation(**{kind: request}))
                reason, length = R.Name(result.reason), result.ByteSize()
            except grpc.RpcError as err:  # the stream broke: report it, open a new one next time
                reason = f"STREAM_{err.code().name if err.code() else 'UNKNOWN'}"
                self.swipes = None
            except StopIteration:
                reason = "STREAM_ENDED"
                self.swipes = None
        else:
            call = {"purchase": self.stub.Purchase, "top_up": self.stub.TopUp}[kind]
            try:
                result = call(request)
                reason, length = OK, result.ByteSize()
            except grpc.RpcError as err:
                reason = _reason_of(err)
        self._report(name, reason, started, length, expected)
        return reason

    # ---- the mix ----------------------------------------------------------------------

    @task(70)
    def purchase(self) -> None:
        number, pin = self.rng.choice(CARDS)
        amount = self.rng.randrange(*PURCHASE_MINOR)
        self._mutate("purchase", "purchase",
                     self.terminal.purchase(str(uuid.uuid4()), number, pin, amount))

    def _budget_full(self, name: str) -> bool:
        """True (and the task counted as skipped) while one more counted answer could reach the
        server's per-terminal limit: past it every swipe of this terminal would be refused."""
        now = time.monotonic()
        while self.probes and now - self.probes[0] >= FAILURE_WINDOW_S:
            self.probes.popleft()
        if len(self.probes) >= FAILURES_PER_MINUTE - 1:
            _skipped[name] += 1
            return True
        return False

    @task(15)
    def balance_inquiry(self) -> None:
        if self._budget_full("balance inquiry"):  # every inquiry counts against the budget
            return
        number, pin = self.rng.choice(CARDS)
        request = self.terminal.get_card(number, pin)  # with the PIN: the balances are shown
        started = time.perf_counter()
        try:
            card = self.stub.GetCard(request)
            length = card.ByteSize()
            # the PIN was checked: anything less than the balance view is a failed inquiry
            reason = OK if card.view == pb.CARD_VIEW_BALANCE else pb.CardView.Name(card.view)
        except grpc.RpcError as err:
            reason, length = _reason_of(err), 0
        self._report("balance inquiry", reason, started, length, counted=True)

    @task(10)
    def top_up(self) -> None:
        number, pin = self.rng.choice(CARDS)
        amount = self.rng.randrange(*TOP_UP_MINOR)
        reason = self._mutate("top-up", "top_up", self.terminal.top_up(
            str(uuid.uuid4()), number, amount, pin if self.top_up_pin else None))
        if reason == "REASON_PIN_REQUIRED":
            self.top_up_pin = True

    @task(3)
    def purchase_wrong_pin(self) -> None:
        if self._budget_full("purchase (wrong PIN)"):  # this try could be the one that locks us out
            return
        number, pin = self.rng.choice(WRONG_PIN_CARDS)
        wrong = pin
        while wrong == pin:
            wrong = f"{self.rng.randrange(10**6):06d}"
        self._mutate("purchase (wrong PIN)", "purchase",
                     self.terminal.purchase(str(uuid.uuid4()), number, wrong,
                                            self.rng.randrange(*PURCHASE_MINOR)),
                     expected=WRONG_PIN_EXPECTED)
