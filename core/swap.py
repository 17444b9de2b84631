"""Putting a rebuilt ledger folder in place of the live one, safe across a crash at any point.

A migration and a restore each build the new ledger in a folder beside the
live one, verify it and make it durable, then mark it ready (a file, fsynced)
and swap: the live folder is renamed aside, the new one into its place, the
mark removed. A crash between the two renames leaves no ledger at the live
path; ``recover``, run before anything opens the ledger (the server's start,
``migrate``, ``restore``), finishes the swap: the new folder was marked ready
before the first rename, so it always can. It never puts an older folder back
by itself (a ``ledger.v1`` kept after a migration is not the ledger to serve);
``missing`` tells the server to refuse to start, rather than create an empty
ledger, when the live folder is gone but such siblings are there.
"""
from __future__ import annotations

import glob
import logging
import os

log = logging.getLogger("cardcore.swap")

READY = "SWAP-READY"
# (the folder a new ledger is built in, where the live one is kept), as suffixes of its path
PAIRS = ((".v2-migrating", ".v1"), (".restoring", ".replaced"))


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a create, a rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_ready(folder: str) -> None:
    """The new ledger in ``folder`` is whole and durable: a swap may finish on its own."""
    path = os.path.join(folder, READY)
    with open(path, "w") as f:
        f.write("verified and synced; swap it in\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def swap_in(new: str, dest: str, keep: str) -> None:
    """``new`` (marked ready) takes the place of ``dest``, which is kept as ``keep``."""
    assert os.path.exists(os.path.join(new, READY)), "swap_in needs a folder marked ready"
    parent = os.path.dirname(os.path.abspath(dest))
    if os.path.exists(dest):
        os.rename(dest, keep)
    os.rename(new, dest)
    fsync_dir(parent)
    os.unlink(os.path.join(dest, READY))
    fsync_dir(dest)


def recover(dest: str) -> str | None:
    """Finish or undo a swap that stopped midway at ``dest``; say what was done (None: nothing)."""
    dest = dest.rstrip("/")
    if os.path.exists(os.path.join(dest, "data.mdb")):
        if os.path.exists(os.path.join(dest, READY)):  # stopped after the second rename
            os.unlink(os.path.join(dest, READY))
            return "finished a swap"
        return None
    for new_suffix, keep_suffix in PAIRS:
        new = dest + new_suffix
        if os.path.exists(os.path.join(new, READY)):
            if os.path.exists(dest):
                os.rmdir(dest)  # an empty folder a failed start may have made
            os.rename(new, dest)
            os.unlink(os.path.join(dest, READY))
            fsync_dir(os.path.dirname(os.path.abspath(dest)))
            log.warning("finished swapping %s in at %s (a stop interrupted it)", new, dest)
            return "finished a swap"
    return None


def missing(dest: str) -> list[str]:
    """Ledger folders beside ``dest`` when ``dest`` itself holds none: a server must not start
    an empty ledger there, and nothing here can tell which of them is the one to serve."""
    dest = dest.rstrip("/")
    if os.path.exists(os.path.join(dest, "data.mdb")):
        return []
    return sorted(p for new, keep in PAIRS for suffix in (new, keep)
                  for p in glob.glob(glob.escape(dest + suffix) + "*")
                  if os.path.exists(os.path.join(p, "data.mdb")))
