"""Locust fleet of POS terminals: each locust user is one enrolled terminal swiping member cards.

Run it through ``bench/load.py`` (``make load``), which starts a server, enrolls the terminals,
seeds the cards and hands this file the population in ``CARDCORE_LOAD_POPULATION``.

Every user builds its requests with the terminal library (``cardcore.terminal``, the same
code as ``cardcore pos``): a fresh DUKPT KSN per transaction, the card number encrypted under
the data key, PIN blocks under the PIN key. A ``Terminal`` object belongs to one user at a
time, so no KSN counter is ever used twice.

The default mix, by task weight (``CARDCORE_LOAD_MIX`` from ``load.py --mix`` replaces it; new
operation types join here and in ``bench/loadkit.py`` OPERATIONS as they are built):

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
one SwipeStream open and sends one Operation per task, reading its reply before the next; with
``CARDCORE_LOAD_PIPELINE`` N > 1, up to N in flight, replies matched by request_id).

``CARDCORE_LOAD_SHAPE`` (JSON) picks a load shape (``Shape`` below, a LoadTestShape over
``loadkit``'s schedules); ``CARDCORE_LOAD_WORKERS`` (locust ``--processes``) splits the terminals
between the worker processes; ``CARDCORE_LOAD_TLS_CA`` and ``_TLS_CERT_DIR``: mutual TLS, each
terminal with its own certificate.

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
import gevent.event
import gevent.lock
import gevent.queue
import grpc
import grpc.experimental.gevent as grpc_gevent
import loadkit  # bench/loadkit.py: the mix, the shapes' schedules, the certificate names
from grpc_status import rpc_status
from locust import LoadTestShape, User, constant, events
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
# The mix by loadkit names (bench/load.py --mix); the task weights below are the default mix.
MIX = json.loads(os.environ["CARDCORE_LOAD_MIX"]) if os.environ.get("CARDCORE_LOAD_MIX") \
    else dict(loadkit.DEFAULT_MIX)
PIPELINE = int(os.environ.get("CARDCORE_LOAD_PIPELINE", "1"))  # stream: requests in flight
TLS_CA = os.environ.get("CARDCORE_LOAD_TLS_CA")                # PEM of the server's CA, or plaintext
TLS_CERT_DIR = os.environ.get("CARDCORE_LOAD_TLS_CERT_DIR")    # terminal-<id>.pem/.key
WORKERS = int(os.environ.get("CARDCORE_LOAD_WORKERS", "1"))    # processes sharing the terminals
# KSN counters one run may use per terminal (load.py COUNTER_BLOCK): a reused population's next
# run starts this far on, so a terminal that would pass it stops instead of risking a replay.
COUNTER_BLOCK = int(os.environ.get("CARDCORE_LOAD_COUNTER_BLOCK", str(1 << 22)))


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
_ALL_TERMINALS = [
    Terminal(TerminalKeys(t["terminal_id"], t["store_id"], bytes.fromhex(t["initial_key"]),
                          bytes.fromhex(t["initial_key_id"]), t["counter"]))
    for t in POPULATION["terminals"]]
_FREE_TERMINALS: collections.deque | None = None  # this process's share, taken at the first start


def _free_terminals(worker_index: int) -> collections.deque:
    """This process's terminals: with --workers N each worker process takes every N-th one (by
    its locust worker index), so no two processes ever use one terminal's KSN counters. Locust's
    master hands users out round-robin, so the shares match the users each worker gets."""
    global _FREE_TERMINALS
    if _FREE_TERMINALS is None:
        index = max(worker_index, 0)
        _FREE_TERMINALS = collections.deque(
            t for i, t in enumerate(_ALL_TERMINALS) if WORKERS <= 1 or i % WORKERS == index)
    return _FREE_TERMINALS


# ---- what the users saw (beside locust's own statistics) ----------------------------------

_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_latencies_ms: dict[str, list[float]] = collections.defaultdict(list)
_skipped = collections.Counter()
_pipeline = {"sent": 0, "matched": 0, "unmatched": 0, "max_in_flight": 0}


@events.test_start.add_listener
def _reset(**_kw) -> None:
    _outcomes.clear()
    _latencies_ms.clear()
    _skipped.clear()
    _pipeline.update(sent=0, matched=0, unmatched=0, max_in_flight=0)


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
    """``<CARDCORE_LOAD_OUTCOMES>-<pid>.json``: one file per process that ran users (with
    --workers, bench/load.py adds them up); a master without users writes none."""
    prefix = os.environ.get("CARDCORE_LOAD_OUTCOMES")
    if not prefix or not _outcomes:
        return
    path = f"{prefix}-{os.getpid()}.json"
    doc = {"mode": MODE, "failures_per_minute": FAILURES_PER_MINUTE, "skipped": dict(_skipped),
           "pipeline": dict(_pipeline, depth=PIPELINE), "operations": {}}
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


class _Pipeline:
    """One terminal's SwipeStream with up to ``depth`` Operations in flight: a reader greenlet
    matches each reply to its request by request_id (the server answers in order, but matching
    by id is what proves it) and reports it; ``send`` waits while ``depth`` are unanswered."""

    _END = object()

    def __init__(self, stub: pb_grpc.CardServiceStub, depth: int, user: "PosTerminal"):
        self._out: gevent.queue.Queue = gevent.queue.Queue()
        self._slots = gevent.lock.BoundedSemaphore(depth)
        self._pending: dict[str, tuple] = {}  # request_id -> (name, started, expected)
        self._user = user
        self._idle = gevent.event.Event()  # set while nothing is in flight
        self._idle.set()
        self.broken = False
        self._call = stub.SwipeStream(iter(self._out.get, self._END))
        self._reader = gevent.spawn(self._read)

    def send(self, request_id: str, name: str, op: pb.Operation, expected: frozenset) -> None:
        self._slots.acquire()
        if self.broken:
            self._slots.release()
            raise grpc.RpcError("the stream broke")
        self._pending[request_id] = (name, time.perf_counter(), expected)
        self._idle.clear()
        _pipeline["sent"] += 1
        _pipeline["max_in_flight"] = max(_pipeline["max_in_flight"], len(self._pending))
        self._out.put(op)

    def _read(self) -> None:
        reason = "STREAM_ENDED"
        try:
            for result in self._call:
                entry = self._pending.pop(result.request_id, None)
                if entry is None:  # a reply to nothing we sent: count it, fail the run
                    _pipeline["unmatched"] += 1
                    self._user._report("unmatched reply", "UNMATCHED_REPLY", time.perf_counter(), 0)
                    continue
                _pipeline["matched"] += 1
                name, started, expected = entry
                reason = R.Name(result.reason)
                if name == "top-up" and reason == "REASON_PIN_REQUIRED":
                    self._user.top_up_pin = True
                self._user._report(name, reason, started, result.ByteSize(), expected)
                self._slots.release()
                if not self._pending:
                    self._idle.set()
            reason = "STREAM_ENDED"
        except grpc.RpcError as err:
            reason = f"STREAM_{err.code().name if err.code() else 'UNKNOWN'}"
        finally:
            self.broken = True
            for name, started, expected in self._pending.values():  # never answered
                self._user._report(name, reason, started, 0, expected)
                self._slots.release()
            self._pending.clear()
            self._idle.set()

    def drain(self) -> None:
        """Wait until every swipe in flight is answered: a unary call of this terminal (a
        balance inquiry) takes the next KSN counter, and the server refuses a counter lower than
        one it has seen (REASON_KSN_REPLAYED), so it must not overtake the stream."""
        self._idle.wait(timeout=STREAM_CLOSE_S)

    def close(self) -> None:
        self._out.put(self._END)  # done writing: the server answers what is in flight, then ends
        try:
            self._reader.join(timeout=STREAM_CLOSE_S)
        finally:
            self._call.cancel()
            self._reader.kill()


class PosTerminal(User):
    """One POS terminal: its own keys, its own channel (and connection), its own stream."""

    wait_time = constant(0)  # closed loop: the next swipe as soon as the last one is answered

    def on_start(self) -> None:
        free = _free_terminals(getattr(self.environment.runner, "worker_index", 0))
        if not free:
            # More users than enrolled terminals (the web UI can ask for more): sharing a
            # terminal would reuse KSN counters, so this user does not start.
            raise StopUser()
        self.terminal = free.popleft()
        self.counter_end = self.terminal.keys.counter + COUNTER_BLOCK - 2 * max(PIPELINE, 1)
        # A local subchannel pool: each terminal gets its own connection, as real ones do.
        options = [("grpc.use_local_subchannel_pool", 1)]
        if TLS_CA:  # mutual TLS: this terminal's own certificate (the server matches its id)
            cert_path, key_path = loadkit.terminal_cert_files(TLS_CERT_DIR, self.terminal.keys.terminal_id)
            with open(TLS_CA, "rb") as ca, open(cert_path, "rb") as c, open(key_path, "rb") as k:
                creds = grpc.ssl_channel_credentials(ca.read(), k.read(), c.read())
            self.channel = grpc.secure_channel(self.host, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.host, options=options)
        self.stub = pb_grpc.CardServiceStub(self.channel)
        self.swipes: _Swipes | _Pipeline | None = None
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
        _free_terminals(0).append(terminal)  # its counter has moved on: safe for the next user
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

    def _counters_left(self) -> None:
        """Stop this user before its terminal passes the run's block of KSN counters."""
        if self.terminal.keys.counter >= self.counter_end:
            _skipped["terminal out of this run's KSN counters"] += 1
            raise StopUser()

    def _mutate(self, name: str, kind: str, request, expected: frozenset = frozenset({OK})) -> str:
        """One mutating operation, unary or on this terminal's stream; reported; its reason."""
        started = time.perf_counter()
        length = 0
        if MODE == "stream" and PIPELINE > 1:  # reported by the pipeline's reader when answered
            request_id = request.request_id
            try:
                if self.swipes is None or self.swipes.broken:
                    self.swipes = _Pipeline(self.stub, PIPELINE, self)
                self.swipes.send(request_id, name, pb.Operation(**{kind: request}), expected)
                return "PENDING"
            except grpc.RpcError:
                self.swipes = None
                reason = "STREAM_BROKEN"
        elif MODE == "stream":
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

    def purchase(self) -> None:
        self._counters_left()
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

    def balance_inquiry(self) -> None:
        self._counters_left()
        if self._budget_full("balance inquiry"):  # every inquiry counts against the budget
            return
        number, pin = self.rng.choice(CARDS)
        if isinstance(self.swipes, _Pipeline):
            self.swipes.drain()  # its KSN counter must not overtake the swipes in flight
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

    def top_up(self) -> None:
        self._counters_left()
        number, pin = self.rng.choice(CARDS)
        amount = self.rng.randrange(*TOP_UP_MINOR)
        reason = self._mutate("top-up", "top_up", self.terminal.top_up(
            str(uuid.uuid4()), number, amount, pin if self.top_up_pin else None))
        if reason == "REASON_PIN_REQUIRED":
            self.top_up_pin = True

    def purchase_wrong_pin(self) -> None:
        self._counters_left()
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


# The mix: locust picks a task per turn from this list, each listed as often as its weight.
PosTerminal.tasks = [getattr(PosTerminal, loadkit.OPERATIONS[name][0])
                     for name, weight in MIX.items() for _ in range(weight)]


# ---- load shapes (bench/load.py --shape): locust uses a LoadTestShape class when one exists ----

SCHEDULE = loadkit.shape_from_env(os.environ)
SHAPE_REPORT = os.environ.get("CARDCORE_LOAD_SHAPE_REPORT")

if SCHEDULE is not None:
    class Shape(LoadTestShape):
        """Users over time from the chosen schedule. For the step ramp, each step's rate and p99
        come from locust's aggregate statistics (the master's, with --workers): the difference
        of its response-time histogram between the step's start and end."""

        _step = -1
        _mark: tuple = (0, {}, 0.0)  # (requests, histogram copy, time) at the step's start

        def _close_step(self, now: float) -> None:
            total = self.runner.stats.total
            requests0, hist0, t0 = self._mark
            hist = {ms: n - hist0.get(ms, 0) for ms, n in total.response_times.items()}
            hist = {ms: n for ms, n in hist.items() if n > 0}
            done = total.num_requests - requests0
            SCHEDULE.record(SCHEDULE.users_of(self._step), done / max(now - t0, 1e-6),
                            loadkit.percentile_of_counts(hist, 0.99))
            if SHAPE_REPORT:
                tmp = SHAPE_REPORT + ".new"
                with open(tmp, "w") as f:
                    json.dump(SCHEDULE.report(), f, indent=2)
                os.replace(tmp, SHAPE_REPORT)

        def tick(self):
            t = self.get_run_time()
            if isinstance(SCHEDULE, loadkit.StepRamp):
                step = int(t // SCHEDULE.step_s)
                if step != self._step:
                    if self._step >= 0:
                        self._close_step(t)
                    total = self.runner.stats.total
                    self._step = step
                    self._mark = (total.num_requests, dict(total.response_times), t)
            return SCHEDULE.tick(t)
