"""SubmitBatch throughput of the previous release against the current code, in one run.

    .venv/bin/python bench/versus_release.py [--release 5c616b6] [--rounds 5] [--seconds 5]
        [--cards 100000] [--out bench/release_results.json]      (``make bench-release``)
    .venv/bin/python bench/versus_release.py --flag=--groups-in-flight=2 [--rounds 5] ...

The scenario is e2e.py's batch_1000: SubmitBatch calls of 1,000 purchases, 4 callers, over
``--cards`` cards chosen at random, sync on (every group fsynced before its reply), the requests
serialised before the clock starts. It runs against two servers on this machine:

- v1, the release (default 5c616b6, ledger v1: 128-byte journal, no digest chain), checked out
  as a git worktree in ``.bench-release/<commit>`` (outside the tracked files) and built there
  with its own ``make build`` into its own .venv; skipped when that build is already there;
- v2, the current code of this work tree, from ``.venv``; or, with ``--current COMMIT``, that
  commit built the same way as v1 (a fixed v2 while others edit the work tree);
- or, with ``--flag FLAG`` (repeatable), a server option against none: v1 is this work tree as
  it is, v2 the same tree with ``serve FLAG ...`` (from seeding on); no release is built.

Each server gets its own data folder, seeded the same way (cards opened and topped up through
SubmitBatch). Then the two alternate, v1, v2, v1, v2, ..., ``--rounds`` rounds each, every
phase on a fresh server process over its folder (as e2e.py does). Round k sends both servers the
same serialised batches (request ids new to both): v1 does not know ``client_time_us`` and keeps
it as an unknown field. Reported per round: tx/s, server CPU µs per purchase (the server process
and its children, from /proc, as e2e.py counts it; also split into the gRPC process and the
writer) and the writer's average group; then the median of each side and the ratio v2 / v1 of
the medians. The issue's target: ratio >= 0.95. Exit status 1 if an operation was declined or a
ledger does not verify afterwards.

``--profile``: after the rounds, one more phase per server (not counted in the table) with
py-spy (``.venv/bin/pip install py-spy``; not a project dependency) on both server processes:
the writer with every sample of its thread, waits and native (LMDB, OpenSSL, Cython) frames
included, as shares of the wall time; the gRPC process with the samples that hold the GIL, as
µs per purchase. Prints the top inclusive and self frames; ``--profile-dir`` keeps py-spy's
collapsed stacks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import e2e  # bench/e2e.py: the batch scenario, the server process, the seeding
from cardcore.cards import random_number

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELEASE_DEFAULT = "5c616b6"
TARGET_RATIO = 0.95
BATCHES_PER_S = 120  # payload built per phase: 120,000 purchases/s of headroom (SubmitBatch ~50,000/s)


def git(*args: str, cwd: str = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def release_python(commit: str, tree: str, rebuild: bool) -> str:
    """The release's venv python: the worktree added and built when not already there."""
    want = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    if not os.path.isdir(tree):
        git("worktree", "prune")
        print(f"git worktree add --detach {os.path.relpath(tree, ROOT)} {commit}", flush=True)
        os.makedirs(os.path.dirname(tree), exist_ok=True)
        git("worktree", "add", "--detach", tree, want)
    have = git("rev-parse", "HEAD", cwd=tree)
    if have != want:
        raise SystemExit(f"{tree} is at {have[:12]}, not {commit}: remove it "
                         f"(git worktree remove --force {tree}) and run again")
    py = os.path.join(tree, ".venv", "bin", "python")
    probe = [py, "-c", "import cardcore.ext.kernel, cardcore.v1.card_service_pb2, cardcore.server.cli"]
    built = (os.path.exists(os.path.join(tree, ".build-stamp")) and os.path.exists(py)
             and subprocess.run(probe, cwd="/", capture_output=True).returncode == 0)
    if built and not rebuild:
        print(f"{commit}: built already ({os.path.relpath(tree, ROOT)}/.venv)", flush=True)
    else:
        print(f"{commit}: make build in {os.path.relpath(tree, ROOT)} (once; cached after)",
              flush=True)
        subprocess.run(["make", "-C", tree, "build"], check=True)
        subprocess.run(probe, cwd="/", check=True)
    return py


def start(python: str, data_dir: str, log_path: str, extra: tuple[str, ...] = ()) -> e2e.Proc:
    return e2e.Proc([python, "-m", "cardcore.server.cli", "serve", "--insecure", "--data-dir",
                     data_dir, "--listen", "127.0.0.1:0", *extra], log_path)


def verify(python: str, data_dir: str) -> bool:
    out = subprocess.run([python, "-m", "cardcore.server.cli", "verify", "--data-dir", data_dir,
                          "--json"], capture_output=True, cwd="/")
    try:
        return out.returncode == 0 and bool(json.loads(out.stdout)["ok"])
    except (ValueError, KeyError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def cpu_busy_pct(seconds: float) -> float:
    """How busy all the cores were (from /proc/stat) over ``seconds``, in %."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(100 * (1 - (i1 - i0) / max(t1 - t0, 1)), 1)


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of the server process and of its children (the writer, multiprocessing's
    resource tracker): e2e.Proc.cpu_s is their sum."""
    def cpu(p: int) -> float:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu(pid), sum(cpu(c) for c in children(pid))


def frame_name(frame: str) -> str:
    """'apply (cardcore/ledger.py:12)' -> 'apply (ledger.py)'; native frames as they come."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    return f"{name} ({os.path.basename(where.rstrip(')')).split(':')[0]})"


# Frames every sample passes through (process start-up, the event loop, gRPC's Cython glue) and
# unresolved native addresses: left out of the inclusive lists, which are about cardcore's code.
PLUMBING_FILES = {"process.py", "spawn.py", "<string>", "runners.py", "base_events.py", "events.py",
                  "cli.py", "cmd_server.py", "<frozen runpy>", "_asynciomodule.c"}


def plumbing(frame: str) -> bool:
    name, _, where = frame.rpartition(" (")
    return frame.startswith("0x") or where.rstrip(")") in PLUMBING_FILES or name.startswith("0x")


def read_stacks(raw_path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks.append(([frame_name(x) for x in stack.split(";")], int(count)))
    return stacks


def top_frames(stacks: list[tuple[list[str], int]], scale: float, n: int = 12) -> dict:
    """The frames with the largest inclusive and self sample counts, times ``scale``."""
    import collections

    inclusive, self_ = collections.Counter(), collections.Counter()
    for frames, c in stacks:
        for fr in set(frames):
            if not plumbing(fr):
                inclusive[fr] += c
        self_[frames[-1]] += c
    top = lambda cnt: [(fr, round(k * scale, 2)) for fr, k in cnt.most_common(n)]
    return {"inclusive": top(inclusive), "self": top(self_)}


def profile_phase(system: str, python: str, data_dir: str, payloads: list, seconds: float,
                  work: str, keep_dir: str | None, extra: tuple[str, ...] = ()) -> dict:
    """One more batch phase with py-spy on both processes of the server:

    - the writer: every sample of its one thread, waits included, native frames too (shares of
      the wall time: how long it waits for the next group, what it does otherwise);
    - the gRPC process: only the samples that hold the GIL (its event loop's own work; the GIL
      is what one Python process can use of a core), Python frames, non-blocking sampling;
      given as GIL µs per purchase, comparable across the two versions.
    """
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    proc = start(python, data_dir, os.path.join(work, f"profile-{system}.log"), extra)
    writers = []  # the writer, not multiprocessing's resource tracker (a release's: spawn's)
    for pid in children(proc.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
                if b"writer_proc import child_main" in command or b"spawn_main" in command:
                    writers.append(pid)
        except OSError:
            continue
    if len(writers) != 1:
        proc.stop()
        raise SystemExit(f"{system}: expected one writer process under the server, found {writers}")
    rate = 100
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
    targets = {"writer": (writers[0], ["--idle", "--native"]),
               "server": (proc.proc.pid, ["--gil", "--nonblocking"])}
    spies = {}
    for part, (pid, opts) in targets.items():
        raw = os.path.join(keep_dir or work, f"release_profile_{system}_{part}.txt")
        spies[part] = raw, subprocess.Popen(
            [py_spy, "record", "-p", str(pid), "-r", str(rate), "--nolineno", *opts, "-f", "raw",
             "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attached
    t0 = time.perf_counter()
    n, elapsed, lat, errors = asyncio.run(e2e.run_batches(proc.target, payloads, seconds))
    wall = time.perf_counter() - t0 + 1.0
    out: dict = {"tx_per_s_while_profiled": round(n / elapsed), "purchases": n,
                 "sampled_s": round(wall, 1)}
    for part, (raw, spy) in spies.items():
        spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        _, err = spy.communicate(timeout=60)
        if not os.path.exists(raw):
            proc.stop()
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
        stacks = read_stacks(raw)
        samples = sum(c for _, c in stacks)
        if part == "writer":  # shares of all samples (wall time)
            waiting = sum(c for frames, c in stacks
                          if any(f.startswith(("select ", "recv_frame ")) for f in frames))
            out[part] = {"samples": samples, "waiting_pct": round(100 * waiting / max(samples, 1), 1),
                         "busy_us_per_purchase": round((samples - waiting) / rate / max(n, 1) * 1e6, 2),
                         **top_frames(stacks, 100 / max(samples, 1))}
        else:  # GIL µs per purchase
            out[part] = {"samples": samples, "gil_pct_of_wall": round(100 * samples / (rate * wall), 1),
                         "gil_us_per_purchase": round(samples / rate / max(n, 1) * 1e6, 2),
                         **top_frames(stacks, 1e6 / rate / max(n, 1))}
        if keep_dir:
            out[part]["raw"] = raw
    proc.stop()
    return out


def profile_text(profile: dict) -> str:
    lines = []
    for system, prof in profile.items():
        w, s = prof["writer"], prof["server"]
        lines.append(f"\n{system}: {prof['tx_per_s_while_profiled']:,} tx/s while profiled")
        lines.append(f"{system} writer process ({w['samples']:,} samples, % of wall time; waiting for "
                     f"the next group {w['waiting_pct']}%, busy {w['busy_us_per_purchase']} µs per "
                     f"purchase):")
        lines.append("   incl. %  frame (cardcore's and libraries')            |  self %  frame")
        for (fi, pi), (fs, ps) in zip(w["inclusive"], w["self"]):
            lines.append(f"  {pi:7.1f}  {fi[:48]:48s} | {ps:6.1f}  {fs[:48]}")
        lines.append(f"{system} gRPC process, GIL held {s['gil_pct_of_wall']}% of the time, "
                     f"{s['gil_us_per_purchase']} GIL µs per purchase:")
        lines.append("  incl. µs  frame                                       |  self µs  frame")
        for (fi, pi), (fs, ps) in zip(s["inclusive"], s["self"]):
            lines.append(f"  {pi:7.2f}  {fi[:48]:48s} | {ps:6.2f}  {fs[:48]}")
    return "\n".join(lines)


def table(res: dict) -> str:
    rounds = res["rounds"]
    cpu = lambda x: f"{x['server_cpu_us_per_op']} ({x['grpc_cpu_us_per_op']} + {x['writer_cpu_us_per_op']})"
    rows = ["| round | v1 tx/s | v2 tx/s | v1 server CPU µs/purchase (gRPC + writer) | v2 server CPU "
            "µs/purchase (gRPC + writer) | v1 avg group | v2 avg group |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rounds:
        a, b = r["v1"], r["v2"]
        rows.append(f"| {r['round']} | {a['tx_per_s']:,} | {b['tx_per_s']:,} | {cpu(a)} | {cpu(b)} | "
                    f"{a['avg_group_ops']} | {b['avg_group_ops']} |")
    m = res["median"]
    rows.append(f"| **median** | **{m['v1']['tx_per_s']:,}** | **{m['v2']['tx_per_s']:,}** | "
                f"**{cpu(m['v1'])}** | **{cpu(m['v2'])}** | "
                f"{m['v1']['avg_group_ops']} | {m['v2']['avg_group_ops']} |")
    verdict = "met" if res["ratio_v2_v1"] >= TARGET_RATIO else "NOT met"
    target = "" if res.get("flags") else f" (target >= {TARGET_RATIO}: {verdict})"
    v2 = (f"{res['current']['commit']} with serve {' '.join(res['flags'])}" if res.get("flags")
          else res["current"]["commit"])
    rows += ["", f"v2 / v1 SubmitBatch throughput (medians): **{res['ratio_v2_v1']:.3f}**"
                 f"{target}; server CPU per purchase v2 / v1: "
                 f"{res['cpu_ratio_v2_v1']:.2f}x (writer alone: {res['writer_cpu_ratio_v2_v1']:.2f}x). "
                 f"v1 = {res['release']['commit']}, v2 = {v2}"
                 f"{' + uncommitted changes' if res['current'].get('dirty') or res['current'].get('dirty_at_end') else ''}."]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default=RELEASE_DEFAULT, help="the previous release's commit")
    parser.add_argument("--release-dir", help="its worktree (default .bench-release/<release>)")
    parser.add_argument("--current", help="v2 from this commit's worktree (.bench-release/<commit>) "
                                          "instead of this work tree")
    parser.add_argument("--rebuild", action="store_true", help="run the release's make build again")
    parser.add_argument("--flag", action="append", default=[],
                        help="compare this tree with and without a serve option (repeatable; "
                             "e.g. --flag=--groups-in-flight=2) instead of against a release")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server, at least 3")
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase (as e2e.py)")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(HERE, "release_results.json"))
    parser.add_argument("--keep", action="store_true", help="keep the data folders (printed)")
    parser.add_argument("--profile", action="store_true",
                        help="then one more phase per server with py-spy on its writer (not counted)")
    parser.add_argument("--profile-dir", help="keep py-spy's collapsed stacks here")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="the profiled phase")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if args.flag and args.current:
        parser.error("--flag compares this work tree with itself: not with --current")
    tree = os.path.abspath(args.release_dir or os.path.join(ROOT, ".bench-release", args.release))
    v1_python = sys.executable if args.flag else release_python(args.release, tree, args.rebuild)
    if args.current:
        v2_python = release_python(args.current, os.path.join(ROOT, ".bench-release", args.current),
                                   args.rebuild)
        current, changed = git("rev-parse", "--short", f"{args.current}^{{commit}}"), ""
    else:
        v2_python = sys.executable
        current = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "core", "server", "ext", "proto", "setup.py")
    pythons = {"v1": v1_python, "v2": v2_python}
    serve_args = {"v1": (), "v2": tuple(args.flag)}
    res: dict = {
        "scenario": f"SubmitBatch of {e2e.BATCH_OPS:,} purchases, {e2e.BATCH_CALLERS} callers, "
                    f"{args.cards:,} random cards, sync on",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "release": {"commit": current if args.flag else
                    git("rev-parse", "--short", f"{args.release}^{{commit}}"), "python": v1_python},
        "flags": args.flag,
        "current": {"commit": current, "dirty": bool(changed), "python": v2_python},
        "cards": args.cards, "seconds_per_phase": args.seconds, "rounds": []}
    # the figures are only worth comparing on a quiet machine: say what else was running
    res["cpu_busy_pct_before"] = cpu_busy_pct(2.0)
    if res["cpu_busy_pct_before"] > 20:
        print(f"warning: the cores were {res['cpu_busy_pct_before']}% busy before the run: "
              f"something else is running; its figures compare badly", flush=True)
    work = tempfile.mkdtemp(prefix="cardcore-release-")
    try:
        rng = random.Random(1)
        numbers = list({random_number(rng) for _ in range(args.cards)})
        dirs = {s: os.path.join(work, f"data-{s}") for s in pythons}
        for system, py in pythons.items():
            t0 = time.perf_counter()
            srv = start(py, dirs[system], os.path.join(work, f"seed-{system}.log"), serve_args[system])
            e2e.seed(srv.target, numbers)
            srv.stop()
            print(f"{system}: seeded {args.cards:,} cards in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            res[f"seed_{system}_s"] = round(time.perf_counter() - t0, 1)

        for k in range(1, args.rounds + 1):
            # one request set per round, sent to both: ids new to each server
            payloads = e2e.Requests(numbers, f"release-r{k}").batches(int(BATCHES_PER_S * args.seconds))
            row: dict = {"round": k}
            for system in ("v1", "v2"):
                log_path = os.path.join(work, f"r{k}-{system}.log")
                proc = start(pythons[system], dirs[system], log_path, serve_args[system])
                main0, kids0 = cpu_split(proc.proc.pid)
                n, elapsed, lat, errors = asyncio.run(e2e.run_batches(proc.target, payloads, args.seconds))
                main1, kids1 = cpu_split(proc.proc.pid)
                groups, ops = e2e.writer_groups(proc.stop())
                row[system] = e2e.summary(n, elapsed, lat, (main1 - main0) + (kids1 - kids0)) | {
                    "grpc_cpu_us_per_op": round((main1 - main0) / max(n, 1) * 1e6, 1),
                    "writer_cpu_us_per_op": round((kids1 - kids0) / max(n, 1) * 1e6, 1),
                    "avg_group_ops": round(ops / groups, 1) if groups else 0, "declined": errors}
                if n >= len(payloads) * e2e.BATCH_OPS:
                    print(f"  warning: {system} used every prepared batch (raise BATCHES_PER_S)")
                print(f"round {k} {system}: {row[system]['tx_per_s']:>7,} tx/s  "
                      f"CPU {row[system]['server_cpu_us_per_op']} µs/purchase "
                      f"(gRPC {row[system]['grpc_cpu_us_per_op']} + writer "
                      f"{row[system]['writer_cpu_us_per_op']})  "
                      f"p50 {row[system]['p50_ms']} ms  p99 {row[system]['p99_ms']} ms"
                      + (f"  DECLINED {errors:,}" if errors else ""), flush=True)
            res["rounds"].append(row)
            del payloads

        med = {s: {key: statistics.median(r[s][key] for r in res["rounds"])
                   for key in ("tx_per_s", "server_cpu_us_per_op", "grpc_cpu_us_per_op",
                               "writer_cpu_us_per_op", "avg_group_ops", "p50_ms", "p99_ms")}
               for s in pythons}
        for s in med:
            med[s]["tx_per_s"] = round(med[s]["tx_per_s"])
        res["median"] = med
        res["ratio_v2_v1"] = round(med["v2"]["tx_per_s"] / med["v1"]["tx_per_s"], 3)
        res["cpu_ratio_v2_v1"] = round(med["v2"]["server_cpu_us_per_op"]
                                       / med["v1"]["server_cpu_us_per_op"], 2)
        res["writer_cpu_ratio_v2_v1"] = round(med["v2"]["writer_cpu_us_per_op"]
                                              / med["v1"]["writer_cpu_us_per_op"], 2)
        res["target_ratio"] = TARGET_RATIO
        res["target_met"] = res["ratio_v2_v1"] >= TARGET_RATIO
        res["declined"] = sum(r[s]["declined"] for r in res["rounds"] for s in pythons)
        if args.profile:
            payloads = e2e.Requests(numbers, "release-profile").batches(
                int(BATCHES_PER_S * args.profile_seconds))
            try:
                res["profile"] = {s: profile_phase(s, py, dirs[s], payloads, args.profile_seconds,
                                                   work, args.profile_dir, serve_args[s])
                                  for s, py in pythons.items()}
                print(profile_text(res["profile"]), flush=True)
            except (SystemExit, OSError, subprocess.SubprocessError) as exc:  # keep the rounds
                res["profile_error"] = str(exc)
                print(f"profile failed: {exc}", flush=True)
        if not args.current:  # others may edit the work tree while this runs
            res["current"]["dirty_at_end"] = bool(git("status", "--porcelain", "--", "core", "server",
                                                      "ext", "proto", "setup.py"))
        res["verify_ok"] = {s: verify(py, dirs[s]) for s, py in pythons.items()}
        print(f"ledgers verify after the run: {res['verify_ok']}")
    finally:
        if args.keep:
            print(f"data folders kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}\n")
    print(table(res))
    return 0 if res["declined"] == 0 and all(res["verify_ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
