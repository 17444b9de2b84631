"""Locust fleets of POS terminals against cardcore (``make load``): seed, swipe, summarise.

    .venv/bin/python bench/load.py [--cards 100000] [--users 32] [--spawn-rate 32]
        [--run-time 60s] [--mode unary|stream] [--pipeline N] [--mix purchase=70,...|--mix-file F]
        [--shape lunch|steps ...] [--workers N] [--web [--web-host H] [--web-port P]]
        [--target HOST:PORT [--tls-ca CA --tls-cert C --tls-key K --tls-cert-dir D]]
        [--population FILE] [--seed N] [--data-dir DIR] [--seed-only] [--out-dir DIR]

1. Starts ``cardcore serve --insecure`` on a temp data folder (or ``--data-dir``), unless
   ``--target`` names a running server, local or remote, plaintext or mutual TLS (``--tls-ca``;
   a back-office certificate to enroll and seed, a ``terminal-<id>`` certificate per terminal in
   ``--tls-cert-dir``). The admin token comes from ``--admin-token-file``, ``CARDCORE_TOKEN`` (as
   for the ``cardcore`` command) or ``<--data-dir>/admin.token``. ``CARDCORE_ADMIN_TOKEN``, the
   old name, is still read after ``CARDCORE_TOKEN``, with a deprecation note.
2. With ``--population FILE`` made earlier for this server: reuses its cards and terminals (each
   terminal's KSN counter moved a block on first) and skips 3 and 4's seeding.
3. Enrolls one terminal per locust user (ids ``--first-terminal``.., store ``--store``) and one
   seeding terminal, with the bootstrap admin token.
4. Seeds ``--cards`` cards through the seeding terminal: SubmitBatch calls of up to 10,000
   operations, each card opened with a first PIN (6 digits from a seeded RNG, never a weak one)
   and topped up so that purchases do not run dry. A small slice of the cards is kept apart
   for wrong-PIN attempts.
5. Writes the population (card numbers, PINs, the terminals' keys) to a 0600 JSON file (in a
   private temp folder, removed afterwards, unless ``--population``) and runs locust on
   ``bench/locustfile.py`` with the mix (``bench/loadkit.py``), the shape, ``--workers`` worker
   processes: headless for ``--run-time`` (or the shape's length) by default, or with the web UI
   (``--web``: started at once, open until 30 s after the run time).
6. Reads locust's CSV (``OUT/load_<mode>_stats.csv``, ``_failures.csv``), the users' own
   outcome counts and the step ramp's knee (``_knee.json``), prints a markdown summary (requests,
   RPS, p50/p95/p99, failures by reason, server CPU per request) and saves it as
   ``OUT/load_<mode>_summary.json``.

The server this script starts allows ``--failures-per-minute`` (default 100,000) wrong PINs per
terminal per minute instead of the production default of 10: a load test compresses hours of a
terminal's swipes into seconds. Against ``--target`` the locust users keep under the limit you
name (default 10, the server default) by skipping wrong-PIN attempts and balance inquiries (every
inquiry from a terminal counts against that limit) once one more could reach it.

Every mutating request carries ``client_time_us`` (the terminal library sets it; enrolments and
seeding too); balance inquiries send the card's PIN, so that the answer shows the balances.

Exit status: 0 when the run had no failures, 1 when some calls failed (the summary says which),
2 when the run itself went wrong (or a flag was refused).
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
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
from cardcore.server.tlsfiles import TlsFileError, read_ca, read_pair
from e2e import Proc, start_cardcore  # bench/e2e.py: how the benchmarks run a server
import loadkit  # bench/loadkit.py: the mix, the shapes, the terminals' certificate names

HERE = os.path.dirname(os.path.abspath(__file__))
LOCUSTFILE = os.path.join(HERE, "locustfile.py")
BATCH_OPS_MAX = 10_000            # the server's SubmitBatch limit
SEED_TOP_UP_MINOR = 100_000_000   # 1,000,000.00 per card: ~10,000 purchases before it runs dry
SERVER_FAILURES_PER_MINUTE = 100_000
WEB_LINGER_S = 30                 # --web: locust quits this long after the run time
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
ORDER = ("purchase", "balance inquiry", "top-up", "purchase (wrong PIN)")
POPULATION_VERSION = 1
# A reused population's terminals start each run this many KSN counters past the last run's
# start: no run can have used more (one terminal at 1,000 swipes/s would need 70 minutes), so no
# counter is ever sent twice even when a run was killed. DUKPT allows ~4e9: ~1,000 runs.
COUNTER_BLOCK = 1 << 22
PIPELINE_MAX = 256  # the server's STREAM_IN_FLIGHT_MAX: more would only queue in its reader
WORKERS_MAX = 64


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


def population_doc(target_key: str, seed: int, cards: list[tuple[str, str]], wrong_pin: int,
                   terminals: list[Terminal]) -> dict:
    """What a run needs and a later run reuses: test cards with their PINs, the terminals' keys
    and KSN counters, and which server they live on (``target``)."""
    return {"version": POPULATION_VERSION, "target": target_key, "seed": seed,
            "cards": cards[wrong_pin:], "wrong_pin_cards": cards[:wrong_pin],
            "terminals": [{"terminal_id": t.keys.terminal_id, "store_id": t.keys.store_id,
                           "initial_key": t.keys.initial_key.hex(),
                           "initial_key_id": t.keys.initial_key_id.hex(),
                           "counter": t.keys.counter} for t in terminals]}


def write_population(path: str, doc: dict) -> None:
    """Mode 0600, replaced atomically: it holds test PINs and terminal keys (test data only)."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def reusable_population(path: str, target_key: str, users: int) -> dict | None:
    """The population in ``path`` if it was made for this server, with its terminals' counters
    moved a block on (written back before the run: see COUNTER_BLOCK); None if there is no file.
    A file for another server, or with fewer terminals than ``users``, stops the run."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"load.py: cannot read the population {path}: {exc}") from None
    if doc.get("version") != POPULATION_VERSION or doc.get("target") != target_key:
        raise SystemExit(f"load.py: the population {path} was made for {doc.get('target')!r}, not "
                         f"{target_key!r}: name another --population file (or delete this one)")
    if len(doc["terminals"]) < users:
        raise SystemExit(f"load.py: the population {path} has {len(doc['terminals'])} terminals, "
                         f"fewer than --users {users}: use fewer users or a new --population")
    for t in doc["terminals"]:
        t["counter"] += COUNTER_BLOCK
        if t["counter"] >= 0xFFFF0000:
            raise SystemExit(f"load.py: terminal {t['terminal_id']}'s DUKPT key is used up: "
                             "make a new --population with new --first-terminal ids")
    write_population(path, doc)
    return doc


def tls_files(args, need_office: bool) -> tuple[bytes, bytes | None, bytes | None] | None:
    """(CA, client certificate, key) for the admin channel, checked (gRPC would say only "Socket
    closed"), or None for plaintext; every terminal's certificate must be in --tls-cert-dir. A
    reused population enrolls nothing: then the back-office pair is not needed."""
    if not args.tls_ca:
        if args.tls_cert or args.tls_key or args.tls_cert_dir:
            raise SystemExit("load.py: --tls-cert, --tls-key and --tls-cert-dir go with --tls-ca")
        return None
    if not (args.tls_cert and args.tls_key) and need_office:
        raise SystemExit("load.py: --tls-ca needs --tls-cert and --tls-key: a back-office "
                         "client certificate for enrolling and seeding (cardcore certs client "
                         "backoffice:NAME)")
    try:
        root = read_ca(args.tls_ca, "--tls-ca")
        if not (args.tls_cert and args.tls_key):
            return root, None, None
        cert, key = read_pair(args.tls_cert, args.tls_key, "--tls-cert", "--tls-key")
    except TlsFileError as exc:
        raise SystemExit(f"load.py: {exc}") from None
    return root, cert, key


def check_terminal_certs(cert_dir: str, terminal_ids: list[int]) -> None:
    """Every terminal's certificate and key present and valid, before locust starts."""
    for tid in terminal_ids:
        cert_path, key_path = loadkit.terminal_cert_files(cert_dir, tid)
        try:
            read_pair(cert_path, key_path, "--tls-cert-dir", "--tls-cert-dir")
        except TlsFileError as exc:
            raise SystemExit(f"load.py: terminal {tid}: {exc} (make it with: cardcore certs "
                             f"terminal {tid} --dir {cert_dir})") from None


# ---- reading locust's results ----------------------------------------------------------------

def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def merged_outcomes(prefix: str) -> dict:
    """The users' own counts from every locust process (``<prefix>-<pid>.json``). Exact
    percentiles only from a single process: with --workers the summary keeps locust's."""
    docs = []
    for path in sorted(glob.glob(f"{prefix}-*.json")):
        with open(path) as f:
            docs.append(json.load(f))
    if len(docs) <= 1:
        return docs[0] if docs else {}
    out: dict = {"skipped": collections.Counter(), "pipeline": collections.Counter(),
                 "operations": {}, "processes": len(docs)}
    for doc in docs:
        out["skipped"].update(doc.get("skipped", {}))
        pipe = doc.get("pipeline", {})
        out["pipeline"].update({k: v for k, v in pipe.items() if k not in ("max_in_flight", "depth")})
        out["pipeline"]["max_in_flight"] = max(out["pipeline"]["max_in_flight"],
                                               pipe.get("max_in_flight", 0))
        out["pipeline"]["depth"] = pipe.get("depth", 1)
        for name, op in doc["operations"].items():
            row = out["operations"].setdefault(name, {"outcomes": collections.Counter(), "requests": 0})
            row["outcomes"].update(op["outcomes"])
            row["requests"] += op["requests"]
    out["skipped"] = dict(out["skipped"])
    out["pipeline"] = dict(out["pipeline"])
    for row in out["operations"].values():
        row["outcomes"] = dict(row["outcomes"])
    return out


def read_results(prefix: str, outcomes_path: str) -> dict:
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    failures: list[dict] = []
    if os.path.exists(f"{prefix}_failures.csv"):
        with open(f"{prefix}_failures.csv", newline="") as f:
            failures = sorted(({"operation": r["Name"], "reason": r["Error"],
                                "count": int(r["Occurrences"])} for r in csv.DictReader(f)),
                              key=lambda x: -x["count"])
    seen = merged_outcomes(outcomes_path)
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
            "skipped": seen.get("skipped", {}), "pipeline": seen.get("pipeline", {})}


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
        lines.append("Skipped (to stay under the server's per-terminal failure limit, or a terminal "
                     "out of this run's KSN counters): " +
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
    procs = f"{s['workers']} worker processes and a master" if s.get("workers") else "one process"
    lines.append(f"Load generator (locust, {procs}, with its start-up): "
                 f"{s['locust_cpu_pct']}% of one core over the run time.")
    pipe = s.get("pipeline") or {}
    if pipe.get("depth", 1) > 1:
        lines.append(f"Pipelined streams: {pipe['depth']} in flight allowed, at most "
                     f"{pipe['max_in_flight']} seen; {pipe['sent']:,} sent, {pipe['matched']:,} "
                     f"replies matched by request_id, {pipe['unmatched']:,} unmatched.")
    knee = (s.get("shape_report") or {})
    if "steps" in knee:
        lines.append(f"Step ramp (p99 limit {knee['p99_limit_ms']} ms): " + "; ".join(
            f"{st['users']} users {st['rps']:,} RPS p99 {st['p99_ms']} ms" for st in knee["steps"]))
        k = knee.get("knee")
        lines.append(f"Knee: p99 crossed {knee['p99_limit_ms']} ms at {k['rps']:,} RPS "
                     f"({k['users']} users)" if k else
                     f"Knee: not reached (p99 stayed under {knee['p99_limit_ms']} ms)")
    if s.get("population_reused"):
        lines.append("Population reused: no seeding this run.")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000, help="cards to seed (default %(default)s)")
    parser.add_argument("--users", type=int, default=32, help="locust users = terminals (default %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=32, help="users started per second")
    parser.add_argument("--run-time", type=run_time, default="60s", help="e.g. 60s, 5m (default %(default)s)")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary",
                        help="unary calls, or one SwipeStream per terminal (default %(default)s)")
    parser.add_argument("--pipeline", type=int, default=1,
                        help=f"stream mode: requests in flight per stream, 1..{PIPELINE_MAX}; replies "
                             "matched by request_id (default %(default)s)")
    parser.add_argument("--mix", help="operation weights, e.g. purchase=70,inquiry=15,top_up=10,"
                                      "wrong_pin=3 (names left out weigh 0; default that mix)")
    parser.add_argument("--mix-file", help="the mix as a JSON object or a TOML [mix] table")
    parser.add_argument("--shape", choices=("lunch", "steps"),
                        help="a load shape instead of --users/--run-time: lunch (ramp up, hold, "
                             "ramp down) or steps (a step ramp that reports the knee)")
    parser.add_argument("--base-users", type=int, default=0, help="lunch: users before and after")
    parser.add_argument("--ramp", type=run_time, default="30s", help="lunch: each ramp's time")
    parser.add_argument("--hold", type=run_time, default="60s", help="lunch: the peak's time")
    parser.add_argument("--start-users", type=int, default=1, help="steps: the first step's users")
    parser.add_argument("--step-users", type=int, default=4, help="steps: users added per step")
    parser.add_argument("--step-time", type=run_time, default="20s", help="steps: each step's time")
    parser.add_argument("--p99-limit-ms", type=float, default=50.0,
                        help="steps: the knee is the first step whose p99 is above this")
    parser.add_argument("--workers", type=int, default=0,
                        help=f"distributed: a locust master and N worker processes (1..{WORKERS_MAX}; "
                             "default 0: one process)")
    parser.add_argument("--web", action="store_true", help="locust's web UI on --web-host:--web-port")
    parser.add_argument("--web-host", default="127.0.0.1",
                        help="the web UI's address (default %(default)s; 0.0.0.0 for other hosts)")
    parser.add_argument("--web-port", type=int, default=8089)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "load-results"))
    parser.add_argument("--target", help="HOST:PORT of a running server, local or remote "
                                         "(default: start one here)")
    parser.add_argument("--tls-ca", default=os.environ.get("CARDCORE_TLS_CA"),
                        help="with --target: the CA of the server's certificate, PEM (env "
                             "CARDCORE_TLS_CA); without it, plaintext")
    parser.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                        help="a back-office client certificate for enrolling and seeding (env "
                             "CARDCORE_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"),
                        help="its key (env CARDCORE_TLS_KEY)")
    parser.add_argument("--tls-cert-dir", help="the terminals' certificates, terminal-<id>.pem/.key "
                                               "(default: the folder of --tls-ca)")
    parser.add_argument("--admin-token-file", help="with --target: the bootstrap admin token's file "
                                                   "(default: env CARDCORE_TOKEN, else "
                                                   "<--data-dir>/admin.token)")
    parser.add_argument("--data-dir", help="the started server's data folder, kept afterwards "
                                           "(default: a temp folder, removed)")
    parser.add_argument("--seed-only", action="store_true", help="enroll and seed, then stop")
    parser.add_argument("--population", help="the population file: written once (0600; test PINs "
                                             "and terminal keys), reused by later runs on the same "
                                             "server without seeding")
    parser.add_argument("--seed", type=int, help="RNG seed of card numbers and PINs (default: random)")
    parser.add_argument("--first-terminal", type=int, default=1, help="terminal ids start here")
    parser.add_argument("--store", type=int, default=1, help="the terminals' store id")
    parser.add_argument("--failures-per-minute", type=int,
                        help=f"per-terminal wrong-PIN limit: passed to the server started here "
                             f"(default {SERVER_FAILURES_PER_MINUTE:,}); with --target, the "
                             f"target's (default 10)")
    return parser


def shape_spec(args) -> dict | None:
    """The schedule for the locustfile (CARDCORE_LOAD_SHAPE), checked here for a one-line error."""
    if args.shape == "lunch":
        spec = {"kind": "lunch", "base_users": args.base_users, "peak_users": args.users,
                "ramp_s": parse_seconds(args.ramp), "hold_s": parse_seconds(args.hold)}
    elif args.shape == "steps":
        spec = {"kind": "steps", "start_users": args.start_users, "step_users": args.step_users,
                "max_users": args.users, "step_s": parse_seconds(args.step_time),
                "p99_limit_ms": args.p99_limit_ms}
    else:
        return None
    loadkit.shape_from_env({"CARDCORE_LOAD_SHAPE": json.dumps(spec)})  # raises ValueError
    return spec


def shape_seconds(spec: dict) -> float:
    schedule = loadkit.shape_from_env({"CARDCORE_LOAD_SHAPE": json.dumps(spec)})
    if isinstance(schedule, loadkit.LunchRush):
        return schedule.duration_s
    return schedule.step_count * schedule.step_s


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.cards < 10 or args.users < 1:
        parser.error("--cards must be at least 10 and --users at least 1")
    if not 1 <= args.pipeline <= PIPELINE_MAX:
        parser.error(f"--pipeline must be 1..{PIPELINE_MAX}")
    if args.pipeline > 1 and args.mode != "stream":
        parser.error("--pipeline needs --mode stream (unary calls are one at a time per user)")
    if not 0 <= args.workers <= WORKERS_MAX:
        parser.error(f"--workers must be 0..{WORKERS_MAX}")
    try:
        if args.mix and args.mix_file:
            parser.error("--mix or --mix-file, not both")
        mix = (loadkit.parse_mix(args.mix) if args.mix else
               loadkit.read_mix_file(args.mix_file) if args.mix_file else dict(loadkit.DEFAULT_MIX))
        spec = shape_spec(args)
    except (loadkit.MixError, ValueError) as exc:
        parser.error(str(exc))
    if args.population and not (args.target or args.data_dir):
        parser.error("--population needs a server that outlives the run: --target or --data-dir")
    if args.tls_ca and not args.target:
        parser.error("--tls-ca goes with --target (the server started here is plaintext on loopback)")
    run_time_text = f"{shape_seconds(spec):g}s" if spec else args.run_time

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    fpm = args.failures_per_minute or (10 if args.target else SERVER_FAILURES_PER_MINUTE)
    os.makedirs(args.out_dir, exist_ok=True)
    prefix = os.path.join(args.out_dir, f"load_{args.mode}")
    work = tempfile.mkdtemp(prefix="cardcore-load-")  # 0700: the population file lives here
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(work, "data")
    target_key = args.target if args.target else f"local:{data_dir}"
    pop_path = os.path.abspath(args.population) if args.population else os.path.join(work, "population.json")
    srv: Proc | None = None
    summary: dict = {"mode": args.mode, "users": args.users, "cards": args.cards,
                     "run_time": run_time_text, "seed": None, "rng_seed": seed,
                     "failures_per_minute": fpm, "mix": mix, "pipeline_depth": args.pipeline,
                     "workers": args.workers, "shape": spec}
    try:
        reused = reusable_population(pop_path, target_key, args.users) if args.population else None
        tls = tls_files(args, need_office=not reused) if args.target else None
        cert_dir = (args.tls_cert_dir or os.path.dirname(os.path.abspath(args.tls_ca))) if tls else None
        summary["tls"] = bool(tls)
        if args.target:
            target = args.target
            token = None if reused else admin_token(args.admin_token_file,
                                                    data_dir if args.data_dir else None)
            if not reused and not token:
                parser.error("--target needs the admin token to enroll and seed: "
                             "--admin-token-file, CARDCORE_TOKEN or --data-dir")
        else:
            srv = start_cardcore(data_dir, f"{prefix}_server.log",
                                 ("--failures-per-minute", str(fpm)))
            target = srv.target
            with open(os.path.join(data_dir, "admin.token")) as f:
                token = f.read().strip()
        summary["target"] = target
        print(f"server {target}" + (" (TLS)" if tls else "") + ("" if args.target else
              f" (data {data_dir}, --failures-per-minute {fpm:,})"), flush=True)

        if reused:
            summary["cards"] = len(reused["cards"]) + len(reused["wrong_pin_cards"])
            summary["rng_seed"] = reused["seed"]
            summary["population_reused"] = True
            print(f"population {pop_path} reused: {summary['cards']:,} cards, "
                  f"{len(reused['terminals'])} terminals, no seeding", flush=True)
            terminal_ids = [t["terminal_id"] for t in reused["terminals"]]
        else:
            if tls:
                root, cert, key = tls
                channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root, key, cert),
                                              options=GRPC_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
            first = args.first_terminal
            if tls:  # the seeder swipes too: its certificate must be there
                check_terminal_certs(cert_dir, [first + args.users])
            with channel:
                admin = apb_grpc.AdminServiceStub(channel)
                seeder = enroll(admin, token, first + args.users, args.store)
                # the users' terminals too with --seed-only: the population is then complete
                users = [enroll(admin, token, first + i, args.store) for i in range(args.users)]
                cards = population(args.cards, seed)
                t0 = time.perf_counter()
                if tls:  # seeding swipes need the seeding terminal's own certificate
                    s_cert, s_key = read_pair(*loadkit.terminal_cert_files(cert_dir, seeder.keys.terminal_id),
                                              "--tls-cert-dir", "--tls-cert-dir")
                    with grpc.secure_channel(target, grpc.ssl_channel_credentials(tls[0], s_key, s_cert),
                                             options=GRPC_OPTIONS) as seed_channel:
                        seed_cards(pb_grpc.CardServiceStub(seed_channel), seeder, cards, f"{seed:x}")
                else:
                    seed_cards(pb_grpc.CardServiceStub(channel), seeder, cards, f"{seed:x}")
                seconds = time.perf_counter() - t0
            summary["seed"] = {"cards": args.cards, "seconds": round(seconds, 2),
                               "ops_per_s": round(2 * args.cards / seconds)}
            print(f"seeded {args.cards:,} cards in {seconds:.2f} s ({2 * args.cards / seconds:,.0f} ops/s) "
                  f"from terminal {first + args.users}; terminals {first}..{first + args.users - 1} "
                  f"swipe", flush=True)
            wrong_pin = max(4, args.cards // 100)
            write_population(pop_path, population_doc(target_key, seed, cards, wrong_pin, users))
            terminal_ids = [t.keys.terminal_id for t in users]
            if args.population:
                print(f"population written: {pop_path} (mode 0600: test PINs and terminal keys)")
        if args.seed_only:
            return 0
        if tls:
            check_terminal_certs(cert_dir, terminal_ids[:args.users])

        outcomes_path = f"{prefix}_outcomes"
        shape_report = f"{prefix}_knee.json"
        for stale in (f"{prefix}_stats.csv", f"{prefix}_failures.csv", shape_report,
                      *glob.glob(f"{outcomes_path}-*.json")):
            if os.path.exists(stale):
                os.remove(stale)
        env = dict(os.environ, CARDCORE_LOAD_POPULATION=pop_path, CARDCORE_LOAD_MODE=args.mode,
                   CARDCORE_LOAD_FAILURES_PER_MINUTE=str(fpm), CARDCORE_LOAD_OUTCOMES=outcomes_path,
                   CARDCORE_LOAD_MIX=json.dumps(mix), CARDCORE_LOAD_PIPELINE=str(args.pipeline),
                   CARDCORE_LOAD_WORKERS=str(max(args.workers, 1)),
                   CARDCORE_LOAD_COUNTER_BLOCK=str(COUNTER_BLOCK))
        env.pop("CARDCORE_LOAD_SHAPE", None)
        if spec:
            env |= {"CARDCORE_LOAD_SHAPE": json.dumps(spec), "CARDCORE_LOAD_SHAPE_REPORT": shape_report}
        if tls:
            env |= {"CARDCORE_LOAD_TLS_CA": os.path.abspath(args.tls_ca),
                    "CARDCORE_LOAD_TLS_CERT_DIR": os.path.abspath(cert_dir)}
        argv = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--host", target,
                "--run-time", run_time_text, "--stop-timeout", "10", "--csv", prefix]
        if not spec:  # a shape sets the users itself
            argv += ["-u", str(args.users), "-r", str(args.spawn_rate)]
        if args.workers:
            argv += ["--processes", str(args.workers)]
        if args.web:
            argv += ["--autostart", "--autoquit", str(WEB_LINGER_S), "--web-host", args.web_host,
                     "--web-port", str(args.web_port)]
            shown = "127.0.0.1" if args.web_host in ("0.0.0.0", "") else args.web_host
            print(f"locust web UI: http://{shown}:{args.web_port} (bound to {args.web_host}; "
                  f"open until {WEB_LINGER_S} s after the run)", flush=True)
        else:
            argv += ["--headless", "--only-summary"]
        what = f"shape {args.shape} up to {args.users} users" if spec else f"{args.users} users"
        print(f"locust: {what} ({args.mode}" + (f", {args.pipeline} in flight" if args.pipeline > 1 else "")
              + (f", {args.workers} workers" if args.workers else "") + f") for {run_time_text} ...",
              flush=True)
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
        if spec and os.path.exists(shape_report):
            with open(shape_report) as f:
                summary["shape_report"] = json.load(f)
        requests = summary["total"].get("requests", 0)
        run_s = min(wall, parse_seconds(run_time_text))  # --web lingers after the run
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
