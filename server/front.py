"""Cluster: the front's writer (``cardcore serve --cluster``; docs/cluster.md, the front).

A front is the single server's gRPC process with two parts swapped: its writes go to the shard's
leader over NATS (the submit protocol of ``cardcore.server.replica``) instead of to a writer
process, and its reads come from a follower of the shard that the front runs as its own child
process (``cardcore replica --follow-only``, a folder of its own) instead of from the writer's
LMDB. Everything else (TLS, DUKPT, PIN blocks, card ids, budgets, the services) is the single
server's code, unchanged: ``ClusterWriter`` has the ``Writer``'s interface.

What the front adds is what a leader that dies in the middle of a request needs:

- "not the leader" (no leader yet, or one deposed before it stored the group): not applied, sent
  again with a growing pause;
- unanswered (the leader died, or NATS did not answer, after the request left): maybe applied,
  sent again, the same operations, to whichever replica leads next. An operation with a request
  key is applied at most once (the request records are in the log: a new leader has them), so
  the answer is the original one. A refusal of the re-send may only mean the try before was
  applied (a swipe's KSN, its terminal and its operator are checked before its request record):
  then the request's original outcome is read from the follower (which holds the group that
  refused it, hence any that applied it); none to be had: OUTCOME_UNKNOWN, never the refusal.

Each caller's deadline bounds its own tries, and submits reach the leader in the order they first
left, re-sends included (``_may_go``: a terminal's pipelined swipes stay in KSN order). Reads see what they must (``fresh``): a read of a
card waits until the follower holds the last group this front was answered for that touched it;
a read of everything (reports, GetOperation, the journal feed) waits until the follower holds the
shard's stream as it ends now (one NATS round trip), so it sees what any front was answered. A
front serves one shard (several: not built; docs/cluster.md).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Callable

from cardcore import layout as L
from cardcore.groups import deferrable, encode_group
from cardcore.ext.batchwire import mark_dirty
from cardcore.idempotency import PendingOp
from cardcore.jetlog import NatsThread, NatsTLS, SUBMIT_INBOX_PREFIX, stream_name, submit_subject
from cardcore.ledger import Ledger, Outcome

from .devcluster import ReplicaProcess
from .journal_signal import JournalSignal
from .metrics import Metrics
from .replica import (ANY_EPOCH, MALFORMED, NOT_LEADER, OVERLOADED, SUBMIT_OPS_MAX, UNKNOWN,
                      decode_reply_group, reply_epoch)
from .writer import (QUEUE_MAX_OPS_DEFAULT, Overloaded, Stale, Stopped, _answer, _Item,
                     _uniform, prune_dirty)  # (the writer's queue item, its answers)

log = logging.getLogger("cardcore.front")

SUBMIT_TIMEOUT_S = 2.0      # a submit's first wait for the leader's answer (then: outcome
                            # unknown, sent again: a leader killed -9 never answers what it had
                            # in hand); doubled at each unanswered try, up to:
SUBMIT_TIMEOUT_MAX_S = 8.0
SENDERS_MAX = 8             # submits in flight at once; requests arriving meanwhile go together
SUBMIT_LIMIT_S = 15.0       # a request with no deadline is tried this long (> a failover, ~3 s)
RETRY_PAUSE_S = (0.02, 0.5)  # the first and the longest pause between tries
FRESH_LIMIT_S = 10.0        # a read waits this long for the follower, then UNAVAILABLE (a NATS
                            # node's failover can hold a follower's reads for a 5 s timeout)
ADMIN_FRESH_LIMIT_S = 30.0  # an admin change's answer waits this long for it (then: unknown)
POLL_BUSY_S = 0.002         # the follower's applied group is read this often while reads wait
POLL_IDLE_S = 0.2           # ... and this often otherwise (the journal feed, admin changes)
RELOAD_EVERY_S = 0.5        # admin state (terminals, operators, program) re-read at most this often
FOLLOWER_CHECKPOINT_MS = 5  # the follower makes what it applied readable this often
FOLLOWER_START_S = 120.0    # a new follower replays the shard's stream before the front serves
RESEND_LOG_EVERY_S = 5.0    # "sending again" logged at most this often
FOLLOWER_RESTART_S = 1.0    # a follower that exited is started again after this pause


class FrontSetting(Exception):
    """The front cannot start with its settings (the message says which): exit 2."""


class FrontUnavailable(Exception):
    """NATS or the shard did not answer at start: exit 1, a supervisor starts it again."""


class _Unit:
    """An item's operations in one submit (a whole item, or a part of a large one)."""
    __slots__ = ("item", "ops", "limit", "tried", "maybe_applied", "outcomes")

    def __init__(self, item: _Item, ops: list[PendingOp]) -> None:
        self.item = item
        self.ops = ops
        self.limit = 0.0                # when its caller stops waiting (monotonic)
        self.tried = False              # sent at least once
        self.maybe_applied = False      # a try went unanswered: maybe applied
        self.outcomes: list[Outcome] | None = None


class _Turn:
    """A submit's place in the order submits first left in (``ClusterWriter._may_go``)."""
    __slots__ = ("order", "troubled", "in_flight", "waiting")

    def __init__(self, order: int) -> None:
        self.order = order
        self.troubled = False   # a try of it was not applied (or maybe not): it is sent again
        self.in_flight = False  # a try of it is out, unanswered
        self.waiting = False    # its next try waits for its turn


class ClusterWriter:
    """The ``Writer`` of a front: writes to the shard's leader, reads from the follower."""

    def __init__(self, data_dir: str, shard: int, nats_urls: list[str], loop:
                 asyncio.AbstractEventLoop, *, nats_tls: NatsTLS | None = None,
                 follower_args: tuple[str, ...] = (), metrics: Metrics | None = None,
                 queue_max_ops: int = QUEUE_MAX_OPS_DEFAULT,
                 submit_timeout_s: float = SUBMIT_TIMEOUT_S,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        """``follower_args``: the follower's extra ``cardcore replica`` arguments (its keyring,
        its NATS certificate: the follower role's, which may read the stream, never write it);
        ``on_fatal``: the follower cannot run (a setting: it exited 2)."""
        self.data_dir = data_dir
        self.shard = shard
        self.urls = nats_urls
        self.loop = loop
        self.metrics = metrics or Metrics()
        self.queue_max_ops = queue_max_ops
        self.journal_signal = JournalSignal()
        self.on_advance: Callable[[], None] | None = None  # admin state changed, maybe
        self._nats_tls = nats_tls
        self._follower_args = follower_args
        self.submit_timeout_s = submit_timeout_s
        self._on_fatal = on_fatal
        # groups answered for, by card and by request key, that the follower may not hold yet
        self._dirty_cards: dict[bytes, int] = {}
        self._dirty_keys: dict[bytes, int] = {}
        self._queued_ops = 0
        self._queue: collections.deque[_Item] = collections.deque()
        # submits not answered yet, by the order they first left in (ascending), and how many of
        # them are troubled: while none is, every submit goes at once (``_may_go``)
        self._turns: dict[int, _Turn] = {}
        self._orders = 0
        self._troubled = 0
        self._turns_waiting = 0
        self._turns_moved = asyncio.Event()
        self._senders = 0
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        # the epoch of the shard's leader as last heard (a submit goes to it alone, so that
        # none sent after a failover overtakes earlier ones the old leader never answered:
        # the new leader refuses it, saying its epoch, and it is sent again in its turn);
        # ANY_EPOCH until a leader said one
        self._epoch = ANY_EPOCH
        self._answered = 0         # the last group this front was answered for
        self._applied = 0          # the last group the follower's LMDB holds (as last read)
        self._advanced = asyncio.Event()
        self._wake = asyncio.Event()  # a read began to wait: the poller looks at once
        self._waiting = 0          # reads waiting for the follower
        self._reloaded_at = 0      # the applied group admin state was last re-read at
        self._reload_time = 0.0
        self.ledger: Ledger | None = None
        self.nt: NatsThread | None = None
        self.follower: ReplicaProcess | None = None
        self._poller: asyncio.Task | None = None
        self._restarting: asyncio.Task | None = None  # a follower being started again
        self.groups = 0            # submit requests answered (as the Writer's groups)
        self.ops_applied = 0
        self.resent = 0            # requests sent again after "not the leader" or "unknown"
        self.unknown = 0           # ... of them after "unknown"
        self.recovered = 0         # swipes applied before, answered from the follower
        self._resend_logged_at = -RESEND_LOG_EVERY_S

    @property
    def queued_ops(self) -> int:
        return self._queued_ops

    # ---- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Connect to NATS and start the follower; return once it has replayed the shard's
        stream (as it ended when it started) into its ledger. Raises FrontSetting (a setting to
        fix) or FrontUnavailable (NATS or the shard not there yet: start again later)."""
        from cardcore.jetlog import NatsRefused, NatsUnavailable

        try:
            self.nt = NatsThread(self.urls, f"cardcore-front-s{self.shard}-{os.getpid()}",
                                 self._nats_tls, SUBMIT_INBOX_PREFIX)
        except NatsRefused as exc:
            raise FrontSetting(str(exc)) from None
        except NatsUnavailable as exc:
            raise FrontUnavailable(str(exc)) from None
        try:
            self._start_follower(FOLLOWER_START_S)
        except BaseException:
            if self.follower is not None:
                self.follower.stop()
            self.nt.close()
            raise

    def _start_follower(self, timeout_s: float) -> None:
        """The follower, on its folder, caught up (FrontSetting if it exited 2: its log says
        why; FrontUnavailable if it exited otherwise or did not catch up in time)."""
        self.follower = ReplicaProcess(self.data_dir, self.shard, ",".join(self.urls),
                                       "--follow-only", "--checkpoint-ms",
                                       str(FOLLOWER_CHECKPOINT_MS), *self._follower_args)
        try:
            self.follower.wait_role("following", timeout_s, after=self.follower.first_role)
        except RuntimeError as exc:
            tail = str(exc)[-600:]
            if self.follower.proc.poll() == 2:
                raise FrontSetting(f"its follower cannot run: {tail}") from None
            raise FrontUnavailable(f"its follower did not catch up: {tail}") from None

    def attach(self, ledger: Ledger) -> None:
        """The server's reader of the follower's ledger (one per process: LMDB's rule)."""
        self.ledger = ledger
        self._applied = ledger.log_applied()
        self._reloaded_at = self._applied
        self.metrics.watch_front(lambda: max(0, self._answered - self._applied))
        self._poller = self.loop.create_task(self._poll())

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the requests in hand (within their limits), then stop the follower."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        if self._poller is not None:
            self._poller.cancel()
        if self._restarting is not None and not self._restarting.done():
            # not cancelled: its thread would start a follower nobody stops; it stops it itself
            await asyncio.wait([self._restarting], timeout=FOLLOWER_START_S + 5)
        if self.follower is not None:
            await self.loop.run_in_executor(None, self.follower.stop)
        if self.nt is not None:
            await self.loop.run_in_executor(None, self.nt.close)
        log.info("front s%d: %d requests sent again (%d after an unknown outcome), %d swipes "
                 "answered from the follower", self.shard, self.resent, self.unknown,
                 self.recovered)

    # ---- writes ----------------------------------------------------------------------------

    def submit(self, ops: list[PendingOp], deadline: float | None = None,
               on_answer: Callable[[list[PendingOp], list[Outcome]], None] | None = None
               ) -> asyncio.Future:
        """As ``Writer.submit``: the future gets the outcomes, ``on_answer`` runs with them even
        if the caller has gone. Overloaded when more than ``queue_max_ops`` are in hand.
        Requests that arrive while SENDERS_MAX submits are in flight go together in the next
        (up to SUBMIT_OPS_MAX operations): fewer NATS messages, as the writer's groups."""
        assert ops
        if self._stopping:
            raise Stopped()
        if self._queued_ops + len(ops) > self.queue_max_ops:
            raise Overloaded()
        self._queued_ops += len(ops)
        fut = self.loop.create_future()
        self._queue.append(_Item(ops, fut, deadline, on_answer))
        if self._senders < SENDERS_MAX:
            self._senders += 1
            task = self.loop.create_task(self._sender())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _sender(self) -> None:
        """Send what is queued, whole requests up to SUBMIT_OPS_MAX operations at a time (a
        larger one alone, in parts), until nothing is."""
        try:
            while self._queue:
                items = [self._queue.popleft()]
                n = len(items[0].ops)
                while self._queue and n + len(self._queue[0].ops) <= SUBMIT_OPS_MAX:
                    items.append(self._queue.popleft())
                    n += len(items[-1].ops)
                await self._run(items)
        finally:
            self._senders -= 1

    async def _run(self, items: list[_Item]) -> None:
        """Send ``items`` (one submit; an item of more than SUBMIT_OPS_MAX operations alone, in
        parts, in order) and answer each."""
        if len(items) == 1 and len(items[0].ops) > SUBMIT_OPS_MAX:
            ops = items[0].ops
            units = [_Unit(items[0], ops[k:k + SUBMIT_OPS_MAX])
                     for k in range(0, len(ops), SUBMIT_OPS_MAX)]
            runs = [[u] for u in units]  # one after another: a batch's order
        else:
            units = [_Unit(it, it.ops) for it in items]
            runs = [units]
        start = time.monotonic()  # (a large item's parts share its limit)
        for u in units:
            u.limit = u.item.deadline if u.item.deadline is not None else start + SUBMIT_LIMIT_S
        try:
            for run in runs:
                await self._send(run)
        except Exception:  # never leave a caller without an answer
            log.exception("front s%d: a submit failed", self.shard)
            for u in units:
                if u.outcomes is None:
                    u.outcomes = _uniform(L.R_OUTCOME_UNKNOWN, u.ops)
        for it in items:
            outcomes = [o for u in units if u.item is it for o in u.outcomes]
            self._queued_ops -= len(it.ops)
            self.ops_applied += len(it.ops)
            _answer(it, outcomes)

    async def _send(self, units: list[_Unit]) -> None:
        """Each unit's outcomes, from the shard's leader, sent again through a failover while
        its caller's deadline lasts (none: SUBMIT_LIMIT_S). Not the leader, or the leader's queue
        full: not applied, sent again after a pause. No answer in time (the wait doubles each
        time from ``submit_timeout_s``): maybe applied, sent again, the same operations (the
        request records answer it once; ``_resolved``). A unit out of time leaves the submit:
        never applied if every try of it was refused (DEADLINE_EXCEEDED, or UNAVAILABLE once
        tried), else OUTCOME_UNKNOWN (its caller asks GetOperation)."""
        self._orders += 1
        turn = self._turns[self._orders] = _Turn(self._orders)
        try:
            await self._send_in_turn(units, turn)
        finally:
            del self._turns[turn.order]
            self._troubled -= turn.troubled  # (a unit out of time after a failed try)
            self._moved()

    def _may_go(self, turn: _Turn) -> bool:
        """Whether a try of ``turn``'s submit may leave now. The leader applies submits in
        the order they reach it, and a terminal's swipes must be applied in the order of their
        KSNs (a later one first makes the earlier KSN_REPLAYED). Tries on one connection
        arrive in order; what can reorder them is a try that fails (no leader, no answer, a full
        queue) and is sent again after later ones went. So once a submit is troubled, later
        submits wait for it: a first try while an earlier submit is troubled or waits for its
        own turn, a try again while an earlier one is troubled, waits or is out, until the
        leader answers it. Without a failure nothing waits. What no front can undo: a later
        try already on its way when an earlier one fails, and taken (the earlier one refused
        for a full queue, or by no leader or a deposed one, the later one reaching the next
        leader): the earlier one is then answered KSN_REPLAYED, a decline, and swiped again."""
        if not self._troubled and not self._turns_waiting:
            return True
        for order, other in self._turns.items():
            if order >= turn.order:
                return True
            if other.troubled or other.waiting or (turn.troubled and other.in_flight):
                return False
        return True

    def _moved(self) -> None:
        """A turn changed: whoever waits for theirs looks again."""
        if self._turns_waiting:
            self._turns_moved.set()
            self._turns_moved = asyncio.Event()

    async def _in_turn(self, turn: _Turn, until: float) -> bool:
        """Wait until ``turn`` may go (True: its caller sends before it awaits anything, so
        turns woken together leave one by one in order) or the monotonic time ``until``."""
        if self._may_go(turn):
            return True
        turn.waiting = True
        self._turns_waiting += 1
        try:
            while not self._may_go(turn):
                left = until - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._turns_moved.wait(), left)
                except asyncio.TimeoutError:
                    return False
            return True
        finally:
            turn.waiting = False
            self._turns_waiting -= 1
            self._moved()

    async def _send_in_turn(self, units: list[_Unit], turn: _Turn) -> None:
        import nats.errors

        pause, wait_s = RETRY_PAUSE_S[0], self.submit_timeout_s
        while True:
            now = time.monotonic()
            for u in units:
                if u.limit <= now:
                    u.outcomes = _uniform(L.R_OUTCOME_UNKNOWN if u.maybe_applied else
                                          L.R_UNAVAILABLE if u.tried else L.R_DEADLINE_EXCEEDED,
                                          u.ops)
            units = [u for u in units if u.outcomes is None]
            if not units:
                return
            if not await self._in_turn(turn, min(u.limit for u in units)):
                continue  # (a unit is out of time now)
            now = time.monotonic()
            ops = [op for u in units for op in u.ops]
            left = max(u.limit for u in units) - now
            for u in units:
                u.tried = True
            turn.in_flight = True
            asked, fenced = self._epoch, False
            try:
                msg = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                    self.nt.nc.request(submit_subject(self.shard), encode_group(ops, asked),
                                       timeout=min(left, wait_s)), self.nt.loop))
                got = decode_reply_group(msg.data)
                said = reply_epoch(msg.data)
                self._epoch = max(self._epoch, said)  # (never back: a deposed leader's is older)
                fenced = got == NOT_LEADER and asked > 0 and said > asked
                if got == NOT_LEADER and not fenced:
                    # a refusal by one replica while another may lead and have taken it too
                    # (every subscriber hears a request; the first answer is the one read):
                    # its refusals of a try again are looked up (``_resolved``). Only a newer
                    # leader's refusal of an older epoch's request says nobody applied it (the
                    # older leader's append is fenced by the newer one's barrier).
                    for u in units:
                        u.maybe_applied = True
            except nats.errors.NoRespondersError:
                got = NOT_LEADER  # nobody took it: not applied
            except (TimeoutError, asyncio.TimeoutError, nats.errors.Error):
                got = UNKNOWN
            finally:
                turn.in_flight = False
            troubled = isinstance(got, bytes) and got != MALFORMED  # (sent again below)
            if troubled != turn.troubled:  # answered: later submits need not wait for what it
                turn.troubled = troubled   # still does (its follower reads, an admin change's)
                self._troubled += 1 if troubled else -1
            self._moved()
            if not isinstance(got, bytes):
                outcomes, group = got
                self.groups += 1
                self.metrics.group_ops.observe(len(ops))
                self.metrics.group_seconds.observe(time.monotonic() - now)
                if group:
                    self._answered = max(self._answered, group)
                    self._mark_dirty(units, outcomes, group)
                k, got_units = 0, []
                for u in units:  # (each unit's answer set only once it is final)
                    mine = outcomes[k:k + len(u.ops)]
                    k += len(u.ops)
                    if u.maybe_applied:
                        mine = await self._resolved(u.ops, mine, group, u.limit)
                    got_units.append(mine)
                if group and not all(deferrable(op) for op in ops):
                    # an admin change: answered once it is readable here (as the single server
                    # checkpoints it first), so the caller's next read, and Access, see it
                    try:
                        await self._wait_applied(group, ADMIN_FRESH_LIMIT_S)
                        self._reload()
                    except Stale:  # applied, but not seen here: the caller asks again
                        log.warning("front s%d: group %d not in the follower's ledger after "
                                    "%d s", self.shard, group, ADMIN_FRESH_LIMIT_S)
                        got_units = [_uniform(L.R_OUTCOME_UNKNOWN, u.ops) for u in units]
                for u, mine in zip(units, got_units):
                    u.outcomes = mine
                return
            if got == MALFORMED:  # a bug of ours, not a moment of the cluster
                log.error("front s%d: the leader called a request malformed", self.shard)
                for u in units:
                    u.outcomes = _uniform(L.R_INTERNAL, u.ops)
                return
            assert got in (NOT_LEADER, UNKNOWN, OVERLOADED), got
            self.resent += 1
            self.metrics.front_resent.labels("unknown" if got == UNKNOWN else "not_leader").inc()
            if time.monotonic() - self._resend_logged_at >= RESEND_LOG_EVERY_S:
                self._resend_logged_at = time.monotonic()  # (a failover: once every 5 s)
                log.warning("front s%d: the shard's leader %s: sending again (%d re-sends so "
                            "far)", self.shard, "did not answer" if got == UNKNOWN else
                            "is not there (not the leader, or its queue full)", self.resent)
            if got == UNKNOWN:
                self.unknown += 1
                wait_s = min(wait_s * 2, SUBMIT_TIMEOUT_MAX_S)
                for u in units:
                    u.maybe_applied = True
            if fenced:  # a live leader of a newer epoch refused it: to it, in turn, at once
                pause = RETRY_PAUSE_S[0]
                continue
            soonest = min(u.limit for u in units) - time.monotonic()
            await asyncio.sleep(max(0.0, min(pause, soonest)))
            pause = min(pause * 2, RETRY_PAUSE_S[1])

    async def _resolved(self, ops: list[PendingOp], outcomes: list[Outcome], group: int,
                        limit: float) -> list[Outcome]:
        """The answers of ops sent again after an unknown outcome. Applied, or a replay of a
        request applied before: as the leader said (a replay of the caller's own earlier try
        says ``replayed``, as a retry of its own would). Refused: maybe only because the try
        before was applied (a swipe's KSN is checked before its request record, and so are the
        terminal and the operator): the request's original outcome, read from the follower
        (which then holds the group that refused it, so any that applied it), if it has one.
        No request key to look it up by (a balance inquiry): OUTCOME_UNKNOWN."""
        out = []
        for op, outcome in zip(ops, outcomes, strict=True):
            if outcome.reason != L.R_OK and not outcome.replayed:
                try:
                    if not op.request_key:
                        raise Stale()  # nothing to look it up by
                    # (as long as its caller waits: an answer beats OUTCOME_UNKNOWN)
                    await self._wait_applied(group, max(FRESH_LIMIT_S, limit - time.monotonic()))
                    original = self.ledger.read_operation(op.request_key)
                except Exception:  # (Stale: the follower behind) never a refusal then
                    outcome = _uniform(L.R_OUTCOME_UNKNOWN, [op])[0]
                else:
                    if original is not None:
                        outcome = original
                        self.recovered += 1
                        self.metrics.front_recovered.inc()
            out.append(outcome)
        return out

    # ---- reads -----------------------------------------------------------------------------

    async def fresh(self, card_ids: tuple[bytes, ...] = (), keys: tuple[bytes, ...] = (),
                    everything: bool = False) -> None:
        """As ``Writer.fresh``: return once the follower's ledger holds what the read must see.
        Cards: the last group this front was answered for that touched them. Everything, or a
        request (GetOperation: asked after a timeout, maybe through another front): the shard's
        stream as it ends now."""
        if everything or keys:
            need = max(self._answered, await self._stream_end())
        else:
            dirty = self._dirty_cards
            need = max([dirty.get(c, 0) for c in card_ids], default=0)
        await self._wait_applied(need)

    async def _stream_end(self) -> int:
        import nats.errors

        try:
            info = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self.nt.js.stream_info(stream_name(self.shard)), self.nt.loop))
        except (TimeoutError, asyncio.TimeoutError, nats.errors.Error) as exc:
            raise Stale() from exc
        return info.state.last_seq

    def _mark_dirty(self, units: list[_Unit], outcomes: list[Outcome], group: int) -> None:
        """The cards and requests of an answered group, as the writer marks them
        (``batchwire.mark_dirty``), but never lowered: a deposed leader's answer may come after
        a newer group's."""
        cards: dict[bytes, int] = {}
        keys: dict[bytes, int] = {}
        mark_dirty(cards, keys, units, outcomes, group, L.R_STORAGE_UNAVAILABLE)
        for marked, dirty in ((cards, self._dirty_cards), (keys, self._dirty_keys)):
            for key in marked:
                if dirty.get(key, 0) < group:
                    dirty[key] = group

    async def _wait_applied(self, need: int, limit_s: float = FRESH_LIMIT_S) -> None:
        if need <= self._applied:
            return
        self._waiting += 1
        self._wake.set()
        try:
            limit = time.monotonic() + limit_s
            while self._applied < need:
                left = limit - time.monotonic()
                if left <= 0:
                    raise Stale()
                self._advanced.clear()
                try:
                    await asyncio.wait_for(self._advanced.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting -= 1

    async def _poll(self) -> None:
        """Read the follower's applied group (often while reads wait); wake the reads, the
        journal feed and the admin state's re-read; start the follower again if it exited."""
        while True:
            if self._waiting:
                await asyncio.sleep(POLL_BUSY_S)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_IDLE_S)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            try:  # (nothing here may end the poller: every read would wait for it)
                self._poll_once()
                if (self.follower.proc.poll() is not None and not self._stopping
                        and (self._restarting is None or self._restarting.done())):
                    # beside the polling: the new follower's progress is read as it comes
                    self._restarting = self.loop.create_task(self._restart_follower())
            except asyncio.CancelledError:
                raise
            except Exception:  # (a map the follower grew is adopted by the next read)
                log.exception("front s%d: the follower's ledger could not be read", self.shard)

    def _poll_once(self) -> None:
        applied = self.ledger.log_applied()
        if applied > self._applied:
            self._applied = applied
            self._advanced.set()
            self.journal_signal.notify()
            prune_dirty((self._dirty_cards, self._dirty_keys), applied, self._answered)
        if (self._reloaded_at < self._applied
                and time.monotonic() - self._reload_time >= RELOAD_EVERY_S):
            self._reload()  # (also a change that came within RELOAD_EVERY_S of the last)

    def _reload(self) -> None:
        """Admin state (terminals, operators, the program) as the follower holds it now: changes
        made through another front reach this one within RELOAD_EVERY_S."""
        if self._reloaded_at == self._applied or self.on_advance is None:
            return
        self._reloaded_at, self._reload_time = self._applied, time.monotonic()
        try:
            self.on_advance()
        except Exception:
            log.exception("front s%d: admin state could not be re-read", self.shard)

    async def _restart_follower(self) -> None:
        rc = self.follower.proc.returncode
        self.follower.stop()  # (closes its log file)
        if rc == 2:  # a setting (its keyring, certificate, a purged stream): no restart helps
            why = f"the follower exited 2 (a setting: its log {self.follower.log_path})"
            log.critical("front s%d: %s", self.shard, why)
            if self._on_fatal is not None:
                self._on_fatal(why)
            self._stopping = True
            return
        log.error("front s%d: the follower exited %s (its log: %s); starting it again",
                  self.shard, rc, self.follower.log_path)
        self.metrics.front_follower_restarts.inc()
        await asyncio.sleep(FOLLOWER_RESTART_S)
        if self._stopping:
            return
        try:
            await self.loop.run_in_executor(None, self._start_follower, FOLLOWER_START_S)
        except (FrontSetting, FrontUnavailable) as exc:  # (the poller tries again)
            log.error("front s%d: the follower did not start: %s", self.shard, exc)
        except Exception:
            log.exception("front s%d: the follower could not be started", self.shard)
        if self._stopping:  # stop() came meanwhile: it stopped the follower it saw, not this
            self.follower.stop()
