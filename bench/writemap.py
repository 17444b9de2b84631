"""A checkpoint's cost on py-lmdb alone, with and without LMDB's writable map (``serve
--lmdb-writemap``), alternating rounds in one run:

    .venv/bin/python bench/writemap.py [--cards 100000] [--groups 10] [--group-ops 2000]
                                       [--rounds 6] [--out bench/writemap_results.json]

The writer's pattern: ``--cards`` 128-byte records; each round opens one write transaction
(the span), rewrites ``--groups`` groups of ``--group-ops`` random records in it and commits with
sync (the checkpoint). Per round and mode: CPU µs per record written (process time, so the wait
for the disk is left out) split into the puts and the commit, the commit's wall ms, and the
process's minor page faults. With writemap the puts write into the map (each page's first
write in a span takes a fault: msync left it clean and write-protected), the commit copies
nothing; without it the puts fill malloc'd pages and the commit writes each into the file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import struct
import tempfile
import time

import lmdb

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD_BYTES = 128


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def one_round(env, keys: list[bytes], rng: random.Random, groups: int, group_ops: int) -> dict:
    f0, c0 = faults(), time.process_time()
    txn = env.begin(write=True)
    for _ in range(groups):
        for key in rng.sample(keys, group_ops):
            txn.put(key, os.urandom(RECORD_BYTES))
    c1, t1 = time.process_time(), time.perf_counter()
    txn.commit()
    c2, f2, t2 = time.process_time(), faults(), time.perf_counter()
    n = groups * group_ops
    return {"put_cpu_us_per_record": round((c1 - c0) / n * 1e6, 2),
            "commit_cpu_us_per_record": round((c2 - c1) / n * 1e6, 2),
            "commit_wall_ms": round((t2 - t1) * 1e3, 1),
            "faults_per_record": round((f2 - f0) / n, 2),
            "last_pgno": env.info()["last_pgno"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cards", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--group-ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "writemap_results.json"))
    args = ap.parse_args()
    rng = random.Random(1)
    keys = [struct.pack(">QQ", rng.getrandbits(64), i) for i in range(args.cards)]
    rows: dict[str, list] = {"plain": [], "writemap": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        envs = {}
        for mode in rows:
            envs[mode] = lmdb.open(os.path.join(tmp, mode), map_size=1 << 30, sync=True,
                                   metasync=True, writemap=mode == "writemap", readahead=False)
            with envs[mode].begin(write=True) as txn:
                for k in keys:
                    txn.put(k, bytes(RECORD_BYTES))
        for k in range(args.rounds):
            for mode in (("plain", "writemap") if k % 2 == 0 else ("writemap", "plain")):
                rows[mode].append(one_round(envs[mode], keys, rng, args.groups, args.group_ops))
                print(f"round {k + 1} {mode:8s} {rows[mode][-1]}", flush=True)
    med = {m: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for m, rs in rows.items()}
    cpu = {m: med[m]["put_cpu_us_per_record"] + med[m]["commit_cpu_us_per_record"] for m in med}
    result = {"args": vars(args), "rounds": rows, "median": med,
              "cpu_ratio_writemap_plain": round(cpu["writemap"] / cpu["plain"], 2)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for m in med:
        print(f"{m:8s} median: {med[m]}")
    print(f"CPU per record (puts + commit), writemap / plain: {result['cpu_ratio_writemap_plain']}x")


if __name__ == "__main__":
    main()
