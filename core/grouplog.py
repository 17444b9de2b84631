"""The group log: each group's input, made durable before its callers are answered.

The writer appends every group it applies (the bytes of ``cardcore.groups.encode_group``: the
group's time and its operations) and makes the append durable with one ``fdatasync``; LMDB is
brought up to date from it and committed with sync only at checkpoints (``cardcore.durable``).
The log is an interface, ``GroupLog``, because the cluster puts a replicated stream behind the
same three calls: append a group durably, read from a group number, drop what a checkpoint holds.

``SegmentLog`` keeps it in preallocated segment files in one folder (inside the ledger's folder,
so a migration's or restore's swap carries it with the ledger it belongs to)::

    seg-<first group_no, 20 digits>-<salt, 16 hex>.log
                  a live segment: records one after another, then whatever the file held
                  before (zeros, or a recycled segment's older records)
    spare-<n>.log a segment ready to be reused (its content is stale)

A record is a 64-byte header and the payload (layout, little-endian)::

    off size field
      0   4  magic        b"CCG1"
      4   2  version      1
      6   2  shard        0 on one machine (the cluster's shard number)
      8   8  epoch        0 on one machine (the cluster's leader epoch)
     16   8  group_no     1, 2, 3, ... with no gap across segments
     24   4  payload_len  bytes after the header
     28   4  crc32        zlib.crc32 of the header (with this field zero) and the payload
     32   8  digest_seq   the journal seq the digest below is of (0: none yet)
     40  16  out_digest   the journal's chained digest there: a replay must reach the same
     56   8  salt         the segment's (random, in its name): bytes left from a segment's
                          earlier life, or a payload that looks like a record, never pass

Reading stops at the first record that is not the next group of this segment (a torn or
never-written tail, a zeroed or recycled region): the log is every group up to there. Each append
is synced before the next begins, so only the last record of the last segment can be torn; a
damaged record with valid records after it, or a live segment that starts past the end, is a
damaged log (``LogError``), never silently cut short.

Segments are preallocated with real zeros (an overwrite's fdatasync costs less than one that
grows the file) in the background, so an append never waits for one; a new segment's name is made
durable (directory fsync) before the first append into it.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from typing import Iterator, NamedTuple

from cardcore.swap import fsync_dir

log = logging.getLogger("cardcore.grouplog")

MAGIC = b"CCG1"
VERSION = 1
HEADER = struct.Struct("<4sHHQQIIQ16s8s")
assert HEADER.size == 64
CRC_OFFSET = 28
SEGMENT_BYTES_DEFAULT = 16 << 20
SEGMENT_BYTES_MIN = 1 << 20
SPARES_MAX = 4                 # recycled segments kept for reuse; more are deleted
RECORD_BYTES_MAX = 1 << 30     # one group's record (the writer's frame limit)
PREALLOC_RETRY_S = 1.0         # after a failed preallocation (a full disk), the next try
ZERO_CHUNK = bytes(1 << 20)
_LIVE = re.compile(r"seg-(\d{20})-([0-9a-f]{16})\.log$")
_SPARE = re.compile(r"spare-(\d+)\.log$")


class LogError(Exception):
    """The log cannot be used as it is (a gap, a damaged record, one that does not continue the
    ledger)."""


class LogSyncError(Exception):
    """An append's fdatasync failed: whether the group is durable is unknown (the log is not
    to be used again by this process; a restart reads what landed)."""


class Record(NamedTuple):
    group_no: int
    digest_seq: int
    out_digest: bytes
    payload: bytes


def pack_record(group_no: int, payload: bytes, digest_seq: int = 0,
                out_digest: bytes = bytes(16), salt: bytes = bytes(8), shard: int = 0,
                epoch: int = 0) -> bytes:
    """One record: header and payload, its crc filled in."""
    assert group_no >= 1 and len(out_digest) == 16 and len(salt) == 8
    assert len(payload) <= RECORD_BYTES_MAX
    head = bytearray(HEADER.pack(MAGIC, VERSION, shard, epoch, group_no, len(payload), 0,
                                 digest_seq, out_digest, salt))
    crc = zlib.crc32(payload, zlib.crc32(head))
    struct.pack_into("<I", head, CRC_OFFSET, crc)
    return bytes(head) + payload


def unpack_header(head: bytes, salt: bytes) -> tuple | None:
    """(group_no, payload_len, crc, digest_seq, out_digest), or None if it is not a header of
    a segment with this salt."""
    if len(head) != HEADER.size:
        return None
    magic, version, _shard, _epoch, group_no, n, crc, digest_seq, digest, got = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or n > RECORD_BYTES_MAX or got != salt:
        return None
    return group_no, n, crc, digest_seq, digest


def record_ok(head: bytes, payload: bytes, crc: int) -> bool:
    zeroed = head[:CRC_OFFSET] + bytes(4) + head[CRC_OFFSET + 4:]
    return zlib.crc32(payload, zlib.crc32(zeroed)) == crc


class GroupLog:
    """What the writer needs of a log; the cluster implements it over a replicated stream."""

    # What a read of this log may raise for a moment only (a replicated stream's node failing
    # over): a span rebuild that met one is tried again by DurableLedger.follow. A local log's
    # reads fail for no such reason.
    TRANSIENT_ERRORS: tuple[type[BaseException], ...] = ()

    @property
    def next_group_no(self) -> int:
        """The number the next append takes."""
        raise NotImplementedError

    def append(self, payload: bytes, digest_seq: int, out_digest: bytes) -> int:
        """Append the next group durably (on return it survives a power cut); its number.
        OSError: nothing of it will be read back (the log is as before); LogSyncError: unknown."""
        raise NotImplementedError

    def read_from(self, group_no: int) -> Iterator[Record]:
        """Every group from ``group_no`` on, in order."""
        raise NotImplementedError

    def truncate_before(self, group_no: int) -> None:
        """Groups before ``group_no`` are held elsewhere (a checkpoint): their space may go."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _records(f, first: int, salt: bytes, size: int) -> Iterator[tuple[int, int, tuple, bytes]]:
    """(position, group_no, header fields, payload) of each valid record of a live segment from
    its start, in order, up to its end; LogError if a damaged record has a valid one after it
    (each append is synced before the next: only the very last can be torn)."""
    pos, expected = 0, first
    while pos + HEADER.size <= size:
        f.seek(pos)
        head = f.read(HEADER.size)
        fields = unpack_header(head, salt)
        if fields is None or fields[0] != expected or pos + HEADER.size + fields[1] > size:
            return
        payload = f.read(fields[1])
        if not record_ok(head, payload, fields[2]):
            after = pos + HEADER.size + fields[1]
            f.seek(after)
            nxt = unpack_header(f.read(HEADER.size), salt)
            if nxt is not None and nxt[0] == expected + 1 and after + HEADER.size + nxt[1] <= size:
                if record_ok(_at(f, after), f.read(nxt[1]), nxt[2]):
                    raise LogError(f"group {expected} of the log is damaged and later groups "
                                   "follow it")
            return
        yield pos, expected, fields, payload
        pos += HEADER.size + fields[1]
        expected += 1


def _at(f, pos: int) -> bytes:
    """The header at ``pos`` (the file left after it)."""
    f.seek(pos)
    return f.read(HEADER.size)


def segment_end(path: str, first: int, salt: bytes, size: int) -> tuple[int, int | None]:
    """(bytes of valid records, the last valid group number or None) of a live segment."""
    end, last = 0, None
    with open(path, "rb") as f:
        for pos, group_no, fields, _ in _records(f, first, salt, size):
            end, last = pos + HEADER.size + fields[1], group_no
    return end, last


def live_segments(folder: str) -> list[tuple[str, int, bytes]]:
    """(path, first group, salt) of the live segments in ``folder``, in order."""
    if not os.path.isdir(folder):
        return []
    found = [(os.path.join(folder, name), int(m.group(1)), bytes.fromhex(m.group(2)))
             for name in os.listdir(folder) if (m := _LIVE.match(name))]
    return sorted(found, key=lambda s: s[1])


def last_group_no(folder: str) -> int:
    """The last group the log in ``folder`` holds (0: none), read without opening it for
    writing (beside a live writer: a moment's view; a segment recycled under the read is
    skipped, its groups being checkpointed)."""
    last = 0
    for path, first, salt in live_segments(folder):
        if last and first != last + 1:
            break
        try:
            _, end = segment_end(path, first, salt, os.path.getsize(path))
        except FileNotFoundError:
            continue
        if end is None:
            break
        last = end
    return last


class LogView(GroupLog):
    """The log of a folder as it is now, read-only, beside its writer or with none (a backup
    catches up from it): the groups up to the end found at open."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._end = last_group_no(folder)

    @property
    def next_group_no(self) -> int:
        return self._end + 1

    def append(self, payload: bytes, digest_seq: int, out_digest: bytes) -> int:
        raise LogError("a view of a log is read-only")

    def read_from(self, group_no: int) -> Iterator[Record]:
        expected = group_no
        for path, first, salt in live_segments(self.folder):
            if expected > self._end:
                return
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # recycled under us: the writer checkpointed past it
                continue
            with f:
                for _, g, fields, payload in _records(f, first, salt, os.fstat(f.fileno()).st_size):
                    if g < expected:
                        continue
                    if g != expected or g > self._end:
                        break
                    yield Record(g, fields[3], fields[4], payload)
                    expected += 1
        if expected <= self._end:
            raise LogError(f"group {expected} is no longer in the log (recycled while read)")

    def truncate_before(self, group_no: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Segment:
    __slots__ = ("path", "first", "salt", "size", "fd", "end")

    def __init__(self, path: str, first: int, salt: bytes, size: int) -> None:
        self.path, self.first, self.salt, self.size = path, first, salt, size
        self.fd = -1
        self.end = 0       # bytes of valid records


class SegmentLog(GroupLog):
    """The log in preallocated segment files of one folder (see the module's docstring)."""

    def __init__(self, folder: str, first_group_no: int,
                 segment_bytes: int = SEGMENT_BYTES_DEFAULT, sync: bool = True) -> None:
        """Open the log in ``folder`` (made if missing). ``first_group_no``: the first group the
        caller still needs (the one after its checkpoint); the log must hold every group from
        there on that it holds at all. ``sync=False`` (benchmarks, --no-sync) skips the
        fdatasync: not durable."""
        assert segment_bytes >= SEGMENT_BYTES_MIN
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.sync = sync
        if not os.path.isdir(folder):
            os.makedirs(folder)
            fsync_dir(os.path.dirname(os.path.abspath(folder)))  # the folder's own name
        self._lock = threading.Lock()     # the spare list, shared with the preallocator
        self._spare_ready = threading.Condition(self._lock)
        self._spares: list[str] = []
        self._spare_no = 0
        self._closing = False
        self._segments: list[_Segment] = []
        self._scan(first_group_no)
        self._prealloc = threading.Thread(target=self._preallocate, name="log-prealloc",
                                          daemon=True)
        self._prealloc.start()

    # ---- opening ----------------------------------------------------------------

    def _scan(self, first_group_no: int) -> None:
        """Find the live segments and where the log ends; recycle segments wholly before
        ``first_group_no``. A live segment past the end holding a valid record means answered
        groups are missing: LogError (the files are kept)."""
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.endswith(".tmp"):    # a preallocation a stop interrupted
                os.unlink(path)
            elif (m := _SPARE.match(name)):
                self._spares.append(path)
                self._spare_no = max(self._spare_no, int(m.group(1)) + 1)
        live = [_Segment(path, first, salt, os.path.getsize(path))
                for path, first, salt in live_segments(self.folder)]
        expected = None
        kept: list[_Segment] = []
        for k, seg in enumerate(live):
            end, last = segment_end(seg.path, seg.first, seg.salt, seg.size)
            gap = expected is not None and seg.first != expected
            if last is None or gap:
                # The end of the log: a segment made live whose first append never landed (it
                # and any after it hold nothing), unless one of them holds groups: then some
                # answered groups before them are gone.
                for later in live[k:]:
                    held = last if later is seg else segment_end(
                        later.path, later.first, later.salt, later.size)[1]
                    if held is not None:
                        raise LogError(f"{later.path} holds groups past the end of the log at "
                                       f"group {(expected or first_group_no) - 1}")
                for later in live[k:]:
                    os.unlink(later.path)
                break
            seg.end = end
            kept.append(seg)
            expected = last + 1
        # drop whole segments the caller no longer needs (all their groups are checkpointed)
        while len(kept) > 1 and kept[1].first <= first_group_no:
            self._retire(kept.pop(0).path)
        if kept and expected is not None and expected < first_group_no:
            for seg in kept:       # every group it holds is checkpointed
                self._retire(seg.path)
            kept = []
        if kept and kept[0].first > first_group_no:
            raise LogError(f"the log starts at group {kept[0].first}, but the ledger needs "
                           f"group {first_group_no} next: groups are missing")
        self._segments = kept
        self._next = expected if kept else first_group_no
        for seg in kept:
            seg.fd = os.open(seg.path, os.O_RDWR)

    # ---- the interface -------------------------------------------------------------

    @property
    def next_group_no(self) -> int:
        return self._next

    def append(self, payload: bytes, digest_seq: int, out_digest: bytes) -> int:
        group_no = self._next
        seg = self._segments[-1] if self._segments else None
        size = HEADER.size + len(payload)
        if seg is None or seg.end + size > seg.size:
            seg = self._start_segment(group_no, size)
        rec = pack_record(group_no, payload, digest_seq, out_digest, seg.salt)
        written = os.pwrite(seg.fd, rec, seg.end)
        if written != len(rec):
            raise OSError(f"short write to the log ({written} of {len(rec)} bytes)")
        if self.sync:
            try:
                os.fdatasync(seg.fd)
            except OSError as exc:
                raise LogSyncError(f"fdatasync of the log failed: {exc}") from exc
        seg.end += len(rec)
        self._next = group_no + 1
        return group_no

    def read_from(self, group_no: int) -> Iterator[Record]:
        expected = group_no
        segments = self._segments
        for k, seg in enumerate(segments):
            if k + 1 < len(segments) and segments[k + 1].first <= group_no:
                continue  # wholly before the groups asked for
            with open(seg.path, "rb") as f:
                for pos, g, fields, payload in _records(f, seg.first, seg.salt, seg.end):
                    if g < expected:
                        continue
                    if g != expected:
                        raise LogError(f"the log jumps from group {expected} to {g}")
                    yield Record(g, fields[3], fields[4], payload)
                    expected += 1
        if group_no < self._next and expected != self._next:
            raise LogError(f"the log holds groups to {self._next - 1} but reads end at "
                           f"{expected - 1}")

    def truncate_before(self, group_no: int) -> None:
        """Recycle every segment whose groups are all before ``group_no`` (never the last)."""
        while len(self._segments) > 1 and self._segments[1].first <= group_no:
            seg = self._segments.pop(0)
            os.close(seg.fd)
            self._retire(seg.path)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._spare_ready.notify_all()
        self._prealloc.join()
        for seg in self._segments:
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1

    # ---- segments ------------------------------------------------------------------

    def _start_segment(self, first: int, record_bytes: int) -> _Segment:
        """The next live segment, named for its first group and a new salt, durable as such
        before the first append into it: a spare when one is ready (made at once only when
        none is). A last segment nothing landed in (its first append was refused) goes first."""
        if self._segments and self._segments[-1].end == 0:
            dead = self._segments.pop()
            os.close(dead.fd)
            os.unlink(dead.path)
        size = self.segment_bytes
        path = None
        if record_bytes <= size:
            with self._lock:
                if self._spares:
                    path = self._spares.pop()
                self._spare_ready.notify_all()   # the preallocator makes the next one
        if path is None:      # no spare, or a record larger than a segment: made here
            size = max(size, -(-record_bytes // len(ZERO_CHUNK)) * len(ZERO_CHUNK))
            path = self._make(os.path.join(self.folder, f"new-{first}.tmp"), size)
        salt = os.urandom(8)
        live = os.path.join(self.folder, f"seg-{first:020d}-{salt.hex()}.log")
        os.rename(path, live)
        fsync_dir(self.folder)
        seg = _Segment(live, first, salt, os.path.getsize(live))
        seg.fd = os.open(live, os.O_RDWR)
        self._segments.append(seg)
        return seg

    def _make(self, path: str, size: int) -> str:
        """A file of ``size`` real zeros, synced (removed again if it cannot be made)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = size
            while left:
                left -= os.write(fd, ZERO_CHUNK[:min(left, len(ZERO_CHUNK))])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path

    def _retire(self, path: str) -> None:
        """A segment no longer needed becomes a spare (or goes, past SPARES_MAX or if odd-sized)."""
        assert all(seg.path != path for seg in self._segments), "a live segment is never retired"
        with self._lock:
            if len(self._spares) < SPARES_MAX and os.path.getsize(path) == self.segment_bytes:
                spare = os.path.join(self.folder, f"spare-{self._spare_no}.log")
                self._spare_no += 1
                os.rename(path, spare)
                self._spares.append(spare)
                return
        os.unlink(path)

    def _preallocate(self) -> None:
        """Keep one spare ready, so an append that fills a segment never writes 16 MiB of zeros;
        after a failure (a full disk) it tries again a second later."""
        while True:
            with self._lock:
                while self._spares and not self._closing:
                    self._spare_ready.wait()
                if self._closing:
                    return
                name = os.path.join(self.folder, f"spare-{self._spare_no}.log")
                self._spare_no += 1
            try:
                self._make(name + ".tmp", self.segment_bytes)
                os.rename(name + ".tmp", name)
            except OSError as exc:
                log.error("cannot preallocate a log segment: %s", exc)
                with self._lock:
                    if not self._closing:
                        self._spare_ready.wait(PREALLOC_RETRY_S)
                continue
            with self._lock:
                self._spares.append(name)
