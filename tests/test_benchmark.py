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
    assert data["image_difference"]["mean_abs_max"] <= 1.0
    assert "| images/min |" in result.stdout
