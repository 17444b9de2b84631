"""Locust fleets of POS terminals against cardcore (``make load``): seed, swipe, summarise.

    .venv/bin/python bench/load.py [--cards 100000] [--users 32] [--spawn-rate 32]
        [--run-time 60s] [--mode unary|stream] [--web] [--out-dir bench/load-results]
        [--target HOST:PORT] [--data-dir DIR] [--seed-only]

1. Starts ``cardcore serve --insecure`` on a temp data folder (or ``--data-dir``), unless
   ``--target`` names a running (plaintext) server; then the admin token comes from
   ``--admin-token-file``, ``CARDCORE_TOKEN`` (as for the ``cardcore`` command) or
   ``<--data-dir>/admin.token``. ``CARDCORE_ADMIN_TOKEN``, the old name, is still read after
   ``CARDCORE_TOKEN``, with a deprecation note.
2. Enrolls one terminal per locust user (ids ``--first-terminal``.., store ``--store``) and one
   seeding terminal, with the bootstrap admin token.
3. Seeds ``--cards`` cards through the seeding terminal: SubmitBatch calls of up to 10,000
   operations, each card opened with a first PIN (6 digits from a seeded RNG, never a weak one)
   and topped up so that purchases do not run dry. A small slice of the cards is kept apart
   for wrong-PIN attempts.
4. Writes the population (card numbers, PINs, the terminals' keys) to a 0600 JSON file in a
   private temp folder and runs locust on ``bench/locustfile.py``: headless for ``--run-time``
   by default, or with the web UI (``--web``: http://127.0.0.1:8089, started at once, open
   until 30 s after the run time).
5. Reads locust's CSV (``OUT/load_<mode>_stats.csv``, ``_failures.csv``) and the users' own
   outcome counts, prints a markdown summary (requests, RPS, p50/p95/p99, failures by reason,
   server CPU per request) and saves it as ``OUT/load_<mode>_summary.json``.

The server this script starts allows ``--failures-per-minute`` (default 100,000) wrong PINs per
terminal per minute instead of the production default of 10: a load test compresses hours of a
terminal's swipes into seconds. Against ``--target`` the locust users keep under the limit you
name (default 10, the server default) by skipping wrong-PIN attempts and balance inquiries (every
inquiry from a terminal counts against that limit) once one more could reach it.

Every mutating request carries ``client_time_us`` (the terminal library sets it; enrolments and
seeding too); balance inquiries send the card's PIN, so that the answer shows the balances.

Exit status: 0 when the run had no failures, 1 when some calls failed (the summary says which),
2 when the run itself went wrong.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import grpc

from cardcore import pin as pinlib
from cardcore.cards import random_number
from cardcore.terminal import Terminal, TerminalKeys, now_us
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb
from e2e import Proc, start_cardcore  # bench/e2e.py: how the benchmarks run a server

HERE = os.path.dirname(os.path.abspath(__file__))
LOCUSTFILE = os.path.join(HERE, "locustfile.py")
BATCH_OPS_MAX = 10_000            # the server's SubmitBatch limit
SEED_TOP_UP_MINOR = 100_000_000   # 1,000,000.00 per card: ~10,000 purchases before it runs dry
SERVER_FAILURES_PER_MINUTE = 100_000
WEB_LINGER_S = 30                 # --web: locust quits this long after the run time
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
ORDER = ("purchase", "balance inquiry", "top-up", "purchase (wrong PIN)")


def parse_seconds(text: str) -> float:
    """Locust's run-time syntax: 60, 60s, 5m, 1h30m."""
    total, num = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms" and num:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
        else:
            raise argparse.ArgumentTypeError(f"not a run time: {text!r} (e.g. 60s, 5m, 1h30m)")
    return total + (float(num) if num else 0.0)


def run_time(text: str) -> str:
    if parse_seconds(text) <= 0:
        raise argparse.ArgumentTypeError("the run time must be above 0")
    return text


# ---- terminals and the card population -----------------------------------------------------

def enroll(admin: apb_grpc.AdminServiceStub, token: str, terminal_id: int, store_id: int) -> Terminal:
    try:
        resp = admin.EnrollTerminal(apb.EnrollTerminalRequest(
            request_id=str(uuid.uuid4()), terminal_id=terminal_id, store_id=store_id,
            client_time_us=now_us()),
            metadata=(("authorization", f"Bearer {token}"),))
    except grpc.RpcError as err:
        raise SystemExit(f"enrolling terminal {terminal_id} failed: {err.code().name} "
                         f"{err.details()} (a server used before? pick --first-terminal)") from None
    return Terminal(TerminalKeys(terminal_id, store_id, resp.initial_key, resp.terminal.initial_key_id))


def population(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct card numbers, each with a 6-digit PIN the server accepts as a first PIN."""
    rng = random.Random(seed)
    cards: dict[str, str] = {}
    while len(cards) < n:
        number = random_number(rng)
        pin = f"{rng.randrange(10**6):06d}"
        while pinlib.is_weak(pin):
            pin = f"{rng.randrange(10**6):06d}"
        cards.setdefault(number, pin)
    return list(cards.items())


def seed_cards(stub: pb_grpc.CardServiceStub, seeder: Terminal, cards: list[tuple[str, str]],
               tag: str) -> None:
    """Open each card with its PIN and top it up: SubmitBatch calls of BATCH_OPS_MAX operations.

    One call is in flight at a time (the KSN counters must reach the server in order), but the
    next batch is built while the server applies the last one.
    """
    per_batch = BATCH_OPS_MAX // 2

    def build(start: int) -> pb.SubmitBatchRequest:
        chunk = cards[start:start + per_batch]
        ops = [pb.Operation(open_card=seeder.open_card(f"load-{tag}-o{start + i}", number, pin))
               for i, (number, pin) in enumerate(chunk)]
        ops += [pb.Operation(top_up=seeder.top_up(f"load-{tag}-t{start + i}", number,
                                                  SEED_TOP_UP_MINOR))
                for i, (number, _) in enumerate(chunk)]
        return pb.SubmitBatchRequest(operations=ops)

    starts = list(range(0, len(cards), per_batch))
    pending = stub.SubmitBatch.future(build(starts[0])) if starts else None
    for k in range(len(starts)):
        nxt = build(starts[k + 1]) if k + 1 < len(starts) else None
        results = pending.result().results
        bad = [r for r in results if r.reason != cpb.REASON_OK]
        if bad:
            reasons = sorted({cpb.Reason.Name(r.reason) for r in bad})
            raise SystemExit(f"seeding failed: {len(bad)} operations declined ({', '.join(reasons)})")
        pending = stub.SubmitBatch.future(nxt) if nxt is not None else None


def write_population(path: str, cards: list[tuple[str, str]], wrong_pin: int,
                     terminals: list[Terminal]) -> None:
    doc = {"cards": cards[wrong_pin:], "wrong_pin_cards": cards[:wrong_pin],
           "terminals": [{"terminal_id": t.keys.terminal_id, "store_id": t.keys.store_id,
                          "initial_key": t.keys.initial_key.hex(),
                          "initial_key_id": t.keys.initial_key_id.hex(),
                          "counter": t.keys.counter} for t in terminals]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


# ---- reading locust's results ----------------------------------------------------------------

def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def read_results(prefix: str, outcomes_path: str) -> dict:
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    failures: list[dict] = []
    if os.path.exists(f"{prefix}_failures.csv"):
        with open(f"{prefix}_failures.csv", newline="") as f:
            failures = sorted(({"operation": r["Name"], "reason": r["Error"],
                                "count": int(r["Occurrences"])} for r in csv.DictReader(f)),
                              key=lambda x: -x["count"])
    seen: dict = {}
    if os.path.exists(outcomes_path):
        with open(outcomes_path) as f:
            seen = json.load(f)
    ops: dict[str, dict] = {}
    total: dict = {}
    for r in rows:
        row = {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
               "rps": round(_num(r["Requests/s"]), 1),
               # locust's own percentiles, whole milliseconds
               "locust_p50_ms": _num(r["50%"]), "locust_p95_ms": _num(r["95%"]),
               "locust_p99_ms": _num(r["99%"])}
        if r["Name"] == "Aggregated":
            total = row
            continue
        own = seen.get("operations", {}).get(r["Name"], {})
        for p in ("p50_ms", "p95_ms", "p99_ms"):  # the users' exact timings when they wrote them
            row[p] = own.get(p, row[f"locust_{p}"])
        row["outcomes"] = own.get("outcomes", {})
        ops[r["Name"]] = row
    ordered = {name: ops.pop(name) for name in ORDER if name in ops}
    ordered.update(ops)  # operation types added to the locustfile later
    return {"operations": ordered, "total": total, "failures_by_reason": failures,
            "skipped": seen.get("skipped", {})}


def markdown(summary: dict) -> str:
    s = summary
    lines = [(f"### cardcore load: {s['mode']}, {s['users']} terminals, {s['cards']:,} cards, "
              f"{s['run_time']}"), "",
             "| operation | requests | RPS | p50 ms | p95 ms | p99 ms | failures |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["operations"].items():
        lines.append(f"| {name} | {r['requests']:,} | {r['rps']:,} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['failures']:,} |")
    t = s["total"]
    if t:
        lines.append(f"| **all** | {t['requests']:,} | {t['rps']:,} | {t['locust_p50_ms']:.0f} | "
                     f"{t['locust_p95_ms']:.0f} | {t['locust_p99_ms']:.0f} | {t['failures']:,} |")
    lines += ["", ("Percentiles per operation: the users' own clock; the **all** row: locust's, "
                   "whole ms. A wrong PIN answered REASON_PIN_WRONG or REASON_PIN_LOCKED is a success; a balance "
                   "inquiry (sent with the PIN) succeeds when it shows the balances.")]
    wrong = s["operations"].get("purchase (wrong PIN)", {}).get("outcomes")
    if wrong:
        lines.append("Wrong-PIN outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(wrong.items())))
    if s["skipped"]:
        lines.append("Skipped to stay under the server's per-terminal failure limit: " +
                     ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()))
    lines += ["", "Failures by reason:" if s["failures_by_reason"] else "Failures by reason: none"]
    if s["failures_by_reason"]:
        lines += ["", "| operation | reason | count |", "|---|---|---:|"]
        lines += [f"| {f['operation']} | {f['reason']} | {f['count']:,} |"
                  for f in s["failures_by_reason"]]
    lines.append("")
    if s.get("server_cpu_us_per_request") is not None:
        lines.append(f"Server CPU (server + writer processes): "
                     f"{s['server_cpu_us_per_request']:,} µs per request, "
                     f"{s['server_cpu_pct']}% of one core over the run time.")
    lines.append(f"Load generator (locust, one process, with its start-up): "
                 f"{s['locust_cpu_pct']}% of one core over the run time.")
    if s.get("seed"):
        sd = s["seed"]
        lines.append(f"Seeding: {sd['cards']:,} cards (open with PIN + top-up) in {sd['seconds']} s "
                     f"({sd['ops_per_s']:,} ops/s).")
    if "verify_ok" in s:
        lines.append(f"Ledger verifies after the run: {s['verify_ok']}.")
    return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------

def admin_token(token_file: str | None, data_dir: str | None) -> str | None:
    """The admin token for a running server: --admin-token-file, env CARDCORE_TOKEN (the name
    the ``cardcore`` command reads), env CARDCORE_ADMIN_TOKEN (the old name: a deprecation note
    on stderr), then <--data-dir>/admin.token; None if none is found."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise SystemExit(f"load.py: cannot read the token file {path}: "
                             f"{exc.strerror or exc}") from None

    if token_file:
        return read(token_file) or None
    if os.environ.get("CARDCORE_TOKEN", "").strip():
        return os.environ["CARDCORE_TOKEN"].strip()
    if os.environ.get("CARDCORE_ADMIN_TOKEN", "").strip():
        print("load.py: CARDCORE_ADMIN_TOKEN is deprecated: name the token CARDCORE_TOKEN, as "
              "the cardcore command does", file=sys.stderr)
        return os.environ["CARDCORE_ADMIN_TOKEN"].strip()
    if data_dir and os.path.exists(os.path.join(data_dir, "admin.token")):
        return read(os.path.join(data_dir, "admin.token")) or None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000, help="cards to seed (default %(default)s)")
    parser.add_argument("--users", type=int, default=32, help="locust users = terminals (default %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=32, help="users started per second")
    parser.add_argument("--run-time", type=run_time, default="60s", help="e.g. 60s, 5m (default %(default)s)")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary",
                        help="unary calls, or one SwipeStream per terminal (default %(default)s)")
    parser.add_argument("--web", action="store_true", help="locust's web UI on --web-port while it runs")
    parser.add_argument("--web-port", type=int, default=8089)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "load-results"))
    parser.add_argument("--target", help="HOST:PORT of a running plaintext server (default: start one)")
    parser.add_argument("--admin-token-file", help="with --target: the bootstrap admin token's file "
                                                   "(default: env CARDCORE_TOKEN, else "
                                                   "<--data-dir>/admin.token)")
    parser.add_argument("--data-dir", help="the started server's data folder, kept afterwards "
                                           "(default: a temp folder, removed)")
    parser.add_argument("--seed-only", action="store_true", help="enroll and seed, then stop")
    parser.add_argument("--population", help="write the population file here and keep it "
                                             "(it holds PINs and terminal keys: test data only)")
    parser.add_argument("--seed", type=int, help="RNG seed of card numbers and PINs (default: random)")
    parser.add_argument("--first-terminal", type=int, default=1, help="terminal ids start here")
    parser.add_argument("--store", type=int, default=1, help="the terminals' store id")
    parser.add_argument("--failures-per-minute", type=int,
                        help=f"per-terminal wrong-PIN limit: passed to the server started here "
                             f"(default {SERVER_FAILURES_PER_MINUTE:,}); with --target, the "
                             f"target's (default 10)")
    args = parser.parse_args()
    if args.cards < 10 or args.users < 1:
        parser.error("--cards must be at least 10 and --users at least 1")

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    fpm = args.failures_per_minute or (10 if args.target else SERVER_FAILURES_PER_MINUTE)
    os.makedirs(args.out_dir, exist_ok=True)
    prefix = os.path.join(args.out_dir, f"load_{args.mode}")
    work = tempfile.mkdtemp(prefix="cardcore-load-")  # 0700: the population file lives here
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(work, "data")
    srv: Proc | None = None
    summary: dict = {"mode": args.mode, "users": args.users, "cards": args.cards,
                     "run_time": args.run_time, "seed": None, "rng_seed": seed,
                     "failures_per_minute": fpm}
    try:
        if args.target:
            target = args.target
            token = admin_token(args.admin_token_file, data_dir if args.data_dir else None)
            if not token:
                parser.error("--target needs the admin token: --admin-token-file, "
                             "CARDCORE_TOKEN or --data-dir")
        else:
            srv = start_cardcore(data_dir, f"{prefix}_server.log",
                                 ("--failures-per-minute", str(fpm)))
            target = srv.target
            with open(os.path.join(data_dir, "admin.token")) as f:
                token = f.read().strip()
        summary["target"] = target
        print(f"server {target}" + ("" if args.target else f" (data {data_dir}, "
                                    f"--failures-per-minute {fpm:,})"), flush=True)

        with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            admin = apb_grpc.AdminServiceStub(channel)
            first = args.first_terminal
            seeder = enroll(admin, token, first + args.users, args.store)
            users = [] if args.seed_only else [enroll(admin, token, first + i, args.store)
                                               for i in range(args.users)]
            cards = population(args.cards, seed)
            t0 = time.perf_counter()
            seed_cards(pb_grpc.CardServiceStub(channel), seeder, cards, f"{seed:x}")
            seconds = time.perf_counter() - t0
        summary["seed"] = {"cards": args.cards, "seconds": round(seconds, 2),
                           "ops_per_s": round(2 * args.cards / seconds)}
        print(f"seeded {args.cards:,} cards in {seconds:.2f} s ({2 * args.cards / seconds:,.0f} ops/s) "
              f"from terminal {first + args.users}" + ("" if args.seed_only else
              f"; terminals {first}..{first + args.users - 1} swipe"), flush=True)

        wrong_pin = max(4, args.cards // 100)
        pop_path = os.path.abspath(args.population) if args.population else os.path.join(work, "population.json")
        write_population(pop_path, cards, wrong_pin, users)
        if args.seed_only:
            if args.population:
                print(f"population: {pop_path}")
            return 0

        outcomes_path = f"{prefix}_outcomes.json"
        for stale in (f"{prefix}_stats.csv", f"{prefix}_failures.csv", outcomes_path):
            if os.path.exists(stale):
                os.remove(stale)
        env = dict(os.environ, CARDCORE_LOAD_POPULATION=pop_path, CARDCORE_LOAD_MODE=args.mode,
                   CARDCORE_LOAD_FAILURES_PER_MINUTE=str(fpm), CARDCORE_LOAD_OUTCOMES=outcomes_path)
        argv = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--host", target,
                "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.run_time,
                "--stop-timeout", "10", "--csv", prefix]
        if args.web:
            argv += ["--autostart", "--autoquit", str(WEB_LINGER_S), "--web-host", "127.0.0.1",
                     "--web-port", str(args.web_port)]
            print(f"locust web UI: http://127.0.0.1:{args.web_port} (open until {WEB_LINGER_S} s "
                  f"after the run)", flush=True)
        else:
            argv += ["--headless", "--only-summary"]
        print(f"locust: {args.users} users ({args.mode}) for {args.run_time} ...", flush=True)
        cpu0 = srv.cpu_s() if srv else None
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        with open(f"{prefix}_locust.log", "wb") as log:
            locust = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = locust.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches locust too: it stops and writes its CSV
                rc = locust.wait()
        wall = time.perf_counter() - t0
        cpu = srv.cpu_s() - cpu0 if srv else None
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        locust_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)

        if rc not in (0, 1) or not os.path.exists(f"{prefix}_stats.csv"):
            with open(f"{prefix}_locust.log", errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            print(f"locust failed (exit {rc}); its log: {prefix}_locust.log", file=sys.stderr)
            return 2
        summary |= read_results(prefix, outcomes_path)
        requests = summary["total"].get("requests", 0)
        run_s = min(wall, parse_seconds(args.run_time))  # --web lingers after the run
        summary["locust_cpu_pct"] = round(100 * locust_cpu / run_s)
        if cpu is not None:
            summary["server_cpu_us_per_request"] = round(cpu / max(requests, 1) * 1e6, 1)
            summary["server_cpu_pct"] = round(100 * cpu / run_s)
        if srv is not None:
            srv.stop()
            out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "verify",
                                  "--data-dir", data_dir, "--json"], capture_output=True, check=False)
            summary["verify_ok"] = out.returncode == 0 and json.loads(out.stdout)["ok"]
    finally:
        if srv is not None and srv.proc.poll() is None:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)  # the temp data folder and population file

    with open(f"{prefix}_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(markdown(summary))
    print(f"\nCSV: {prefix}_stats.csv, summary: {prefix}_summary.json")
    return 1 if summary["total"].get("failures", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
