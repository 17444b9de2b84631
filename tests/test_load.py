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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = os.path.join(ROOT, "bench", "load.py")


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_short_fleet_run_purchases_without_failures_and_the_ledger_verifies(tmp_path, mode):
    assert importlib.util.find_spec("locust") is not None, (
        'locust is not installed: pip install -e ".[test,bench]"')
    out_dir, data_dir = tmp_path / "out", tmp_path / "data"
    run = subprocess.run(
        [sys.executable, LOAD, "--cards", "300", "--users", "4", "--spawn-rate", "4",
         "--run-time", "5s", "--mode", mode, "--out-dir", str(out_dir), "--data-dir", str(data_dir)],
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
