"""The group log: each group's input, made durable before its callers are answered.

The writer appends every group it applies (the bytes of ``cardcore.groups.encode_group``: the
group's time and its operations) and makes the append durable with one ``fdatasync``; LMDB is
brought up to date from it and committed with sync only at checkpoints (``cardcore.durable``).
The log is an interface, ``GroupLog``, because the cluster puts a replicated stream behind the
same three calls: append a group durably, read from a group number, drop what a checkpoint holds.

``SegmentLog`` keeps it in preallocated segment files in one folder (inside the ledger's folder,
so a migration's or restore's swap carries it with the ledger it belongs to)::

    seg-<first group_no, 20 digits>.log   a live segment: records one after another, then
                                          whatever the file held before (zeros, or a recycled
                                          segment's older records)
    spare-<n>.log                         a segment ready to be reused (its content is stale)

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
     56   8  reserved     zero

Reading stops at the first record that is not the next group (a torn or never-written tail, a
zeroed or recycled region): the log is every group up to there. Recycled segments are safe to
overwrite because their records' group numbers are all below the ones that follow the
checkpoint.

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
ZERO_CHUNK = bytes(1 << 20)
_LIVE = re.compile(r"seg-(\d{20})\.log$")
_SPARE = re.compile(r"spare-(\d+)\.log$")


class LogError(Exception):
    """The log cannot be used as it is (a gap, a record that does not continue the ledger)."""


class LogSyncError(Exception):
    """An append's fdatasync failed: whether the group is durable is unknown (the log is not
    to be used again by this process; a restart reads what landed)."""


class Record(NamedTuple):
    group_no: int
    digest_seq: int
    out_digest: bytes
    payload: bytes


def pack_record(group_no: int, payload: bytes, digest_seq: int = 0,
                out_digest: bytes = bytes(16), shard: int = 0, epoch: int = 0) -> bytes:
    """One record: header and payload, its crc filled in."""
    assert group_no >= 1 and len(out_digest) == 16 and len(payload) <= RECORD_BYTES_MAX
    head = bytearray(HEADER.pack(MAGIC, VERSION, shard, epoch, group_no, len(payload), 0,
                                 digest_seq, out_digest, bytes(8)))
    crc = zlib.crc32(payload, zlib.crc32(head))
    struct.pack_into("<I", head, CRC_OFFSET, crc)
    return bytes(head) + payload


def unpack_header(head: bytes) -> tuple | None:
    """(group_no, payload_len, crc, digest_seq, out_digest), or None if it is not a header."""
    magic, version, _shard, _epoch, group_no, n, crc, digest_seq, digest, _ = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or n > RECORD_BYTES_MAX:
        return None
    return group_no, n, crc, digest_seq, digest


def record_ok(head: bytes, payload: bytes, crc: int) -> bool:
    zeroed = head[:CRC_OFFSET] + bytes(4) + head[CRC_OFFSET + 4:]
    return zlib.crc32(payload, zlib.crc32(zeroed)) == crc


class GroupLog:
    """What the writer needs of a log; the cluster implements it over a replicated stream."""

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


def segment_end(path: str, first: int, size: int) -> tuple[int, int | None]:
    """(bytes of valid records, the last valid group number or None) of a live segment."""
    pos, last, expected = 0, None, first
    with open(path, "rb") as f:
        while pos + HEADER.size <= size:
            f.seek(pos)
            head = f.read(HEADER.size)
            fields = unpack_header(head)
            if fields is None or fields[0] != expected or pos + HEADER.size + fields[1] > size:
                break
            payload = f.read(fields[1])
            if len(payload) != fields[1] or not record_ok(head, payload, fields[2]):
                break
            last, expected = expected, expected + 1
            pos += HEADER.size + fields[1]
    return pos, last


def live_segments(folder: str) -> list[tuple[str, int]]:
    """(path, first group) of the live segments in ``folder``, in order."""
    if not os.path.isdir(folder):
        return []
    found = [(os.path.join(folder, name), int(m.group(1)))
             for name in os.listdir(folder) if (m := _LIVE.match(name))]
    return sorted(found, key=lambda s: s[1])


def last_group_no(folder: str) -> int:
    """The last group the log in ``folder`` holds (0: none), read without opening it for
    writing (beside a live writer: a moment's view)."""
    last = 0
    for path, first in live_segments(folder):
        if last and first != last + 1:
            break
        try:
            _, end = segment_end(path, first, os.path.getsize(path))
        except FileNotFoundError:  # recycled under us
            break
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
        for path, _first in live_segments(self.folder):
            if expected > self._end:
                return
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # recycled under us: the writer checkpointed past it
                continue
            with f:
                pos = 0
                while expected <= self._end:
                    f.seek(pos)
                    head = f.read(HEADER.size)
                    fields = unpack_header(head) if len(head) == HEADER.size else None
                    if fields is None:
                        break
                    g, n, crc, digest_seq, digest = fields
                    payload = f.read(n)
                    if g < expected:
                        pos += HEADER.size + n
                        continue
                    if g != expected or len(payload) != n or not record_ok(head, payload, crc):
                        break
                    yield Record(g, digest_seq, digest, payload)
                    expected += 1
                    pos += HEADER.size + n
        if expected <= self._end:
            raise LogError(f"group {expected} is no longer in the log (recycled while read)")

    def truncate_before(self, group_no: int) -> None:
        pass

    def close(self) -> None:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Segment:
    __slots__ = ("path", "first", "size", "fd", "end")

    def __init__(self, path: str, first: int, size: int) -> None:
        self.path, self.first, self.size = path, first, size
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
        os.makedirs(folder, exist_ok=True)
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
        ``first_group_no``."""
        live = []
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            m = _LIVE.match(name)
            if m:
                live.append(_Segment(path, int(m.group(1)), os.path.getsize(path)))
            elif name.endswith(".tmp"):    # a preallocation a stop interrupted
                os.unlink(path)
            elif _SPARE.match(name):
                self._spares.append(path)
                self._spare_no = max(self._spare_no, int(_SPARE.match(name).group(1)) + 1)
        live.sort(key=lambda s: s.first)
        expected = None
        kept: list[_Segment] = []
        for seg in live:
            if expected is not None and seg.first != expected:
                break  # a segment after the end of the log (its first append never landed)
            end, last = segment_end(seg.path, seg.first, seg.size)
            if last is None:  # a segment made live whose first record never landed
                break
            seg.end = end
            kept.append(seg)
            expected = last + 1
        for seg in live[len(kept):]:
            self._retire(seg.path)
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
        rec = pack_record(group_no, payload, digest_seq, out_digest)
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.end + len(rec) > seg.size:
            seg = self._start_segment(group_no, len(rec))
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
            pos = 0
            while pos < seg.end:
                head = os.pread(seg.fd, HEADER.size, pos)
                g, n, crc, digest_seq, digest = unpack_header(head)
                payload = os.pread(seg.fd, n, pos + HEADER.size)
                if not record_ok(head, payload, crc):
                    raise LogError(f"group {g} of the log does not match its checksum")
                pos += HEADER.size + n
                if g < expected:
                    continue
                if g != expected:
                    raise LogError(f"the log jumps from group {expected} to {g}")
                yield Record(g, digest_seq, digest, payload)
                expected += 1

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
        """The next live segment, named for its first group and durable as such before the
        first append into it: a spare when one is ready (made at once only when none is)."""
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
        live = os.path.join(self.folder, f"seg-{first:020d}.log")
        os.rename(path, live)
        _fsync_dir(self.folder)
        seg = _Segment(live, first, os.path.getsize(live))
        seg.fd = os.open(live, os.O_RDWR)
        self._segments.append(seg)
        return seg

    def _make(self, path: str, size: int) -> str:
        """A file of ``size`` real zeros, synced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = size
            while left:
                left -= os.write(fd, ZERO_CHUNK[:min(left, len(ZERO_CHUNK))])
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _retire(self, path: str) -> None:
        """A segment no longer needed becomes a spare (or goes, past SPARES_MAX or if odd-sized)."""
        with self._lock:
            if len(self._spares) < SPARES_MAX and os.path.getsize(path) == self.segment_bytes:
                spare = os.path.join(self.folder, f"spare-{self._spare_no}.log")
                self._spare_no += 1
                os.rename(path, spare)
                self._spares.append(spare)
                return
        os.unlink(path)

    def _preallocate(self) -> None:
        """Keep one spare ready, so an append that fills a segment never writes 16 MiB of zeros."""
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
            except OSError as exc:  # a full disk: the append makes its own, and says so then
                log.error("cannot preallocate a log segment: %s", exc)
                return
            with self._lock:
                self._spares.append(name)
