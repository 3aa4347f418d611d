"""The throughput benchmark runs end to end on the CPU with the tiny model (a smoke test of
the script and of the daemon's batching path; timings are never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_smoke(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--jobs",
            "4",
            "--steps",
            "2",
            "--size",
            "64",
            "--max-batch",
            "4",
            "--model-dir",
            str(tiny_model),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for side in ("baseline", "imagineerd"):
        numbers = data[side]
        assert numbers["images"] == 4
        for key in (
            "images_per_min",
            "seconds_per_image",
            "latency_p50",
            "latency_p90",
            "time_to_first_image",
            "single_job_latency",
            "unet_tflops",
        ):
            assert numbers[key] > 0, (side, key)
    assert data["imagineerd"]["max_batch"] == 4
    assert data["unet_flops_per_image"] > 0 and data["speedup_images_per_min"] > 0
    # Same seeds, same images: batching changed nothing (CPU fp32).
    assert data["image_difference"]["mean_abs_max"] <= 0.05
    assert "| images/min |" in result.stdout


def test_throughput_suite_runs_every_workload_of_the_gpu_table(tmp_path: Path):
    """``--suite`` on the tiny models: both workloads of the GPU table, each with its own
    baseline, the first with mixed samplers; the JSON holds what each measured."""
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--suite",
            "--max-batch",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    sd15, sdxl = data["workloads"]["sd15-512-mixed-samplers"], data["workloads"]["sdxl-1024"]
    assert sd15["model"]["schedulers"] == ["euler", "euler_a", "dpmpp_2m", "ddim", "unipc"]
    assert (sd15["model"]["arch"], sdxl["model"]["arch"]) == ("sd15", "sdxl")
    for workload in (sd15, sdxl):
        assert workload["baseline"]["images"] == workload["imagineerd"]["images"] == 4
        assert workload["imagineerd"]["restart_to_first_image"] > 0
        assert workload["targets"] == {}  # targets are for full-size models on a GPU
    # Mixed samplers, each job with its own seed: the same images as plain diffusers.
    assert sd15["image_difference"]["mean_abs_max"] <= 0.05


def test_targets_are_checked_as_the_table_states_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    result = {
        "speedup_images_per_min": 12.0,
        "imagineerd": {
            "images_per_min": 480.0,
            "single_job_latency": 0.2,
            "restart_to_first_image": 31.0,
        },
    }
    targets = throughput.check(result, throughput.SUITE[0][2])
    assert {k: v["met"] for k, v in targets.items()} == {
        "images_per_min": False,
        "speedup": True,
        "single_job_latency": True,
        "restart": False,
    }
