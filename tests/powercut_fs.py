"""A FUSE filesystem for power-cut tests: it passes everything through to a backing folder,
but holds each file's writes in memory until an fsync/fdatasync of that file, so that
"cutting the power" loses exactly what a real machine could lose.

kill -9 keeps the page cache, so a missing or misordered fsync passes every kill -9 test;
here the page cache is this process's memory, and the power cut drops it.

Model (what is durable when):
- a write is durable once an fsync or fdatasync of its file follows it (any descriptor of
  that file; a write through a descriptor opened O_SYNC/O_DSYNC counts too, since the kernel
  sends an fsync after it). The fsync makes every earlier write of the file durable at once.
- metadata (create, unlink, rename, mkdir, rmdir, truncate, chmod, utimens) goes to the
  backing folder at once: it is durable without a directory fsync. Not tested here.
- reads see the newest data (the pending writes merged over the backing file), so a
  program that maps its files (LMDB) reads what it wrote, as on a real machine.

The power cut: the test writes ``cut`` on this process's stdin (or closes it). Mode
``lose`` drops every pending write; mode ``prefix`` (harsher, a disk writing its cache in
order until the lights go out) keeps a random prefix of each file's pending writes, in
the order they were made. Then the process exits at once, leaving a dead mount for the test
to unmount (``fusermount3 -uz``); remounting gives a fresh kernel cache over the backing folder.

Run: ``python tests/powercut_fs.py BACKING MOUNTPOINT --mode lose|prefix --seed N``;
it prints ``ready`` when mounted and ``cut N`` (writes lost) when cutting.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import random
import struct
import sys
import threading

import mfusepy as fuse

PAGE_BYTES = 4096
_FLOCK = "hh4xqqi4x"  # struct flock on Linux x86-64/arm64: type, whence, start, len, pid
_OFD = {fcntl.F_GETLK: 36, fcntl.F_SETLK: 37, fcntl.F_SETLKW: 38}  # F_OFD_GETLK/SETLK/SETLKW
# Only these open flags reach the backing file: the kernel handles append and the rest, and
# every backing descriptor is read-write so a write can read the page it lands on.
_OPEN_FLAGS_DROPPED = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_ACCMODE


class _Pending:
    """A file's writes since its last fsync: in order (for a prefix cut) and merged by page
    (for reads). ``size_bytes`` is the file's size as its readers see it."""

    def __init__(self, size_bytes: int):
        self.writes: list[tuple[int, bytes]] = []
        self.pages: dict[int, bytearray] = {}
        self.size_bytes = size_bytes


class PowerCutFS(fuse.Operations):
    """Passthrough over ``backing``; file writes wait in memory for their fsync."""

    use_ns = True  # times in integer nanoseconds

    def __init__(self, backing: str, mode: str, rng: random.Random):
        self.backing = os.path.realpath(backing)
        self.mode = mode
        self.rng = rng
        self.mutex = threading.Lock()  # one callback at a time: simple, and the cut is atomic
        self.pending: dict[str, _Pending] = {}  # by path inside the mount
        self.owner_fds: dict[tuple[str, int], int] = {}  # (path, lock owner) -> descriptor

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    # -- files: the part that models the page cache ------------------------------------------

    def _load_page(self, fd: int, page_no: int) -> bytearray:
        data = os.pread(fd, PAGE_BYTES, page_no * PAGE_BYTES)
        return bytearray(data.ljust(PAGE_BYTES, b"\0"))

    def write(self, path, data, offset, fi):
        fh = fi.fh
        with self.mutex:
            p = self.pending.get(path)
            if p is None:
                p = self.pending[path] = _Pending(os.fstat(fh).st_size)
            data = bytes(data)
            p.writes.append((offset, data))
            end = offset + len(data)
            at = offset
            while at < end:
                page_no, start = divmod(at, PAGE_BYTES)
                n = min(PAGE_BYTES - start, end - at)
                page = p.pages.get(page_no)
                if page is None:
                    page = p.pages[page_no] = self._load_page(fh, page_no)
                    # Backing bytes past the size readers see are stale (a pending shrink).
                    keep = max(0, p.size_bytes - page_no * PAGE_BYTES)
                    if keep < PAGE_BYTES:
                        page[keep:] = bytes(PAGE_BYTES - keep)
                page[start:start + n] = data[at - offset:at - offset + n]
                at += n
            p.size_bytes = max(p.size_bytes, end)
            return len(data)

    def read(self, path, size, offset, fi):
        fh = fi.fh
        with self.mutex:
            p = self.pending.get(path)
            if p is None:
                return os.pread(fh, size, offset)
            size = max(0, min(size, p.size_bytes - offset))
            out = bytearray(os.pread(fh, size, offset).ljust(size, b"\0"))
            end = offset + size
            at = offset
            while at < end:
                page_no, start = divmod(at, PAGE_BYTES)
                n = min(PAGE_BYTES - start, end - at)
                page = p.pages.get(page_no)
                if page is not None:
                    out[at - offset:at - offset + n] = page[start:start + n]
                at += n
            return bytes(out)

    def fsync(self, path, datasync, fi):
        with self.mutex:
            self._flush(path, fi.fh)
        return 0

    def _flush(self, path: str, fd: int) -> None:
        """Make every pending write of ``path`` durable: the merged pages, then the size."""
        p = self.pending.pop(path, None)
        if p is not None:
            for page_no in sorted(p.pages):
                n = min(PAGE_BYTES, p.size_bytes - page_no * PAGE_BYTES)
                if n > 0:
                    os.pwrite(fd, bytes(p.pages[page_no][:n]), page_no * PAGE_BYTES)
            if os.fstat(fd).st_size < p.size_bytes:
                os.ftruncate(fd, p.size_bytes)
        os.fsync(fd)

    def truncate(self, path, length, fi=None):
        """Applied at once (metadata); pending writes past the new end are cut off."""
        with self.mutex:
            os.truncate(self._real(path), length)
            p = self.pending.get(path)
            if p is not None:
                p.writes = [(o, d[:length - o]) for o, d in p.writes if o < length]
                for page_no in [n for n in p.pages if n * PAGE_BYTES >= length]:
                    del p.pages[page_no]
                last = p.pages.get(length // PAGE_BYTES)
                if last is not None:
                    cut = length % PAGE_BYTES
                    last[cut:] = bytes(PAGE_BYTES - cut)
                p.size_bytes = length
        return 0

    def getattr(self, path, fi=None):
        st = os.lstat(self._real(path))
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid",
                                              "st_size", "st_blocks")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        with self.mutex:
            p = self.pending.get(path)
            if p is not None:
                attrs["st_size"] = p.size_bytes
        return attrs

    def open(self, path, fi):
        fi.fh = os.open(self._real(path), (fi.flags & ~_OPEN_FLAGS_DROPPED) | os.O_RDWR)
        if fi.flags & os.O_TRUNC:
            self.truncate(path, 0)
        return 0

    def create(self, path, mode, fi):
        with self.mutex:
            self.pending.pop(path, None)
            fi.fh = os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        return 0

    def flush(self, path, fi):
        return 0  # close() makes nothing durable; libfuse drops the owner's locks after this

    def release(self, path, fi):
        os.close(fi.fh)  # closing makes nothing durable: pending writes stay pending
        return 0

    def lock(self, path, fi, cmd, lock):
        """POSIX record locks (LMDB's lock file): each lock owner (a process) gets a backing
        descriptor of its own and takes open-file-description locks on it, so two processes'
        locks conflict as they would on a local disk."""
        fl = lock.contents
        key = (path, fi.lock_owner)
        with self.mutex:
            fd = self.owner_fds.get(key)
            if fd is None:
                fd = self.owner_fds[key] = os.open(self._real(path), os.O_RDWR)
        arg = struct.pack(_FLOCK, fl.l_type, fl.l_whence, fl.l_start, fl.l_len, 0)
        try:
            out = fcntl.fcntl(fd, _OFD[cmd], arg)  # F_SETLKW blocks here, GIL released
        except OSError as err:
            raise fuse.FuseOSError(err.errno) from None
        if cmd == fcntl.F_GETLK:
            fl.l_type, fl.l_whence, fl.l_start, fl.l_len, pid = struct.unpack(_FLOCK, out)
            fl.l_pid = max(pid, 0)
        return 0

    def unlink(self, path):
        with self.mutex:
            os.unlink(self._real(path))
            self.pending.pop(path, None)
        return 0

    def rename(self, old, new):
        with self.mutex:
            os.rename(self._real(old), self._real(new))
            self.pending.pop(new, None)
            if old in self.pending:
                self.pending[new] = self.pending.pop(old)
        return 0

    # -- the rest passes straight through ----------------------------------------------------

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._real(path), uid, gid)
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._real(path))
        return 0

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._real(path))

    def fsyncdir(self, path, datasync, fh):
        return 0  # metadata is applied at once (see the module docstring)

    def statfs(self, path):
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                             "f_favail", "f_ffree", "f_files", "f_flag",
                                             "f_frsize", "f_namemax")}

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times) if times else os.utime(self._real(path))
        return 0

    def init(self, path):
        print("ready", flush=True)

    # -- the power cut -----------------------------------------------------------------------

    def cut(self) -> None:
        """Lose what no fsync covered (in ``prefix`` mode keep a random prefix of each file's
        pending writes), then exit at once: no callback runs after this takes the lock."""
        self.mutex.acquire()
        lost = 0
        for path, p in sorted(self.pending.items()):
            keep = self.rng.randint(0, len(p.writes)) if self.mode == "prefix" else 0
            if keep:
                fd = os.open(self._real(path), os.O_WRONLY)
                for offset, data in p.writes[:keep]:
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
                os.close(fd)
            lost += len(p.writes) - keep
        print(f"cut {lost}", flush=True)
        os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--mode", choices=("lose", "prefix"), default="lose")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    fs = PowerCutFS(args.backing, args.mode, random.Random(args.seed))

    def wait_for_cut() -> None:
        for line in sys.stdin:
            if line.strip() == "cut":
                break
        fs.cut()  # "cut", or the test went away: never leave writes half-kept

    threading.Thread(target=wait_for_cut, daemon=True).start()
    # Foreground, threaded; no kernel_cache/direct_io: LMDB maps its file, which needs the page
    # cache, and a fresh mount starts with an empty one.
    fuse.FUSE(fs, args.mountpoint, foreground=True, nothreads=False, raw_fi=True,
              fsname="powercut")


if __name__ == "__main__":
    main()
