"""kill -9 of a real ``imagineerd serve`` process while it works: nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from imagineerd import config as config_mod
from imagineerd import outputs
from imagineerd.daemon import Daemon
from imagineerd.jobs import COMPLETED, RUNNING

from .conftest import wait_for, write_config


def start_serve(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "imagineerd", "serve", "--config", str(config)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_kill_9_mid_job_then_restart_completes_every_job_once(tmp_path: Path, tiny_model: Path):
    config_path = write_config(tmp_path, tiny_model, generation={"steps": 40})
    client = Daemon(config_mod.load(config_path))  # submits and reads; runs no worker
    ids = [client.submit({"prompt": f"job {i}", "seed": i}).id for i in range(4)]
    log = tmp_path / "serve.log"
    for _ in range(2):
        proc = start_serve(config_path, log)
        try:
            # Kill while a job is half-way through its steps.
            wait_for(
                lambda: any(j.status == RUNNING for j in client.store.running()),
                timeout=120,
                interval=0.05,
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    proc = start_serve(config_path, log)
    try:
        wait_for(lambda: all(client.job(i).status == COMPLETED for i in ids), timeout=180)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    jobs = [client.job(i) for i in ids]
    images = sorted(client.outputs_dir.glob("*.png"))
    assert len(images) == len(ids)  # none missing, none doubled
    assert {p.name for p in images} == {Path(j.output_path).name for j in jobs}
    assert not list(client.outputs_dir.glob(f"{outputs.TEMP_PREFIX}*"))
    for job in jobs:
        assert (
            outputs.read_metadata(images[0].parent / Path(job.output_path).name)["imagineerd"]["id"]
            == job.id
        )
    assert sum(j.attempts for j in jobs) >= len(ids) + 1  # at least one job was re-run
    assert all(j.attempts <= 3 for j in jobs)
    client.store.close()
