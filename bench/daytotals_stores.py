"""What stores' own business days cost the day totals, in-process (no server, no fsync):

    .venv/bin/python bench/daytotals_stores.py [--base REV] [--reps 60] [--rounds 5]

One group of 1,000 purchases at 199 stores (one time, the C loop's run) added and made into
records in a write transaction then aborted, the median of ``--reps`` per round, the median of
the rounds: with no store registered, and with every store registered with a business day of its
own (each store's settings read in one getmulti, one day per store). ``--base REV``: also
core/daytotals.py as it was at git revision REV (before stores), over its own C loop (built from
the revision: ``base_extension``), on the same ledger.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from cardcore import daytotals, stores
from cardcore import layout as L
from cardcore.ledger import Ledger

HERE = os.path.dirname(os.path.abspath(__file__))
TS_US = 1_796_000_000_000_000
STORES, ENTRIES, CARDS = 199, 1_000, 5_000


def group(rng: random.Random) -> list[bytes]:
    out = []
    for k in range(ENTRIES):
        dp = -rng.randrange(100, 20_000)
        out.append(L.JOURNAL.pack(
            L.JOURNAL_VERSION, L.OP_PURCHASE, 0, 1, 0, 0, 0, k + 1,
            rng.randrange(CARDS).to_bytes(16, "little"), -dp, 0, dp, 0, 10, 10**6, 0, 0, TS_US,
            rng.randrange(1, STORES + 1), 0, 0, 0, bytes(8), 1, 0, bytes(3), 0, 0, 0, 0, 0, 0,
            bytes(48), bytes(32)))
    return out


def timed(ledger, module, entries, reps: int) -> float:
    times = []
    for _ in range(reps):
        with ledger.env.begin(write=True) as txn:
            t0 = time.perf_counter()
            totals = module.DayTotals(txn, ledger, {})
            totals.add_all(entries)
            totals.records()
            times.append(time.perf_counter() - t0)
            txn.abort()
    return statistics.median(times) * 1e3


def base_module(rev: str, file: str = "core/daytotals.py"):
    """Revision ``rev``'s ``file`` (or, when ``rev`` is a file, that file) loaded as a module
    beside this tree's: an A/B in one process."""
    if os.path.isfile(rev):
        with open(rev, encoding="utf-8") as f:
            source = f.read()
    else:
        source = subprocess.run(["git", "show", f"{rev}:{file}"], cwd=os.path.dirname(HERE),
                                capture_output=True, text=True, check=True).stdout
    name = os.path.basename(file)[:-3] + "_base"
    path = os.path.join(tempfile.mkdtemp(), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_extension(rev: str, name: str):
    """Revision ``rev``'s C loop ``ext/NAME.pyx`` (with the ext/*.pxd and *.h it may cimport),
    built with setup.py's flags and loaded beside this tree's: a base's Python over its own C
    (``base_module``'s ``native``). Built once per revision's ext/ folder (a cache in the temp
    folder, named by its git tree)."""
    from Cython.Build import cythonize  # (the build's tools: only a run with a base needs them)
    from setuptools import Distribution, Extension

    root = os.path.dirname(HERE)

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                              check=True).stdout

    tree = git("rev-parse", f"{rev}:ext").strip()
    folder = os.path.join(tempfile.gettempdir(), "cardcore-base-ext", tree)
    os.makedirs(folder, exist_ok=True)
    built = [f for f in os.listdir(folder) if f.startswith(name + ".") and f.endswith(".so")]
    if not built:
        for path in git("ls-tree", "--name-only", rev, "ext/").split():
            if path.endswith((".pxd", ".h")) or path == f"ext/{name}.pyx":
                with open(os.path.join(folder, os.path.basename(path)), "w") as f:
                    f.write(git("show", f"{rev}:{path}"))
        ext = Extension(name, [os.path.join(folder, name + ".pyx")], include_dirs=[folder],
                        extra_compile_args=["-O2"])
        dist = Distribution({"ext_modules": cythonize([ext], include_path=[folder], quiet=True,
                                                      compiler_directives={"language_level": "3"})})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = cmd.build_temp = folder
        cmd.ensure_finalized()
        cmd.run()
        built = [os.path.relpath(cmd.get_ext_fullpath(name), folder)]
    path = os.path.join(folder, built[0])
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        name, path, loader=loader))
    loader.exec_module(module)
    return module


def base_daytotals(rev: str):
    """Revision ``rev``'s core/daytotals.py over its own C loop (``base_extension``): a base
    whose Python calls ext/daytotals.pyx as it was. A file (no revision to build the C from):
    over this tree's C loop."""
    module = base_module(rev)
    if not os.path.isfile(rev):
        module.native = base_extension(rev, "daytotals")
        module._index_run = module.native.index_run
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="a git revision whose core/daytotals.py to time too")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(3)
    entries = group(rng)
    base = base_daytotals(args.base) if args.base else None
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(os.path.join(tmp, "ledger"), sync=False)
        try:
            for phase in ("no store registered", "every store with its own day"):
                if phase != "no store registered":
                    with ledger.env.begin(write=True) as txn:
                        for s in range(1, STORES + 1):
                            day = (rng.choice((480, 540, -300)), 4)
                            txn.put(L.TERMINAL_KEY.pack(s),
                                    stores.store_record(s, f"s{s}", 0, day, 0, 0),
                                    db=ledger.chain_stores)
                for _ in range(args.rounds):
                    rows.setdefault(f"this tree, {phase}", []).append(
                        timed(ledger, daytotals, entries, args.reps))
                    if base is not None:
                        rows.setdefault(f"{args.base}, {phase}", []).append(
                            timed(ledger, base, entries, args.reps))
        finally:
            ledger.close()
    for name, r in rows.items():
        print(f"{name:48s} {statistics.median(r):6.3f} ms per {ENTRIES:,}-entry group")
    return 0


if __name__ == "__main__":
    sys.exit(main())
