"""The load, burst, soak and A/B benchmarks run end to end at a small scale (their full-scale
figures are in docs/RELIABILITY.md; no timing is asserted here, only correctness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import POSTGRES_SERVER, _postgres_admin

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_http_load_has_no_errors(tmp_path):
    report = run("http_load", tmp_path, "--clients", "6", "--seconds", "3", "--history", "3000")
    assert report["errors"] == 0 and report["requests"] > 0
    assert report["healthy_after"] == "ok" and report["clean_exit"]
    assert all(kind["requests"] > 0 for kind in report["per_kind"].values())


def test_http_load_can_offer_a_fixed_rate(tmp_path):
    report = run(
        "http_load",
        tmp_path,
        "--clients",
        "4",
        "--seconds",
        "3",
        "--history",
        "1000",
        "--rate",
        "5",
    )
    assert report["errors"] == 0 and report["offered_per_second"] == 20
    assert report["requests"] > 0 and report["healthy_after"] == "ok"
    # Paced, not a closed loop (which makes hundreds of requests in 3 s): about 20/s.
    assert report["requests"] <= 3 * 20 * 3


def test_inbox_burst_takes_every_file_once(tmp_path):
    report = run("inbox_burst", tmp_path, "--files", "40")
    assert report["exactly_once"] and report["jobs"] == 40


@pytest.fixture
def postgres_server() -> str:
    """The PostgreSQL server the scripts make their throw-away databases on (skipped
    without one, except in CI)."""
    _postgres_admin().close()
    return POSTGRES_SERVER


@pytest.mark.postgres
def test_http_load_runs_on_postgres_too(tmp_path, postgres_server):
    report = run(
        "http_load",
        tmp_path,
        *("--clients", "6", "--seconds", "3", "--history", "3000"),
        *("--postgres", postgres_server),
    )
    assert report["store"] == "postgres" and report["errors"] == 0
    assert report["healthy_after"] == "ok" and report["clean_exit"]
    assert all(kind["requests"] > 0 for kind in report["per_kind"].values())


@pytest.mark.postgres
def test_inbox_burst_takes_every_file_once_on_postgres_too(tmp_path, postgres_server):
    report = run("inbox_burst", tmp_path, "--files", "40", "--postgres", postgres_server)
    assert report["store"] == "postgres" and report["exactly_once"] and report["jobs"] == 40


def test_soak_completes_every_job(tmp_path):
    report = run("soak", tmp_path, "--jobs", "40", "--wave", "20")
    assert report["completed"] == 40 and report["failed"] == 0 and report["clean_exit"]
    assert report["rss_mib_at_end"] > 0


def test_the_look_ahead_benchmark_runs_both_sides(tmp_path):
    report = run("look_ahead", tmp_path, "--jobs", "6", "--batch", "2", "--rounds", "1")
    rounds = {r["look_ahead"]: r for r in report["rounds"]}
    # Three batches: the second and third are claimed at the last step of the one before.
    assert rounds[False]["batches_claimed_ahead"] == 0
    assert rounds[True]["batches_claimed_ahead"] == 2 and rounds[True]["ms_per_claim_ahead"] > 0
    assert [row["look_ahead"] for row in report["summary"]] == [False, True]


def test_the_previews_benchmark_runs_every_setting(tmp_path):
    report = run("previews", tmp_path, "--jobs", "2", "--steps", "6", "--rounds", "1")
    # Whether a preview arrives before its job ends depends on the machine's load (that
    # previews come is tests/test_previews.py's); none ever comes with them off.
    counted = {r["every_steps"]: r["counted"] for r in report["rounds"]}
    assert set(counted) == {0, 5, 1} and counted[0] == 0
    assert [row["every_steps"] for row in report["summary"]] == [0, 5, 1]
