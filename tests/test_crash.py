"""kill -9 of a real ``imagineerd serve`` process while it works: nothing is lost or doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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
    """Two of the four jobs start from an image (one repaints it): their stored inputs
    outlive the kills as the jobs do."""
    from .test_image_inputs import data_url, noise, png, square_mask

    config_path = write_config(tmp_path, tiny_model, generation={"steps": 40})
    client = Daemon(config_mod.load(config_path))  # submits and reads; runs no worker
    photo = data_url(png(noise()))
    mask = data_url(png(square_mask()))
    inputs = [{}, {"init_image": photo}, {}, {"init_image": photo, "mask": mask}]
    ids = [client.submit({"prompt": f"job {i}", "seed": i, **inputs[i]}).id for i in range(4)]
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
    assert [j.spec.mode for j in jobs] == ["txt2img", "img2img", "txt2img", "inpaint"]
    client.store.close()


def test_twenty_kills_at_random_moments_lose_and_double_nothing(tmp_path: Path, tiny_model: Path):
    """20 x kill -9 of a real daemon that is importing, loading, generating, writing PNGs or
    taking inbox files; after the last restart every API job and every inbox file has given
    exactly one completed job and one image, and nothing is half-written."""
    import random

    rng = random.Random(20261125)
    config_path = write_config(
        tmp_path,
        tiny_model,
        generation={"steps": 20},
        inbox={"enabled": True, "settle_seconds": 0.2, "rescan_seconds": 1.0},
        queue={"max_attempts": 100},  # this test is about losing nothing, not the cap
    )
    client = Daemon(config_mod.load(config_path))
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    api_ids = [client.submit({"prompt": f"api job {i}", "seed": i}).id for i in range(10)]
    files: dict[str, list[str]] = {}

    def drop(n: int) -> None:
        name = f"drop-{n:02}.txt"
        prompts = [f"inbox {n} prompt {k}" for k in range(2)]
        tmp = inbox / f".{name}.part"
        tmp.write_text("\n".join(prompts) + "\n")
        tmp.rename(inbox / name)
        files[name] = prompts

    log = tmp_path / "serve.log"
    for kill in range(20):
        drop(kill)
        proc = start_serve(config_path, log)
        if kill % 4 == 3:  # during start-up: imports, recovery, model loading
            time.sleep(rng.uniform(0.3, 4.0))
        else:  # while it works: claiming, generating, writing PNGs, taking files
            # (If nothing runs within a minute, kill it anyway.)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: client.store.running(), timeout=60, interval=0.01)
            time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    proc = start_serve(config_path, log)
    try:

        def all_done() -> bool:
            receipts = list((inbox / "done").glob("*.result.yaml"))
            jobs = client.store.counts()
            return len(receipts) == len(files) and jobs["queued"] == 0 and jobs["running"] == 0

        wait_for(all_done, timeout=300, interval=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    counts = client.store.counts()
    expected = len(api_ids) + 2 * len(files)
    assert counts["completed"] == expected, counts
    assert counts["failed"] == counts["cancelled"] == 0
    jobs = client.store.history(1000)
    prompts = sorted(j.spec.prompt for j in jobs)
    assert prompts == sorted(
        [f"api job {i}" for i in range(10)] + [p for ps in files.values() for p in ps]
    )  # each exactly once
    images = sorted(client.outputs_dir.glob("*.png"))
    assert len(images) == expected
    assert {Path(j.output_path).name for j in jobs} == {p.name for p in images}
    assert not list(client.outputs_dir.glob(f"{outputs.TEMP_PREFIX}*"))
    assert sorted(p.name for p in (inbox / "done").glob("drop-*.txt")) == sorted(files)
    assert not list((inbox / ".claimed").iterdir()) and not list(inbox.glob("drop-*.txt"))
    assert not list((inbox / "failed").iterdir())
    cut_short = sum(j.attempts for j in jobs) - len(jobs)
    assert cut_short >= 5, cut_short  # the kills really landed while jobs ran
    client.store.close()


def test_kill_9_between_a_jobs_end_and_its_webhook_delivers_it_after_restart(
    tmp_path: Path, tiny_model: Path
):
    """The receiver is down while the job completes; the daemon is killed with the delivery
    still owed; after the restart, with the receiver up, it arrives once."""
    from .test_webhooks import SECRET, Receiver, free_port

    port = free_port()
    hook = {"endpoints": [{"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET}]}
    config_path = write_config(tmp_path, tiny_model, webhooks=hook)
    client = Daemon(config_mod.load(config_path))
    job = client.submit({"prompt": "owed", "seed": 1})
    log = tmp_path / "serve.log"
    proc = start_serve(config_path, log)
    try:
        wait_for(lambda: client.job(job.id).status == COMPLETED, timeout=120)
        wait_for(lambda: any(d.attempts for d in client.store.deliveries(10)), timeout=30)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    (owed,) = client.store.deliveries(10)
    assert owed.state == "pending"
    receiver = Receiver(port)
    proc = start_serve(config_path, log)
    try:
        wait_for(lambda: client.store.deliveries(10)[0].state == "delivered", timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.close()
    assert len(receiver.received) == 1
    client.store.close()
