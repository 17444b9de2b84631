"""The writer process's side of ``cardcore.server.writer`` (its wire format is described there):
``writer_main`` applies each group it is sent, logs it, answers it. The process is started by
``Writer.start`` as ``python -c`` of ``child_main``, not through multiprocessing's spawn, and
this module imports only what applying needs (no asyncio, gRPC or metrics): spawn imported the
server's main module and the gRPC half again, ~0.2 s of CPU at every start. Its arguments (the
keyring's derived keys among them) come as the first frame on its socket, never in its argv.
"""
from __future__ import annotations

import gc
import logging
import pickle
import select
import signal
import socket
import struct
import sys
import time

import lmdb

from cardcore import layout as L
from cardcore import ledger as ledger_module
from cardcore.durable import (CHECKPOINT_MS_DEFAULT, CHECKPOINT_OPS_DEFAULT, DurableLedger,
                              log_folder)
from cardcore.ext import writerglue
from cardcore.grouplog import SEGMENT_BYTES_DEFAULT, LogSyncError
from cardcore.groups import decode_group
from cardcore.idempotency import entry_line_count
from cardcore.ledger import Ledger, Outcome, PendingOp

from . import logs

log = logging.getLogger("cardcore.writer")

WRITER_GC_GEN0 = 50_000        # the writer process's youngest-generation GC threshold (700)
DEGRADED_RETRY_S = 1.0          # an idle writer whose checkpoint failed tries again this often
# what Writer.start runs: the child's end of the socketpair is the one argument; SIGINT and
# SIGTERM ignored from the start (the server process coordinates shutdown: writer_main)
ENTRY = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "from cardcore.server.writer_proc import child_main; child_main()")

COUNT = struct.Struct("<I")
ENTRY_HEAD_SIZE = 224  # a reply's fields: all but the digest (layout.JOURNAL)
ANSWER = struct.Struct(f"<HBBqI{ENTRY_HEAD_SIZE}s")
NO_ENTRY = bytes(ENTRY_HEAD_SIZE)
FATAL = b"FATAL:"
READY = b"READY"
ANSWERED = b"A"          # an answer: then the groups a checkpoint holds, then the outcomes
CHECKPOINTED = b"C"      # a checkpoint made while idle: then the groups it holds
COVERED = struct.Struct("<Q")
FRAME = struct.Struct("<I")
FRAME_BYTES_MAX = 1 << 30


def is_storage_error(exc: BaseException) -> bool:
    """A failure of the storage, not of the ledger's logic: a full disk (DiskError), an errno
    py-lmdb has no class for (EIO, EFBIG: plain lmdb.Error), an environment LMDB flagged after a
    failed sync (PanicError). The group is settled and the writer goes on. Anything else
    (InvariantError, a kernel ValueError, KeyExistsError on the journal) stops the server."""
    return (type(exc) is lmdb.Error or isinstance(exc, (lmdb.DiskError, lmdb.PanicError, OSError)))


def _uniform(reason: int, ops: list[PendingOp]) -> list[Outcome]:
    return [Outcome(reason, False, op.packed[0], None, 0) for op in ops]


def encode_answer(outcomes: list[Outcome]) -> bytes:
    # one money field each: the available amount of a decline, the held amount of an applied one
    fixed = [ANSWER.pack(o.reason, o.replayed, o.op,
                         o.held_minor if o.reason == L.R_OK else o.available_minor, o.count,
                         (o.entry or NO_ENTRY)[:ENTRY_HEAD_SIZE])
             for o in outcomes]
    return b"".join([COUNT.pack(len(outcomes)), *fixed, *[o.lines for o in outcomes if o.lines]])


def decode_answer(data: bytes) -> list[Outcome]:
    n = COUNT.unpack_from(data)[0]
    end = COUNT.size + n * ANSWER.size
    fixed = ANSWER.iter_unpack(memoryview(data)[COUNT.size:end])
    if end == len(data):  # no lines (most groups)
        return [Outcome(reason, bool(replayed), op, None if entry == NO_ENTRY else entry,
                        0 if reason == L.R_OK else money, count, b"",
                        money if reason == L.R_OK else 0)
                for reason, replayed, op, money, count, entry in fixed]
    out = []  # purchases with lines: theirs follow, in order; each outcome made once
    pos = end
    for reason, replayed, op, money, count, entry in fixed:
        if reason != L.R_OK:
            out.append(Outcome(reason, bool(replayed), op, None if entry == NO_ENTRY else entry,
                               money, count))
            continue
        lines = b""
        if entry == NO_ENTRY:
            entry = None
        elif size := entry_line_count(entry) * L.LINE_SIZE:
            lines = data[pos:pos + size]
            pos += size
        out.append(Outcome(reason, bool(replayed), op, entry, 0, count, lines, money))
    if pos != len(data):
        raise ValueError("answer message has trailing bytes")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes | None:
    """One framed message from a blocking socket; None at end of stream."""
    head = _recv_exact(sock, FRAME.size)
    if head is None:
        return None
    (n,) = FRAME.unpack(head)
    if n > FRAME_BYTES_MAX:
        raise ValueError("frame too large")
    return _recv_exact(sock, n)


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(FRAME.pack(len(data)) + data)


def writer_gc() -> None:
    """The cyclic GC of a process that applies groups (the writer, a replica): the apply loop
    makes no cycles (measured: a collection found nothing) but allocates enough to set one off
    every few hundred operations, each walking the young objects; the long-lived objects made so
    far are frozen out of every later collection, and the youngest generation is collected every
    WRITER_GC_GEN0 allocations (README, "Where the time goes": 0.92x the writer's CPU). A
    follower replica makes small cycles at each lease try, collected every few minutes; what is
    frozen here and becomes garbage later (rare, once each) is never collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(WRITER_GC_GEN0, *gc.get_threshold()[1:])


def writer_main(sock: socket.socket, ledger_path: str, initial_program: str | None, sync: bool,
                map_size: int, request_window_s: int, reader_check_s: float, log_level: str,
                log_format: str, lookup_key: bytes | None = None,
                profile_key: bytes | None = None, checkpoint_ms: int = CHECKPOINT_MS_DEFAULT,
                checkpoint_ops: int = CHECKPOINT_OPS_DEFAULT,
                log_segment_bytes: int = SEGMENT_BYTES_DEFAULT,
                day_totals: bool = True, member_metrics: bool = True) -> None:
    """The writer process: apply each group it is sent, log it, answer it, until the socket
    closes; checkpoint LMDB when one is due (``cardcore.durable``). ``day_totals``,
    ``member_metrics`` False: for the benchmarks of their cost only (``serve --no-day-totals``,
    ``--no-member-metrics``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server process coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(log_level, log_format)

    def open_ledger() -> Ledger:
        return Ledger(ledger_path, initial_program=initial_program, sync=sync, map_size=map_size,
                      initial_request_window_s=request_window_s, lookup_key=lookup_key,
                      profile_key=profile_key, day_totals=day_totals,
                      member_metrics_kept=member_metrics)

    try:
        durable = DurableLedger(open_ledger, log_folder=log_folder(ledger_path), sync=sync,
                                segment_bytes=log_segment_bytes, checkpoint_ms=checkpoint_ms,
                                checkpoint_ops=checkpoint_ops)
    except Exception as exc:
        log.critical("the ledger cannot be opened: %s: %s", type(exc).__name__, exc)
        raise
    writer_gc()
    received = 0   # groups received on this connection (empty ones too)
    covered = 0    # of those, the last the latest checkpoint holds
    clean = True   # a checkpoint on the way out
    try:
        send_frame(sock, READY)
        checked = time.monotonic()
        while True:
            # Wait for a group; on the way, clear reader slots that readers killed -9 left,
            # and checkpoint when one is due.
            if time.monotonic() - checked >= reader_check_s:
                durable.ledger.reader_check()
                checked = time.monotonic()
            due_in = durable.seconds_to_due()
            if durable.degraded:  # a checkpoint failed: the next try waits, never spins
                due_in = DEGRADED_RETRY_S
            wait_s = reader_check_s if due_in is None else min(reader_check_s, due_in)
            if not select.select([sock], [], [], wait_s)[0]:
                if durable.due() and durable.checkpoint():
                    covered = received
                    send_frame(sock, CHECKPOINTED + COVERED.pack(covered))
                continue
            data = recv_frame(sock)
            if data is None:
                return
            received += 1
            try:
                outcomes, wants_checkpoint = durable.apply(data)
            except LogSyncError as exc:
                # The group may be durable or not: end the connection without an answer, so its
                # callers hear "outcome unknown", and stop for the supervisor to restart the
                # server (recovery reads what landed).
                log.critical("writer stopped: %s", exc)
                clean = False
                return
            except Exception as exc:
                if not is_storage_error(exc):
                    log.critical("writer stopped: %s: %s", type(exc).__name__, exc)
                    send_frame(sock, FATAL + type(exc).__name__.encode())
                    clean = False
                    return
                log.error("the ledger could not be written (%s: %s); the group is refused",
                          type(exc).__name__, exc)
                ops, _ = decode_group(data)
                outcomes, wants_checkpoint = _uniform(L.R_STORAGE_UNAVAILABLE, ops), False
            if wants_checkpoint:
                if durable.checkpoint():
                    covered = received
                else:
                    # In the log, but what the server process reads for other calls (an admin
                    # change, an opening) cannot reach LMDB now: not an OK it cannot stand by.
                    log.error("a group that needs a checkpoint is answered 'outcome unknown'")
                    outcomes = _uniform(L.R_OUTCOME_UNKNOWN, decode_group(data)[0])
            send_frame(sock, ANSWERED + COVERED.pack(covered) + (
                writerglue.encode_answer(outcomes) if ledger_module.GLUE_IN_C
                else encode_answer(outcomes)))  # C, or the reference (tests)
            # A checkpoint due by time or size comes after the answer: no caller waits for it
            # (the log already made the group durable); its covered number follows. (Degraded,
            # the next group's apply tries one first, and an idle writer once a second.)
            if not durable.degraded and durable.due() and durable.checkpoint():
                covered = received
                send_frame(sock, CHECKPOINTED + COVERED.pack(covered))
    except (BrokenPipeError, ConnectionResetError):
        return  # the server process went away
    finally:
        durable.close(checkpoint=clean)
        sock.close()


def child_main() -> None:
    """``python -c ENTRY FD``: the socket is FD; the first frame holds ``writer_main``'s other
    arguments (pickled by the parent that started this process, over their private socket)."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    args = recv_frame(sock)
    if args is None:  # the server went away before it sent them
        return
    writer_main(sock, *pickle.loads(args))
