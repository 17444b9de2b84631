"""Smoke test of the locust fleets (bench/load.py, bench/locustfile.py): a few terminals, seconds.

Locust must be installed (``pip install -e ".[test,bench]"``, as CI does): a missing locust fails
here instead of skipping. The test never imports locust itself: importing it monkey-patches the
whole process with gevent, so it only runs in the child process.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import verify

from cardcore.server import certs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = os.path.join(ROOT, "bench", "load.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import loadkit  # noqa: E402  (bench/loadkit.py: plain Python, no locust)

SHORT = ["--cards", "300", "--users", "4", "--spawn-rate", "4", "--run-time", "3s"]


def load(*args: str, timeout_s: float = 100, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LOAD, *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, check=False,
                          env=dict(os.environ, **(env or {})))


def summary_of(out_dir, mode: str = "unary") -> dict:
    with open(os.path.join(out_dir, f"load_{mode}_summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_short_fleet_run_purchases_without_failures_and_the_ledger_verifies(tmp_path, mode):
    assert importlib.util.find_spec("locust") is not None, (
        'locust is not installed: pip install -e ".[test,bench]"')
    out_dir, data_dir = tmp_path / "out", tmp_path / "data"
    run = subprocess.run(
        [sys.executable, LOAD, "--cards", "300", "--users", "4", "--spawn-rate", "4",
         "--run-time", "3s", "--mode", mode, "--out-dir", str(out_dir), "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=100, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(out_dir / f"load_{mode}_stats.csv", newline="") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(stats["purchase"]["Request Count"]) > 0
    assert int(stats["Aggregated"]["Failure Count"]) == 0

    with open(out_dir / f"load_{mode}_summary.json") as f:
        summary = json.load(f)
    ops = summary["operations"]
    assert ops["purchase"]["requests"] > 0
    assert summary["total"]["failures"] == 0 and summary["failures_by_reason"] == []
    assert set(ops) >= {"purchase", "balance inquiry", "top-up"}
    # Wrong PINs are answered as such (or as locked), never accepted.
    wrong = ops.get("purchase (wrong PIN)", {}).get("outcomes", {})
    assert set(wrong) <= {"REASON_PIN_WRONG", "REASON_PIN_LOCKED"}
    assert "| purchase |" in run.stdout

    report = verify(str(data_dir))
    assert report["ok"], report["problems"]


# ---- the operation mix ------------------------------------------------------------------------

def test_a_mix_from_flags_keeps_the_weights_and_leaves_the_rest_at_zero():
    assert loadkit.parse_mix("purchase=70, inquiry=15,top_up=0") == {
        "purchase": 70, "inquiry": 15, "top_up": 0}


@pytest.mark.parametrize("text, says", [
    ("purchase=70,refund=5", "unknown operation 'refund'"),
    ("purchase=-1", "must be 0..1000"),
    ("purchase=1001", "must be 0..1000"),
    ("purchase=7.5", "whole number"),
    ("purchase", "not name=weight"),
    ("purchase=1,purchase=2", "named twice"),
    ("purchase=0,inquiry=0", "nothing would run"),
])
def test_a_bad_mix_is_refused_with_one_line(text, says):
    with pytest.raises(loadkit.MixError, match=says):
        loadkit.parse_mix(text)


def test_a_mix_file_is_json_or_a_toml_mix_table(tmp_path):
    (tmp_path / "m.json").write_text('{"purchase": 9, "wrong_pin": 1}')
    (tmp_path / "m.toml").write_text("[mix]\npurchase = 9\ninquiry = 1\n")
    (tmp_path / "bad.toml").write_text("[mix]\npurchase = -3\n")
    assert loadkit.read_mix_file(str(tmp_path / "m.json")) == {"purchase": 9, "wrong_pin": 1}
    assert loadkit.read_mix_file(str(tmp_path / "m.toml")) == {"purchase": 9, "inquiry": 1}
    with pytest.raises(loadkit.MixError, match="must be 0..1000"):
        loadkit.read_mix_file(str(tmp_path / "bad.toml"))


def test_the_command_line_refuses_a_bad_mix_before_starting_anything(tmp_path):
    run = load("--mix", "purchase=70,wrong_pn=3", "--out-dir", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "unknown operation 'wrong_pn'" in run.stderr
    assert not (tmp_path / "out").exists()


# ---- load shapes: the schedules locust's LoadTestShape.tick() returns -------------------------

def test_the_lunch_rush_ramps_up_holds_ramps_down_and_stops():
    rush = loadkit.LunchRush(base_users=2, peak_users=12, ramp_s=10, hold_s=20)
    assert rush.tick(0) == (2, 1.0)
    assert rush.tick(5)[0] == 7          # half way up
    assert rush.tick(10)[0] == 12 and rush.tick(29.9)[0] == 12  # the hold
    assert rush.tick(35)[0] == 7         # half way down
    assert rush.tick(39.5)[0] == 3
    assert rush.tick(40) is None         # 2 ramps + the hold: done
    with pytest.raises(ValueError):
        loadkit.LunchRush(base_users=5, peak_users=4, ramp_s=10, hold_s=0)


def test_the_step_ramp_steps_up_and_stops_one_step_after_the_knee():
    ramp = loadkit.StepRamp(start_users=2, step_users=3, max_users=11, step_s=10, p99_limit_ms=25)
    assert [ramp.tick(t)[0] for t in (0, 9.9, 10, 20, 30)] == [2, 2, 5, 8, 11]
    assert ramp.tick(40) is None  # past the last step (11 users)
    ramp.record(2, 200.0, 8.0)
    ramp.record(5, 480.0, 25.0)   # at the limit is not over it
    assert ramp.report()["knee"] is None
    ramp.record(8, 610.0, 31.5)   # the knee
    assert ramp.tick(30)[0] == 11  # one step past it, to see the slope
    assert ramp.tick(31) == (11, 11.0)
    knee = ramp.report()["knee"]
    assert (knee["users"], knee["rps"], knee["p99_ms"]) == (8, 610.0, 31.5)
    assert knee["last_under"] == {"users": 5, "rps": 480.0, "p99_ms": 25.0}
    ramp.record(11, 600.0, 80.0)
    assert ramp.tick(40) is None


def test_p99_of_locusts_histogram():
    assert loadkit.percentile_of_counts({}, 0.99) == 0.0
    assert loadkit.percentile_of_counts({5: 98, 40: 1, 90: 1}, 0.99) == 40.0
    assert loadkit.percentile_of_counts({5: 98, 40: 1, 90: 2}, 0.99) == 90.0


def test_a_step_ramp_run_writes_the_knee_report(tmp_path):
    out = tmp_path / "out"
    run = load("--cards", "300", "--users", "4", "--shape", "steps", "--start-users", "2",
               "--step-users", "2", "--step-time", "2s", "--p99-limit-ms", "1000",
               "--out-dir", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out / "load_unary_knee.json") as f:
        report = json.load(f)
    assert [s["users"] for s in report["steps"]] == [2, 4]
    assert all(s["rps"] > 0 and s["p99_ms"] > 0 for s in report["steps"])
    assert report["knee"] is None  # nobody waits a second on loopback
    assert "Knee: not reached" in run.stdout


# ---- pipelined streams, the population reused, distributed workers, TLS -------------------------

def test_a_pipelined_stream_keeps_several_in_flight_and_matches_every_reply(tmp_path):
    out = tmp_path / "out"
    run = load(*SHORT, "--mode", "stream", "--pipeline", "8", "--out-dir", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = summary_of(out, "stream")
    pipe = s["pipeline"]
    assert pipe["depth"] == 8 and 1 < pipe["max_in_flight"] <= 8
    assert pipe["sent"] > 0 and pipe["matched"] == pipe["sent"] and pipe["unmatched"] == 0
    # every stream swipe was reported once, with the answer matched to it
    stream_ops = sum(s["operations"][n]["requests"] for n in ("purchase", "top-up", "purchase (wrong PIN)"))
    assert stream_ops == pipe["sent"]
    assert s["total"]["failures"] == 0
    assert s["verify_ok"] is True


def test_pipeline_needs_stream_mode():
    run = load("--pipeline", "4")
    assert run.returncode == 2 and "--pipeline needs --mode stream" in run.stderr


def test_a_population_is_seeded_once_and_reused_by_the_next_run_with_two_workers(tmp_path):
    out, data, pop = tmp_path / "out", tmp_path / "data", tmp_path / "pop.json"
    common = [*SHORT, "--data-dir", str(data), "--population", str(pop), "--out-dir", str(out),
              "--mix", "purchase=4,top_up=1"]
    first = load(*common, "--seed-only")  # seeds and writes the population; no locust run
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "seeded 300 cards" in first.stdout
    assert os.stat(pop).st_mode & 0o777 == 0o600
    with open(pop) as f:
        doc = json.load(f)
    assert doc["target"] == f"local:{data}" and len(doc["terminals"]) == 4

    second = load(*common, "--workers", "2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "seeded 300 cards" not in second.stdout and "no seeding" in second.stdout
    s = summary_of(out)
    assert s["population_reused"] is True and s["seed"] is None
    assert s["operations"]["purchase"]["requests"] > 0 and s["total"]["failures"] == 0
    assert set(s["operations"]) == {"purchase", "top-up"}  # the mix, nothing else
    assert len(list(out.glob("load_unary_outcomes-*.json"))) == 2  # both workers swiped
    with open(pop) as f:  # counters moved a block on, before the run
        assert {t["counter"] for t in json.load(f)["terminals"]} == {1 << 22}
    assert s["verify_ok"] is True

    other = load(*SHORT, "--target", "127.0.0.1:1", "--population", str(pop))
    assert other.returncode != 0 and "was made for" in other.stderr


def test_a_tls_target_with_a_certificate_per_terminal(tmp_path, start_server):
    ca_dir = str(tmp_path / "certs")
    certs.make_ca(ca_dir)
    cert, key = certs.make_server_cert(ca_dir, ["127.0.0.1"])
    server = start_server("--tls-cert", cert, "--tls-key", key, "--tls-client-ca",
                          os.path.join(ca_dir, "ca.pem"), "--failures-per-minute", "100000")
    office_cert, office_key = certs.make_client_cert(ca_dir, "backoffice:load")
    for tid in range(1, 4):  # 2 users and the seeding terminal
        certs.make_client_cert(ca_dir, certs.terminal_cn(tid))
    with open(os.path.join(server.data_dir, "admin.token")) as f:
        token = f.read().strip()
    out, pop, ca = tmp_path / "out", str(tmp_path / "pop.json"), os.path.join(ca_dir, "ca.pem")
    no_cert = load("--cards", "100", "--users", "2", "--first-terminal", "50", "--target",
                   server.target, "--tls-ca", ca, "--tls-cert", office_cert, "--tls-key", office_key,
                   "--seed-only", "--out-dir", str(out), env={"CARDCORE_TOKEN": token})
    assert no_cert.returncode != 0 and "terminal 52:" in no_cert.stderr  # the seeder's: checked first
    assert "cardcore certs terminal 52" in no_cert.stderr
    seeding = load("--cards", "100", "--users", "2", "--target", server.target, "--tls-ca", ca,
                   "--tls-cert", office_cert, "--tls-key", office_key, "--population", pop,
                   "--seed-only", "--out-dir", str(out), env={"CARDCORE_TOKEN": token})
    assert seeding.returncode == 0, seeding.stdout[-3000:] + seeding.stderr[-3000:]
    assert "(TLS)" in seeding.stdout and "seeded 100 cards" in seeding.stdout
    # The population reused: no enrolment, so neither the token nor the back-office pair.
    run = load("--users", "2", "--run-time", "3s", "--target", server.target, "--tls-ca", ca,
               "--population", pop, "--failures-per-minute", "100000", "--out-dir", str(out),
               env={"CARDCORE_TOKEN": "", "CARDCORE_TLS_CERT": "", "CARDCORE_TLS_KEY": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no seeding" in run.stdout
    s = summary_of(out)
    assert s["tls"] is True and s["operations"]["purchase"]["requests"] > 0
    assert s["total"]["failures"] == 0
    server.stop()
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_the_old_token_name_still_works_with_a_deprecation_note(tmp_path, server):
    with open(os.path.join(server.data_dir, "admin.token")) as f:
        token = f.read().strip()
    env = {"CARDCORE_TOKEN": "", "CARDCORE_ADMIN_TOKEN": token}
    run = load("--cards", "20", "--users", "1", "--target", server.target, "--seed-only",
               "--out-dir", str(tmp_path / "out"), env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CARDCORE_ADMIN_TOKEN is deprecated" in run.stderr and "seeded 20 cards" in run.stdout
