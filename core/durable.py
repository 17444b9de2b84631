"""The writer's ledger made durable by the group log, with LMDB synced only at checkpoints.

Why: a synced LMDB commit per group costs two fsyncs and every page the group touched; an append
to a preallocated log costs one fdatasync of a few bytes per operation. So each group is applied
in a write transaction that stays open across groups (the span), its input appended to the log
and fdatasync'ed, and only then answered. A checkpoint records the last group it holds
(``META_LOG_APPLIED``) and commits the span with sync; the log's segments before it are recycled.
LMDB's NOSYNC is never used: between checkpoints LMDB's files hold only the last checkpoint, so a
power cut always finds a whole, synced snapshot plus the log.

Which fsync covers what: an answered group is in the log, covered by the fdatasync of its append
(a new segment's name by a directory fsync before its first append). Everything up to a
checkpoint is in LMDB, covered by that commit's sync; the log before it is dropped only after.

Recovery (``open``): replay every log group after ``META_LOG_APPLIED`` into a span, checking that
each ends at the journal digest its record names (a replay that diverges stops the writer), then
checkpoint. Applying a group reads only the ledger and the group (time comes in the group), so a
replay ends where the first apply did.

Order within a group: apply in the span (in memory), append and fdatasync, answer. An apply that
fails leaves nothing in the log; an append that fails before its fdatasync (no segment could be
made, a short write) leaves nothing the log will read back (its checksum fails), so the span is
rebuilt from the log and the group refused as not applied; a failed fdatasync may or may not have
made it durable, so that one is left to recovery (``LogSyncError``: the writer stops unanswered,
its callers hear "outcome unknown").

Reads: the gRPC process reads LMDB, that is the last checkpoint. The groups that only a checkpoint
makes visible are card operations (``groups.deferrable``); the gRPC process knows which cards and
requests they touched and asks for a checkpoint before a read of one of them
(``server.writer.Writer.fresh``); everything else is checkpointed before it is answered.
"""
from __future__ import annotations

import logging
import os
import time

import lmdb

from typing import Callable

from cardcore.grouplog import (SEGMENT_BYTES_DEFAULT, GroupLog, LogError, LogView,
                               SegmentLog, last_group_no)
from cardcore.groups import decode_group, deferrable
from cardcore.idempotency import Outcome, PendingOp
from cardcore import layout as L
from cardcore import ledger as ledger_module
from cardcore.ext import writerglue
from cardcore.ledger import MAP_GROW_ATTEMPTS, InvariantError, Ledger

log = logging.getLogger("cardcore.durable")


def _decode(data: bytes) -> tuple[list[PendingOp], int]:
    """A group's operations and time: in C (``writerglue.decode_group``), or by the Python
    reference ``groups.decode_group`` when the tests turn the C glue off (``ledger.GLUE_IN_C``)."""
    if ledger_module.GLUE_IN_C:
        return writerglue.decode_group(data, PendingOp)
    return decode_group(data)

CHECKPOINT_MS_DEFAULT = 100        # a checkpoint at least this often while groups arrive
CHECKPOINT_OPS_DEFAULT = 50_000    # and after this many operations
DIGEST_BYTES = 16                  # of the journal's 32-byte chained digest, in a log record
LOG_FOLDER = "log"


def log_folder(ledger_path: str) -> str:
    """The group log lives in the ledger's folder: a swap (migration, restore) moves it along."""
    return os.path.join(ledger_path, LOG_FOLDER)


def _applied_at(ledger_path: str) -> int:
    """The last log group the ledger at ``ledger_path`` holds (read-only)."""
    ledger = Ledger(ledger_path, readonly=True)
    try:
        return ledger.log_applied()
    finally:
        ledger.close()


def behind(ledger_path: str) -> int:
    """How many groups the log holds that LMDB does not (a moment's view beside a writer)."""
    return max(0, last_group_no(log_folder(ledger_path)) - _applied_at(ledger_path))


def catch_up(ledger_path: str, lookup_key: bytes | None = None,
             profile_key: bytes | None = None) -> int:
    """Replay into LMDB the groups a stopped server's log holds past its last checkpoint (a
    tool's first step beside no server: verify, backup); how many. The keys are the writer's
    (a replacement re-seals the profile it moves)."""
    n = behind(ledger_path)
    if n:
        DurableLedger(lambda: Ledger(ledger_path, lookup_key=lookup_key, profile_key=profile_key),
                      log_folder=log_folder(ledger_path)).close()
    return n


def catch_up_copy(copy_path: str, source_ledger_path: str, lookup_key: bytes | None = None,
                  profile_key: bytes | None = None) -> int:
    """Replay into a copy of a ledger (a backup) the groups its source's log holds past the
    copy's checkpoint, read beside the live writer: the backup then holds every group answered
    before it ran. How many; LogError if the writer recycled them meanwhile (try again)."""
    view = LogView(log_folder(source_ledger_path))
    copied = _applied_at(copy_path)
    if view.next_group_no - 1 < copied:  # a segment was recycled while the view looked
        raise LogError(f"the log view ends at group {view.next_group_no - 1}, before the copy's "
                       f"checkpoint at {copied}")
    durable = DurableLedger(lambda: Ledger(copy_path, lookup_key=lookup_key,
                                           profile_key=profile_key), view)
    durable.close()
    return durable.replayed


class Degraded(OSError):
    """A checkpoint failed (a full disk) and still fails: no new group is taken, since the log
    would grow past what LMDB can ever hold and reads of what it holds cannot be served."""


class DurableLedger:
    """A Ledger whose groups go through a GroupLog; LMDB is committed at checkpoints."""

    def __init__(self, open_ledger: Callable[[], Ledger], group_log: GroupLog | None = None, *,
                 log_folder: str | None = None, sync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES_DEFAULT,
                 checkpoint_ms: int = CHECKPOINT_MS_DEFAULT,
                 checkpoint_ops: int = CHECKPOINT_OPS_DEFAULT,
                 unchecked_through: int = 0) -> None:
        """Recover at once: the log's groups after the ledger's checkpoint are replayed and
        checkpointed. Give ``group_log`` (the cluster's) or ``log_folder`` (a SegmentLog).
        ``open_ledger`` opens the ledger (again, after a failed checkpoint: LMDB may have flagged
        the environment). ``unchecked_through``: the groups up to this one are applied without
        the digest check, each that differs logged (an operator's way past groups a leader
        applied to a changed record: docs/cluster.md, "A follower"); later ones are checked."""
        assert checkpoint_ms >= 0 and checkpoint_ops >= 1 and unchecked_through >= 0
        self.unchecked_through = unchecked_through
        self._open_ledger = open_ledger
        self.ledger = ledger = open_ledger()
        self.checkpoint_s = checkpoint_ms / 1000
        self.checkpoint_ops = checkpoint_ops
        applied = ledger.log_applied()
        if 0 < unchecked_through <= applied:
            log.warning("--unchecked-through %d covers nothing here (the checkpoint holds group "
                        "%d): remove it", unchecked_through, applied)
        if group_log is None:
            assert log_folder is not None
            group_log = SegmentLog(log_folder, applied + 1, segment_bytes, sync)
        self.log = group_log
        self._txn = None
        self.applied = applied          # the last group in the span (or checkpointed)
        self.checkpointed = applied     # the last group LMDB holds durably
        self.ops_since = 0              # operations applied since the last checkpoint
        self.since = time.monotonic()   # when the span began
        self.degraded = False
        self.broken = ""    # why the span could not be rebuilt: nothing more is taken
        self.broken_for_now = False  # ... only because the log could not be read (a replica's
        # stream not answering): follow() tries the rebuild again
        self.replayed = replayed = self._replay()
        if replayed:
            log.warning("replayed %d groups of the log after the last checkpoint", replayed)
            self.checkpoint()

    # ---- groups ------------------------------------------------------------------

    def apply(self, data: bytes) -> tuple[list[Outcome], bool]:
        """Apply the group ``data`` (``groups.encode_group``) and make it durable; (outcomes,
        whether it wants a checkpoint before it is answered). An empty group applies nothing and
        asks for a checkpoint. Raises what Ledger raises (the span is aborted: nothing of it
        was answered that the log does not hold) and LogSyncError."""
        ops, ts_us = _decode(data)
        if self.broken:
            raise InvariantError(f"the span could not be rebuilt from the log: {self.broken}")
        if not ops:
            return [], True
        if self.degraded and not self.checkpoint():
            raise Degraded("the ledger cannot be checkpointed")
        outcomes = self._apply(ops, ts_us)
        last_seq, digest = self.ledger.journal_head(self._txn)
        try:
            self.log.append(data, last_seq, digest[:DIGEST_BYTES])
        except OSError:  # (a LogSyncError is not one: whether it landed is unknown)  # nothing of the group will be read back: it is refused
            self._rebuild()
            raise
        self.applied += 1
        self.ops_since += len(ops)
        return outcomes, not all(deferrable(op) for op in ops)

    def _apply(self, ops, ts_us: int) -> list[Outcome]:
        for _ in range(MAP_GROW_ATTEMPTS):
            try:
                return self.ledger.apply_in(self._span(), ops, ts_us)
            except lmdb.MapFullError:
                self._rebuild(grow=True)
            except BaseException:
                self._rebuild()  # the span holds the answered groups again, not this one
                raise
        raise RuntimeError("LMDB map still full after growing it")

    # ---- Cluster (docs/cluster.md) ------------------------------------------------------

    def follow(self) -> int:
        """Apply the groups another writer appended to the log since ``applied`` (a replica that
        follows its shard's stream): the replay path, each group's journal digest checked (a
        replica that would diverge stops, InvariantError). How many."""
        if self.broken and not self.broken_for_now:
            raise InvariantError(f"the span could not be rebuilt from the log: {self.broken}")
        if self.broken:  # the log was unreadable for a moment: from the checkpoint again
            self.broken, self.broken_for_now = "", False
            before = self.checkpointed
            self._span_from_log()
            return self.applied - before
        return self._replay()

    def read_admin_relay(self) -> tuple[int, int, int] | None:
        """The ledger's place in a cluster with an admin shard as the span leaves it (a
        leader's: its groups since the checkpoint included)."""
        return self.ledger.read_admin_relay(self._span())

    def journal_last_seq(self) -> int:
        """The journal's last sequence as the span leaves it."""
        return self.ledger.journal_head(self._span())[0]

    def due(self) -> bool:
        """Is a checkpoint due (time or operations since the last)?"""
        if self.applied == self.checkpointed:
            return False
        return (self.ops_since >= self.checkpoint_ops
                or time.monotonic() - self.since >= self.checkpoint_s)

    def seconds_to_due(self) -> float | None:
        """How long until a checkpoint is due by time (None: nothing to checkpoint)."""
        if self.applied == self.checkpointed:
            return None
        return max(0.0, self.since + self.checkpoint_s - time.monotonic())

    def checkpoint(self) -> bool:
        """Commit the span with sync, recording the last group it holds; recycle the log before
        it. False if LMDB could not be written: the span is rebuilt from the log (nothing
        answered is lost) and the ledger is ``degraded`` until a checkpoint succeeds."""
        if self.applied == self.checkpointed:
            self.degraded = False
            return True
        txn, self._txn = self._txn, None
        assert txn is not None
        try:
            self.ledger.set_log_applied(txn, self.applied)
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            self._rebuild(grow=True)
            return self.checkpoint()
        except Exception as exc:
            log.error("the ledger could not be written at a checkpoint (%s: %s); the log holds "
                      "every group answered", type(exc).__name__, exc)
            self.degraded = True
            self.ledger.close()
            self.ledger = self._open_ledger()
            landed = self.ledger.log_applied()
            if landed == self.applied:  # the commit failed after its meta page was written
                log.warning("the checkpoint landed after all")
                return self._held()
            self.applied = self.checkpointed = landed
            self.ops_since = 0
            self._span_from_log()
            return False
        return self._held()

    def _held(self) -> bool:
        """LMDB holds every group applied: the log before them may go."""
        self.checkpointed = self.applied
        self.degraded = False
        self.ops_since = 0
        self.log.truncate_before(self.checkpointed + 1)
        return True

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint what the span holds (unless told not to: after a failure), then close the
        log and the ledger."""
        try:
            if checkpoint and self._txn is not None:
                self.checkpoint()
        finally:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self.log.close()
            self.ledger.close()

    # ---- the span from the log ------------------------------------------------------

    def _span(self):
        """The write transaction the groups since the last checkpoint are applied in."""
        if self._txn is None:
            self._txn = self.ledger.env.begin(write=True)
            self.since = time.monotonic()
        return self._txn

    def _abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self.ledger.reload()
        self.applied = self.checkpointed
        self.ops_since = 0

    def _rebuild(self, grow: bool = False) -> None:
        """Back to the checkpoint, then the log's groups after it again."""
        self._abort()
        if grow:
            self.ledger.grow_map()
        self._span_from_log()

    def _span_from_log(self) -> None:
        """The span rebuilt from the log, or the writer stops (InvariantError, never a storage
        error it would go on after): a span behind the log must never take another group."""
        try:
            self._replay()
        except Exception as exc:
            self._abort()
            self.broken = f"{type(exc).__name__}: {exc}"
            # only a read the log calls transient may pass later; anything else (a ledger and a
            # log that do not fit, LMDB, a record that does not decode, a bug) stays broken
            self.broken_for_now = isinstance(exc, self.log.TRANSIENT_ERRORS)
            raise InvariantError(f"the span could not be rebuilt from the log: {self.broken}") \
                from exc

    def _replay(self) -> int:
        """Apply the log's groups after ``applied`` into the span; how many."""
        n = 0
        for rec in self.log.read_from(self.applied + 1):
            ops, ts_us = _decode(rec.payload)
            try:
                self.ledger.apply_in(self._span(), ops, ts_us)
            except lmdb.MapFullError:
                self._abort()
                self.ledger.grow_map()
                return self._replay()
            last_seq, digest = self.ledger.journal_head(self._txn)
            if rec.digest_seq and (last_seq != rec.digest_seq
                                   or digest[:DIGEST_BYTES] != rec.out_digest):
                where = (f"seq {last_seq}, not where it first did ({rec.digest_seq})"
                         if last_seq != rec.digest_seq else
                         f"seq {last_seq} as it first did, but its entries differ (another "
                         "digest: a record changed outside the writer, or another kernel)")
                if rec.group_no > self.unchecked_through:
                    self._abort()
                    raise InvariantError(f"replaying group {rec.group_no} of the log ended at "
                                         f"journal {where}: the ledger and its log do not "
                                         "belong together")
                log.warning("group %d ended at journal %s; applied unchecked "
                            "(--unchecked-through %d)", rec.group_no, where,
                            self.unchecked_through)
            self.applied = rec.group_no
            self.ops_since += len(ops)
            n += 1
        if self.applied != self.log.next_group_no - 1:
            raise InvariantError(f"the log ends at group {self.log.next_group_no - 1}, the ledger "
                                 f"holds {self.applied}")
        return n


assert L.DIGEST_SIZE >= DIGEST_BYTES
