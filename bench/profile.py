"""Where the time goes: py-spy samples of the server and its writer process under load.

    .venv/bin/python bench/profile.py [--mode batch|unary|stream|basket|basket-plain]
                                      [--seconds 8] [--native]

Starts cardcore (durable: the group log, sync on) on a temporary folder, seeds ``--cards``
cards, drives one of bench/e2e.py's loads (SubmitBatch of 1,000 from 4 callers, unary Purchase
at 16 in flight, or SwipeStream; ``basket``: bench/programs.py's SubmitBatch of 5-line baskets
with a coupon and points offered, on the supermarket program, ``basket-plain``: its plain
purchases on the same program, the other side of that ratio) and, over the same seconds,
records both processes with
``py-spy record --subprocesses`` (only samples where a thread runs: CPU, not waiting). Prints,
per process, its share of the samples and the functions that take the most: *self* (the leaf
frame: where the CPU is) and *inclusive* (anywhere on the stack: what a part of the code costs
with everything it calls). ``--native`` adds C frames (LMDB, the Cython kernel, gRPC's core).
py-spy is a tool of this command, not of cardcore: it is installed into .venv on first use.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (bench/: the loads, the server start, the seeding)
import programs  # noqa: E402  (bench/programs.py: the supermarket program's baskets)

HERE = os.path.dirname(os.path.abspath(__file__))
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
PROCESS_RE = re.compile(r'process (\d+):"(.*?)";')  # a command line may hold ';', not '";'
FRAME_RE = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")  # "function (file.py:line)"
RATE_HZ = 200
TOP = 20
EVERYWHERE = 0.93  # an inclusive share at or above it: a frame under (nearly) every sample


def ensure_py_spy() -> None:
    if not os.path.exists(PY_SPY):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy>=0.3.14"], check=True)


def role(pid: int, command: str, server_pid: int) -> str:
    if pid == server_pid:
        return "server (gRPC)"
    if "writer_proc import child_main" in command or (  # (before 2026-12-01: spawn's)
            "spawn_main" in command and "resource_tracker" not in command):
        return "writer"
    return "other"


def frame_name(frame: str) -> str:
    """``function (file)`` with the folder and line left out: the same function on different
    lines is one row."""
    m = FRAME_RE.match(frame)
    if not m:
        return frame
    function, path = m.groups()
    return f"{function} ({os.path.basename(path)})"


def summarise(raw_path: str, server_pid: int, top: int) -> dict:
    """Per process: samples, self and inclusive time by function (shares of that process's
    samples) from py-spy's raw (collapsed stacks) output."""
    procs: dict[str, dict] = {}
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            name, at = "server (gRPC)", 0
            while m := PROCESS_RE.match(stack, at):  # a child's frames follow its parent's
                name, at = role(int(m.group(1)), m.group(2), server_pid), m.end()
            frames = stack[at:].split(";")
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            p = procs.setdefault(name, {"samples": 0, "self": collections.Counter(),
                                        "inclusive": collections.Counter()})
            n = int(count)
            p["samples"] += n
            names = [frame_name(fr) for fr in frames] or ["(no frame)"]
            p["self"][names[-1]] += n
            for fn in set(names):
                p["inclusive"][fn] += n
    total = sum(p["samples"] for p in procs.values()) or 1
    out = {}
    for name, p in sorted(procs.items(), key=lambda kv: -kv[1]["samples"]):
        s = p["samples"] or 1
        out[name] = {
            "share_of_all_samples": round(p["samples"] / total, 3),
            "samples": p["samples"],
            "self": [(fn, round(c / s, 3)) for fn, c in p["self"].most_common(top)],
            # the frames under every sample (the process's start, the event loop) say nothing
            "inclusive": [(fn, round(c / s, 3)) for fn, c in p["inclusive"].most_common()
                          if c / s < EVERYWHERE][:top],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("batch", "unary", "stream", "basket", "basket-plain"),
                    default="batch")
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--native", action="store_true", help="C frames too (slower sampling)")
    ap.add_argument("--top", type=int, default=TOP)
    ap.add_argument("--out", default=os.path.join(HERE, "profile_results.json"))
    args = ap.parse_args()
    ensure_py_spy()
    with tempfile.TemporaryDirectory(prefix="cardcore-profile-") as work:
        baskets = args.mode.startswith("basket")
        proc = e2e.start_cardcore(os.path.join(work, "data"), os.path.join(work, "server.log"),
                                  ("--program", programs.PROGRAM) if baskets else ())
        try:
            rng = e2e.random.Random(7)
            numbers = list({e2e.random_number(rng) for _ in range(args.cards)})
            e2e.seed(proc.target, numbers)
            requests = e2e.Requests(numbers, f"profile-{time.time_ns()}")
            rate = 60_000 if args.mode == "batch" else 8_000  # enough for the seconds, not more
            n = int(rate * (args.seconds + 2))
            if baskets:  # as bench/programs.py: points to redeem, a coupon per basket
                programs.earn_points(proc.target, numbers)
                gen = programs.Baskets(numbers, f"profile-{time.time_ns()}")
                count = int((20_000 if args.mode == "basket" else 40_000) * (args.seconds + 2))
                payloads = gen.batches(count // e2e.BATCH_OPS,
                                       proc.target if args.mode == "basket" else None)
                run = lambda: e2e.run_batches(proc.target, payloads, args.seconds)  # noqa: E731
            elif args.mode == "batch":
                payloads = requests.batches(n // e2e.BATCH_OPS)
                run = lambda: e2e.run_batches(proc.target, payloads, args.seconds)  # noqa: E731
            elif args.mode == "unary":
                payloads = requests.unary(n)
                run = lambda: e2e.run_unary(proc.target, payloads, 16, args.seconds)  # noqa: E731
            else:
                payloads = requests.swipes(n)
                run = lambda: e2e.run_streams(proc.target, payloads, args.seconds)  # noqa: E731
            raw = os.path.join(work, "raw.txt")
            spy = subprocess.Popen(
                [PY_SPY, "record", "--pid", str(proc.proc.pid), "--subprocesses", "--format",
                 "raw", "--rate", str(RATE_HZ), "--duration", str(int(args.seconds)),
                 "--nonblocking", "--output", raw, *(["--native"] if args.native else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # py-spy attached before the clock starts
            figures = e2e.measure(proc, run)
            _, err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0 or not os.path.exists(raw):
                raise SystemExit(f"py-spy failed: {err.decode()[-2000:]}")
            result = {"mode": args.mode, "cpus": os.cpu_count(), "load": figures,
                      "native": args.native, "processes": summarise(raw, proc.proc.pid, args.top)}
        finally:
            proc.stop()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    load = result["load"]
    print(f"{args.mode}: {load['tx_per_s']:,}/s, {load['server_cpu_us_per_op']} µs of server "
          f"CPU per operation (both processes), {os.cpu_count()} cores")
    for name, p in result["processes"].items():
        print(f"\n== {name}: {p['share_of_all_samples']:.0%} of the samples")
        print(f"   {'self':<58s}   {'inclusive':<58s}")
        for (fs, s), (fi, i) in zip(p["self"], p["inclusive"]):
            print(f"   {s:5.1%} {fs[:52]:<52s}   {i:5.1%} {fi[:52]:<52s}")


if __name__ == "__main__":
    main()
