"""The single writer: queued mutations applied in groups (group commit), in a process of its own.

Why a process: py-lmdb releases the GIL around every key it reads or writes,
and a thread that wants the GIL back waits for a busy event loop to yield
(up to the 5 ms switch interval). A writer thread beside a gRPC event loop
was starved that way (a 2,000-key group took seconds). The writer process
holds the only write transaction and uses the second core; the gRPC process
validates and packs operations, reads with its own read transactions and
never waits for the writer.

Flow: handlers call ``Writer.submit`` on the event loop. While fewer than
``groups_in_flight`` groups are in flight, queued items are sent at once as
one group (up to ``group_max_ops``, after waiting at most ``group_wait_us``
for more); otherwise new items queue and form the next group. One in flight
(the default) lets operations pile up while a group commits, so groups are
larger and each fsync serves more callers; two let the writer start the next
group while this process answers the last (the halves work in parallel, in
smaller groups). On this 2-core machine one was better for unary and stream
calls and equal for batches. The writer process applies a group in the LMDB
write transaction that spans groups until a checkpoint, appends it to the group
log (one fdatasync) and sends back one outcome per operation; then every caller
of the group is answered (``cardcore.durable``: the log, checkpoints, recovery).
Reads in this process see LMDB as of the last checkpoint, so ``fresh`` asks for a
checkpoint before a read of a card or request answered since. The queue is bounded
in operations: full -> ``Overloaded`` at once. An item whose deadline passed
before its group was sent is not applied. If an invariant breaks, the writer
aborts the transaction and says so: every waiting caller gets REASON_INTERNAL
(not applied). If the writer process dies, the groups it held may or may not
have been committed: their callers get REASON_OUTCOME_UNKNOWN (ask
GetOperation, or retry with the same request_id); queued items never sent get
REASON_INTERNAL. Either way the server stops.

Wire format over a Unix socketpair, each message framed as ``length:u32 | bytes``.
This process's end is non-blocking (add_reader/add_writer), so neither side
can wait on the other with both send buffers full::

    ready   = b"READY"
    group   = cardcore.groups (ts_us, then the operations; none: a checkpoint request)
    answer  = b"A" | covered:u64 | n:u32 | n x (reason:u16 | replayed:u8 | op:u8
              | available_minor:i64 | count:u32 | entry head:224 B) | the lines of each outcome that has some, in order
              (the journal entry's first 224 bytes, all a reply shows; all zeros when there is
              none; an outcome has lines when it applied and its entry's line_count says so;
              covered: of the groups sent on this connection, the last the latest checkpoint
              holds, counting from 1, empty groups too)
    checkpointed = b"C" | covered:u64   (a checkpoint due by time or size, made after an answer
              or while waiting: no caller waits for it)
    failure = b"FATAL:" + exception class name

Housekeeping: the writer process clears stale LMDB reader slots every
``reader_check_s`` while it waits for groups; this process sends a
maintenance operation (a prune step of expired request records) when the
writer has been idle for ``MAINTENANCE_IDLE_S``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Callable

from cardcore import layout as L
from cardcore.durable import CHECKPOINT_MS_DEFAULT, CHECKPOINT_OPS_DEFAULT
from cardcore.ext import batchwire
from cardcore.grouplog import SEGMENT_BYTES_DEFAULT
from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT
from cardcore.ledger import MAP_SIZE_INITIAL, Outcome, PendingOp

from .journal_signal import JournalSignal
from .metrics import Metrics
# the writer process's side, and the wire both sides speak
from .writer_proc import (ANSWERED, CHECKPOINTED, COVERED, ENTRY, FATAL, FRAME, READY, _uniform,
                          recv_frame, send_frame)

log = logging.getLogger("cardcore.writer")

GROUP_MAX_OPS_DEFAULT = 10_000
GROUP_WAIT_US_DEFAULT = 0
QUEUE_MAX_OPS_DEFAULT = 100_000
GROUPS_IN_FLIGHT_MAX = 2
GROUPS_IN_FLIGHT_DEFAULT = 1   # measured: fewer, larger groups cost less fsync CPU per operation
WRITER_START_TIMEOUT_S = 60.0
READER_CHECK_S_DEFAULT = 60.0   # stale LMDB reader slots (a reader killed -9) cleared this often
MAINTENANCE_IDLE_S = 1.0        # an idle writer gets a prune step this often

RECV_CHUNK_BYTES = 1 << 20
DIRTY_PRUNE_AT = 4096   # entries of a dirty map past which a checkpoint prunes it (else clears)


class Overloaded(Exception):
    pass


class Stopped(Exception):
    pass


class Stale(Exception):
    """A read cannot see what was answered: LMDB cannot be checkpointed (a full disk)."""


class _Item:
    __slots__ = ("ops", "future", "deadline", "on_answer", "housekeeping")
    # an item of no operations is a checkpoint request: a group of its own

    def __init__(self, ops: list[PendingOp], future: asyncio.Future, deadline: float | None,
                 on_answer: Callable[[list[PendingOp], list[Outcome]], None] | None,
                 housekeeping: bool = False):
        self.ops = ops
        self.future = future
        self.deadline = deadline
        self.on_answer = on_answer
        self.housekeeping = housekeeping  # the writer's own: a group alone, not in the metrics


class Writer:
    """The gRPC process's half: a bounded queue of items, one group in flight to the writer process."""

    def __init__(self, ledger_path: str, initial_program: str | None,
                 loop: asyncio.AbstractEventLoop,
                 *, sync: bool = True, group_max_ops: int = GROUP_MAX_OPS_DEFAULT,
                 group_wait_us: int = GROUP_WAIT_US_DEFAULT,
                 queue_max_ops: int = QUEUE_MAX_OPS_DEFAULT,
                 groups_in_flight: int = GROUPS_IN_FLIGHT_DEFAULT,
                 map_size: int = MAP_SIZE_INITIAL,
                 request_window_s: int = REQUEST_WINDOW_S_DEFAULT,
                 reader_check_s: float = READER_CHECK_S_DEFAULT,
                 metrics: Metrics | None = None,
                 log_level: str = "INFO", log_format: str = "text",
                 on_fatal: Callable[[str], None] | None = None,
                 lookup_key: bytes | None = None, profile_key: bytes | None = None,
                 checkpoint_ms: int = CHECKPOINT_MS_DEFAULT,
                 checkpoint_ops: int = CHECKPOINT_OPS_DEFAULT,
                 log_segment_bytes: int = SEGMENT_BYTES_DEFAULT,
                 day_totals: bool = True, member_metrics: bool = True) -> None:
        """``lookup_key``: the member index's (rule 17), for the writer process to keep it;
        ``profile_key``: the stored profiles' (``cardcore.profiles``), to read them for it;
        the checkpoint and log settings: ``cardcore.durable``; ``day_totals`` False: the writer
        keeps no day totals (their cost's benchmark only); ``member_metrics`` likewise."""
        assert group_max_ops >= 1 and queue_max_ops >= 1 and group_wait_us >= 0
        assert 1 <= groups_in_flight <= GROUPS_IN_FLIGHT_MAX
        self.groups_in_flight = groups_in_flight
        self.metrics = metrics or Metrics()
        self.loop = loop
        self.group_max_ops = group_max_ops
        self.group_wait_s = group_wait_us / 1e6
        self.queue_max_ops = queue_max_ops
        self._on_fatal = on_fatal
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_ops = 0
        # groups sent and not yet answered: (items, perf_counter when sent)
        self._in_flight: collections.deque[tuple[list[_Item], float]] = collections.deque()
        self._wait_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._dead: str | None = None
        self._drained = asyncio.Event()
        # a new interpreter (never a fork of a process that runs gRPC), importing only the
        # writer's side (writer_proc); its arguments go over the socket, not in its argv
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._child_args = pickle.dumps((ledger_path, initial_program, sync, map_size,
                                         request_window_s, reader_check_s, log_level, log_format,
                                         lookup_key, profile_key, checkpoint_ms, checkpoint_ops,
                                         log_segment_bytes, day_totals, member_metrics))
        self._proc: subprocess.Popen | None = None
        self._child_sock = child
        self._out = bytearray()    # framed bytes not yet accepted by the socket
        self._in = bytearray()     # bytes received, not yet a whole frame
        self._writing = False
        self._last_sent = time.monotonic()
        self._tick_handle: asyncio.TimerHandle | None = None
        self.groups = 0
        self.ops_applied = 0
        # Reads that must see what was answered (cardcore.durable): groups are numbered as sent
        # (the writer counts them alike); the cards and requests of groups answered after the
        # latest checkpoint, with their group's number; a pending checkpoint request.
        self._sent_groups = 0
        self._answered_groups = 0
        self._covered = 0
        self._dirty_cards: dict[bytes, int] = {}
        self._dirty_keys: dict[bytes, int] = {}
        self._barrier: asyncio.Future | None = None
        self.checkpoint_requests = 0
        self.journal_signal = JournalSignal()  # the journal feed's streams wait on it

    @property
    def queued_ops(self) -> int:
        return self._queued_ops

    def start(self) -> None:
        """Start the writer process and wait until it has opened the ledger."""
        fd = self._child_sock.fileno()
        # this interpreter's flags (-X faulthandler, -W error...: what multiprocessing passes
        # its children too); -P: not the working folder first on its path (a file there could
        # stand in for a module of the process that gets the keys); only the socket's
        # descriptor is passed
        flags = [f for f in subprocess._args_from_interpreter_flags()
                 if f != "-P" and not f.startswith("-O")]  # (its asserts guard the ledger)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}  # (as -O)
        self._proc = subprocess.Popen([sys.executable, *flags, "-P", "-c", ENTRY, str(fd)],
                                      env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL)
        self._child_sock.close()
        try:
            self._sock.settimeout(WRITER_START_TIMEOUT_S)
            try:
                send_frame(self._sock, self._child_args)
                self._child_args = b""
                ready = recv_frame(self._sock)
            except OSError:  # (a timeout, or the process gone before it read its arguments)
                ready = None
            if ready != READY:
                raise RuntimeError(f"the writer process did not start (exit status "
                                   f"{self._proc.poll()})")
        except BaseException:  # never a writer left running on the ledger without this process
            self._sock.close()
            self._proc.kill()
            self._proc.wait()
            raise
        self._sock.setblocking(False)
        self.loop.add_reader(self._sock.fileno(), self._on_readable)
        self._tick_handle = self.loop.call_later(MAINTENANCE_IDLE_S, self._tick)

    def _tick(self) -> None:
        """An idle writer gets a maintenance operation (a prune step), with the group's time."""
        if self._stopping or self._dead is not None:
            return
        if (not self._in_flight and not self._queue
                and time.monotonic() - self._last_sent >= MAINTENANCE_IDLE_S):
            fut = self.loop.create_future()
            self._queue.append(_Item([PendingOp.internal(L.OP_MAINTENANCE)], fut, None, None,
                                     housekeeping=True))
            self._queued_ops += 1
            self._send_group()
        self._tick_handle = self.loop.call_later(MAINTENANCE_IDLE_S, self._tick)

    def submit(self, ops: list[PendingOp], deadline: float | None = None,
               on_answer: Callable[[list[PendingOp], list[Outcome]], None] | None = None
               ) -> asyncio.Future:
        """Queue ``ops`` (applied in order, in one group); the future gets their outcomes.

        A group takes whole items: one larger than ``group_max_ops`` (a batch is
        bounded by the service's batch limit) forms a group of its own.
        ``on_answer(ops, outcomes)`` runs when the outcomes are known, even if the
        caller has gone (its future cancelled), whatever they are.
        """
        assert ops
        if self._stopping or self._dead is not None:
            raise Stopped()
        if self._queued_ops + len(ops) > self.queue_max_ops:
            raise Overloaded()
        fut = self.loop.create_future()
        self._queue.append(_Item(ops, fut, deadline, on_answer))
        self._queued_ops += len(ops)
        if len(self._in_flight) < self.groups_in_flight:
            if self._queued_ops >= self.group_max_ops or not self.group_wait_s:
                self._send_group()  # a full group, or no waiting: send now
            elif self._wait_timer is None:
                self._wait_timer = self.loop.call_later(self.group_wait_s, self._send_group)
        return fut

    def _send_group(self) -> None:
        if self._wait_timer is not None:  # whoever sends first, the pending wait is over
            self._wait_timer.cancel()
            self._wait_timer = None
        if len(self._in_flight) >= self.groups_in_flight or self._dead is not None:
            return
        now = time.monotonic()
        items: list[_Item] = []
        n = 0
        while self._queue and (not items or n + len(self._queue[0].ops) <= self.group_max_ops):
            if not self._queue[0].ops:  # a checkpoint request goes alone
                if not items:
                    items.append(self._queue.popleft())
                break
            item = self._queue.popleft()
            self._queued_ops -= len(item.ops)
            if item.deadline is not None and item.deadline <= now:
                _answer(item, _uniform(L.R_DEADLINE_EXCEEDED, item.ops))
                continue
            items.append(item)
            n += len(item.ops)
        if not items:
            self._check_drained()
            return
        self._last_sent = time.monotonic()
        self._sent_groups += 1
        self._in_flight.append((items, time.perf_counter()))
        if not items[0].housekeeping:
            self.metrics.group_ops.observe(n)
        # groups.encode_group's bytes, written in one C loop
        data = batchwire.encode_group([op for it in items for op in it.ops],
                                      time.time_ns() // 1000)
        self._out += FRAME.pack(len(data))
        self._out += data
        self._flush()

    def _flush(self) -> None:
        """Hand queued bytes to the socket; finish from the event loop when it is full."""
        try:
            while self._out:
                sent = self._sock.send(self._out)
                del self._out[:sent]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._die(f"cannot reach the writer process: {exc}", committed_unknown=True)
            return
        if self._out and not self._writing:
            self.loop.add_writer(self._sock.fileno(), self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self._sock.fileno())
            self._writing = False

    def _on_readable(self) -> None:
        try:
            chunk = self._sock.recv(RECV_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._die("the writer process exited", committed_unknown=True)
            return
        self._in += chunk
        try:
            while len(self._in) >= FRAME.size and self._dead is None:
                (n,) = FRAME.unpack_from(self._in)
                if len(self._in) < FRAME.size + n:
                    break
                data = bytes(self._in[FRAME.size:FRAME.size + n])
                del self._in[:FRAME.size + n]
                self._on_answer(data)
        except Exception as exc:  # a malformed answer: nobody may be left waiting
            self._die(f"bad answer from the writer process: {type(exc).__name__}: {exc}",
                      committed_unknown=True)

    def _on_answer(self, data: bytes) -> None:
        if data.startswith(FATAL):
            self._die(f"the writer failed: {data[len(FATAL):].decode(errors='replace')}",
                      committed_unknown=False)
            return
        if data[:1] == CHECKPOINTED:
            self._checkpointed(COVERED.unpack_from(data, 1)[0])
            return
        if data[:1] != ANSWERED:
            raise ValueError("not an answer")
        if not self._in_flight:
            raise ValueError("an answer arrived with no group in flight")
        outcomes = batchwire.decode_answer(data[1 + COVERED.size:], Outcome, L.R_OK)
        expected = sum(len(it.ops) for it in self._in_flight[0][0])
        if len(outcomes) != expected:
            raise ValueError(f"{len(outcomes)} outcomes for a group of {expected}")
        items, sent_at = self._in_flight.popleft()
        self._answered_groups += 1
        self._checkpointed(COVERED.unpack_from(data, 1)[0])
        if self._answered_groups > self._covered:  # seen by reads only after a checkpoint
            self._mark_dirty(items, outcomes)
        k = 0
        for it in items:
            _answer(it, outcomes[k:k + len(it.ops)])
            k += len(it.ops)
        if not items[0].ops:
            self._barrier = None
        if not items[0].housekeeping:
            self.metrics.group_seconds.observe(time.perf_counter() - sent_at)
            self.groups += 1
            self.ops_applied += k
        if self._queue:
            self._send_group()
        else:
            self._check_drained()

    def _mark_dirty(self, items: list[_Item], outcomes: list[Outcome]) -> None:
        """The cards and requests of a group answered before a checkpoint holds it: the cards
        each operation names and those its entry is of (a refund routed to a replacement)."""
        # (an operation refused for the storage wrote nothing: not its card, not its key)
        batchwire.mark_dirty(self._dirty_cards, self._dirty_keys, items, outcomes,
                             self._answered_groups, L.R_STORAGE_UNAVAILABLE)

    def _checkpointed(self, covered: int) -> None:
        if covered <= self._covered:
            return
        self._covered = covered
        self.journal_signal.notify()  # new entries are in LMDB: caught-up journal feeds read on
        prune_dirty((self._dirty_cards, self._dirty_keys), covered, self._answered_groups)

    async def fresh(self, card_ids: tuple[bytes, ...] = (), keys: tuple[bytes, ...] = (),
                    everything: bool = False) -> None:
        """Return once LMDB holds every answered group that touched ``card_ids`` or ``keys`` (or
        any, with ``everything``): a read after it sees what its caller, or anyone, was
        answered. A checkpoint is asked for only when one is needed, one for all who wait."""
        need = self._needed(card_ids, keys, everything)
        if need <= self._covered:
            return
        if self._dead is not None:  # nobody can checkpoint it now: never answer from before
            raise Stale()
        if self._barrier is None:
            self._barrier = self.loop.create_future()
            self.checkpoint_requests += 1
            self._queue.append(_Item([], self._barrier, None, None, housekeeping=True))
            if len(self._in_flight) < self.groups_in_flight:
                self._send_group()
        await asyncio.shield(self._barrier)
        if self._covered < need:  # the checkpoint failed (or the writer died)
            raise Stale()

    def _needed(self, card_ids: tuple[bytes, ...], keys: tuple[bytes, ...],
                everything: bool) -> int:
        """The last group answered that touched them (any, with ``everything``): a read sees it
        once a checkpoint covers that group (a later group on them is a later read's concern)."""
        if everything:
            return self._answered_groups
        cards, dirty_keys = self._dirty_cards, self._dirty_keys
        return max([cards.get(c, 0) for c in card_ids] + [dirty_keys.get(k, 0) for k in keys],
                   default=0)

    def _check_drained(self) -> None:
        if self._stopping and not self._in_flight and not self._queue:
            self._drained.set()

    def _die(self, why: str, committed_unknown: bool) -> None:
        """Stop taking work; answer every waiting caller; tell the server."""
        if self._dead is not None:
            return
        self._dead = why
        log.critical("%s", why)
        held = [it for group, _ in self._in_flight for it in group]
        never_sent = list(self._queue)
        self._in_flight.clear()
        self._queue.clear()
        self._queued_ops = 0
        in_hands = L.R_OUTCOME_UNKNOWN if committed_unknown else L.R_INTERNAL
        for it in held:
            _answer(it, _uniform(in_hands, it.ops))
        for it in never_sent:
            _answer(it, _uniform(L.R_INTERNAL, it.ops))
        self.loop.remove_reader(self._sock.fileno())
        if self._writing:
            self.loop.remove_writer(self._sock.fileno())
            self._writing = False
        self._drained.set()
        if self._on_fatal is not None:
            self._on_fatal(why)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Apply everything already queued, then close the writer process."""
        self._stopping = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._wait_timer is not None:
            self._send_group()
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except asyncio.TimeoutError:
            self._die(f"the writer did not finish within {timeout_s:.0f} s", committed_unknown=True)
        if self._dead is None:
            self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self._proc is None:  # never started
            return
        try:
            await self.loop.run_in_executor(None, self._proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await self.loop.run_in_executor(None, self._proc.wait)


def prune_dirty(maps, held: int, answered: int) -> None:
    """Dirty maps (card or request key -> the last group answered that touched it) once LMDB
    holds every group through ``held``: cleared when that is every group ``answered``, else,
    past DIRTY_PRUNE_AT entries, the entries it holds dropped (the writer's checkpoints, a
    front's follower)."""
    for dirty in maps:
        if dirty and held >= answered:
            dirty.clear()
        elif len(dirty) > DIRTY_PRUNE_AT:
            for key in [k for k, g in dirty.items() if g <= held]:
                del dirty[key]


def _answer(item: _Item, outcomes: list[Outcome]) -> None:
    if item.on_answer is not None:
        try:
            item.on_answer(item.ops, outcomes)
        except Exception:  # the caller must get its answer whatever a hook does
            log.exception("answer hook failed")
    if not item.future.done():  # a caller that went away has a cancelled future
        item.future.set_result(outcomes)


assert os.name == "posix"  # add_reader on a pipe needs a selector event loop
