"""The single writer: queued mutations applied in groups (group commit).

Handlers on the event loop call ``submit``; a dedicated thread takes up to
``group_max_ops`` operations (waiting at most ``group_wait_us`` for more once
the first arrives), applies them in one LMDB write transaction with one
fsync, then answers every caller of the group with one hop back to the loop.
The queue is bounded in operations: a full queue refuses at once
(``Overloaded``) rather than grow. An item whose deadline passed before the
writer reached it is not applied. A failed assertion stops the writer: every
queued caller gets REASON_INTERNAL and nothing half-done is written.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Callable

from cardcore import layout as L
from cardcore.ledger import Ledger, Outcome, PendingOp
from cardcore.v1 import common_pb2 as pb

log = logging.getLogger("cardcore.writer")

GROUP_MAX_OPS_DEFAULT = 10_000
GROUP_WAIT_US_DEFAULT = 0
QUEUE_MAX_OPS_DEFAULT = 100_000


class Overloaded(Exception):
    pass


class Stopped(Exception):
    pass


class _Item:
    __slots__ = ("ops", "future", "deadline")

    def __init__(self, ops: list[PendingOp], future: asyncio.Future, deadline: float | None):
        self.ops = ops
        self.future = future
        self.deadline = deadline


def _uniform(reason: int, ops: list[PendingOp]) -> list[Outcome]:
    return [Outcome(reason, False, op.packed[0], None, 0) for op in ops]


class Writer:
    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop, *,
                 group_max_ops: int = GROUP_MAX_OPS_DEFAULT,
                 group_wait_us: int = GROUP_WAIT_US_DEFAULT,
                 queue_max_ops: int = QUEUE_MAX_OPS_DEFAULT,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_group: Callable[[int, float], None] | None = None) -> None:
        assert group_max_ops >= 1 and queue_max_ops >= 1 and group_wait_us >= 0
        self.ledger = ledger
        self.loop = loop
        self.group_max_ops = group_max_ops
        self.group_wait_s = group_wait_us / 1e6
        self.queue_max_ops = queue_max_ops
        self._on_fatal = on_fatal
        self._on_group = on_group
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_ops = 0
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cardcore-writer", daemon=True)
        self.groups = 0
        self.ops_applied = 0

    @property
    def queued_ops(self) -> int:
        return self._queued_ops

    def start(self) -> None:
        self._thread.start()

    def submit(self, ops: list[PendingOp], deadline: float | None = None) -> asyncio.Future:
        """Queue ``ops`` (applied in order, in one group); the future gets their outcomes.

        A group takes whole items: one larger than ``group_max_ops`` (a batch is
        bounded by the service's batch limit) forms a group of its own.
        """
        assert ops
        fut = self.loop.create_future()
        with self._cond:
            if self._stopping or self._dead is not None:
                raise Stopped()
            if self._queued_ops + len(ops) > self.queue_max_ops:
                raise Overloaded()
            self._queue.append(_Item(ops, fut, deadline))
            self._queued_ops += len(ops)
            self._cond.notify()
        return fut

    def stop(self, timeout_s: float = 30.0) -> None:
        """Apply everything already queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _take_group(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            if self.group_wait_s and self._queued_ops < self.group_max_ops and not self._stopping:
                self._cond.wait_for(lambda: self._queued_ops >= self.group_max_ops or self._stopping,
                                    self.group_wait_s)
            items = [self._queue.popleft()]
            n = len(items[0].ops)
            while self._queue and n + len(self._queue[0].ops) <= self.group_max_ops:
                item = self._queue.popleft()
                items.append(item)
                n += len(item.ops)
            self._queued_ops -= n
            return items

    def _run(self) -> None:
        while True:
            items = self._take_group()
            if items is None:
                return
            now = time.monotonic()
            live = [it for it in items if it.deadline is None or it.deadline > now]
            answers = [(it, _uniform(pb.REASON_DEADLINE_EXCEEDED, it.ops))
                       for it in items if it.deadline is not None and it.deadline <= now]
            if live:
                flat = [op for it in live for op in it.ops]
                started = time.perf_counter()
                try:
                    outcomes = self.ledger.apply_group(flat, time.time_ns() // 1000)
                except BaseException as exc:  # an invariant broke: stop, never write a half-truth
                    self._die(exc, live)
                    return
                k = 0
                for it in live:
                    answers.append((it, outcomes[k:k + len(it.ops)]))
                    k += len(it.ops)
                self.groups += 1
                self.ops_applied += len(flat)
                if self._on_group is not None:
                    self._on_group(len(flat), time.perf_counter() - started)
            self.loop.call_soon_threadsafe(_resolve, answers)

    def _die(self, exc: BaseException, in_flight: list[_Item]) -> None:
        log.critical("writer stopped: %s: %s", type(exc).__name__, exc)
        with self._cond:
            self._dead = exc
            pending = in_flight + list(self._queue)
            self._queue.clear()
            self._queued_ops = 0
        self.loop.call_soon_threadsafe(
            _resolve, [(it, _uniform(pb.REASON_INTERNAL, it.ops)) for it in pending])
        if self._on_fatal is not None:
            self.loop.call_soon_threadsafe(self._on_fatal, exc)


def _resolve(answers: list[tuple[_Item, list[Outcome]]]) -> None:
    for item, outcomes in answers:
        if not item.future.done():  # a caller that went away has a cancelled future
            item.future.set_result(outcomes)


assert L.OP_SIZE == 64  # _uniform reads the op type from byte 0 of the packed operation
