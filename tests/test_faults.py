"""Faults: a backend that raises, hangs or runs out of memory; a full disk; a locked
database. The job fails with a clear reason or waits, nothing is lost, the next job runs."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagineerd import hookimpl
from imagineerd.backends import BackendBase
from imagineerd.daemon import Daemon
from imagineerd.errors import Unavailable
from imagineerd.jobs import COMPLETED, FAILED, QUEUED
from imagineerd.plugins import get_plugin_manager
from imagineerd.sqlite_store import SQLiteStore

from .conftest import wait_finished


class Misbehaving(BackendBase):
    """What the first job's prompt asks for, it does: boom, hang, oom, crawl."""

    release = threading.Event()

    def __init__(self, settings):
        self.settings = settings

    def generate(self, batch, on_step):
        prompt = batch[0].prompt
        if prompt == "boom":
            raise RuntimeError("the backend broke")
        if prompt == "hang":  # never calls back, like a wedged driver
            Misbehaving.release.wait(60)
            return [Image.new("RGB", (8, 8))]
        if prompt == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        for step in range(1, batch[0].steps + 1):
            if prompt == "crawl":
                time.sleep(0.3)
            on_step(step, batch[0].steps)
        return [Image.new("RGB", (r.width, r.height), "white") for r in batch]


class Plugin:
    @hookimpl
    def imagineerd_register_backends(self, registry):
        registry.add("misbehaving", Misbehaving)


@pytest.fixture
def start(make_config):
    daemons = []

    def start(**performance) -> Daemon:
        d = Daemon(
            make_config(
                model={"backend": "misbehaving"}, performance={"max_batch": 1, **performance}
            ),
            plugin_manager=get_plugin_manager([Plugin()]),
        )
        d.start()
        daemons.append(d)
        return d

    yield start
    Misbehaving.release.set()
    for d in daemons:
        d.stop()
    Misbehaving.release.clear()


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("boom", "RuntimeError: the backend broke"),
        ("oom", "out of memory on the GPU"),
    ],
)
def test_a_failing_backend_fails_the_job_and_the_next_runs(start, prompt, words):
    d = start()
    bad = d.submit({"prompt": prompt})
    good = d.submit({"prompt": "fine"})
    failed = wait_finished(d, bad.id)
    assert failed.status == FAILED and words in failed.error
    assert wait_finished(d, good.id).status == COMPLETED


def test_a_slow_job_stops_at_its_time_limit(start):
    d = start(job_timeout=1.0)
    slow = d.submit({"prompt": "crawl", "steps": 50})
    good = d.submit({"prompt": "fine"})
    failed = wait_finished(d, slow.id, 30)
    assert failed.status == FAILED and "performance.job_timeout (1 s)" in failed.error
    assert failed.progress_step < 50
    assert wait_finished(d, good.id).status == COMPLETED


def test_a_hung_backend_is_abandoned_and_a_new_worker_takes_over(start):
    d = start(job_timeout=1.0)
    original = d.workers[0]
    hung = d.submit({"prompt": "hang"})
    good = d.submit({"prompt": "fine"})
    failed = wait_finished(d, hung.id, 30)
    assert failed.status == FAILED and "stopped responding" in failed.error
    assert wait_finished(d, good.id, 30).status == COMPLETED
    assert original.abandoned and d.workers[0] is not original and d.workers[0].is_alive()
    Misbehaving.release.set()  # the stuck thread returns at last: it must change nothing
    original.join(30)
    assert not original.is_alive()
    assert d.job(hung.id).status == FAILED and not list(d.outputs_dir.glob(f"*_{hung.id}.png"))


def test_full_disk_fails_jobs_clearly_and_recovers_when_space_returns(make_config, tmpfs):
    tiny_disk = tmpfs("small", "320k")
    filler = tiny_disk / "filler.bin"
    filler.write_bytes(b"\0" * (300 * 1024))
    d = Daemon(
        make_config(paths={"outputs": str(tiny_disk)}, generation={"width": 256, "height": 256})
    )
    # A 256x256 noise PNG (~200 KB) does not fit in the 20 KiB left.
    d.start(workers=False)
    ids = [d.submit({"prompt": f"big {i}", "seed": i}).id for i in range(3)]
    from imagineerd.worker import Worker

    worker = Worker(d, device="cpu")
    first = d.store.claim_next(started_at=d.now_iso())
    worker.process([first])
    d.drain_saves()
    failed = d.job(ids[0])
    assert failed.status == FAILED and "No space left on device" in failed.error
    assert [d.job(i).status for i in ids[1:]] == [QUEUED, QUEUED]  # the queue is intact
    assert not [p for p in tiny_disk.iterdir() if p.name != "filler.bin"]  # no partial file
    filler.unlink()  # space is back
    for job in (d.store.claim_next(started_at=d.now_iso()) for _ in ids[1:]):
        worker.process([job])
    d.drain_saves()
    assert [d.job(i).status for i in ids[1:]] == [COMPLETED, COMPLETED]
    d.stop()


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    # A child that never gets its lock must fail the test, not hang it.
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
    line = proc.stdout.readline().strip() if ready else ""
    proc.stdout.close()  # nothing more is printed; nothing left to fill a pipe
    assert line == "locked", "the locking process did not get its lock within 30 s"
    return proc


def test_a_database_locked_by_another_program_is_waited_for_or_reported(tmp_path, start_api):
    api = start_api(workers=False)
    db_path = api.daemon.store.path
    locker = hold_lock(db_path, 1.5)
    started = time.monotonic()
    response = api("POST", "/api/generate", json={"prompt": "patient"})
    assert response.status_code == 201 and time.monotonic() - started >= 1.0  # it waited
    locker.wait()

    impatient = SQLiteStore(db_path, timeout=0.3)
    locker = hold_lock(db_path, 2)
    try:
        with pytest.raises(Unavailable, match="locked by another program"):
            impatient.add(api.daemon.validate({"prompt": "x"}), submitted_at="now")
    finally:
        locker.wait()
        impatient.close()
    assert api("GET", "/api/health").json()["status"] == "ok"


def test_workers_outlive_a_locked_database(make_config, caplog):
    config = make_config()
    impatient = SQLiteStore(config.path_for("state") / "imagineerd.db", timeout=0.2)
    d = Daemon(config, store=impatient)
    d.start()
    try:
        before = d.submit({"prompt": "before the lock"}).id
        assert wait_finished(d, before, 60).status == COMPLETED
        with caplog.at_level("ERROR", logger="imagineerd.worker"):
            locker = hold_lock(d.store.path, 3)  # the idle worker's claims fail meanwhile
            locker.wait()
        assert "the job database is locked" in caplog.text  # it really hit the lock
        assert all(w.is_alive() for w in d.workers)
        after = d.submit({"prompt": "after the lock"}).id
        assert wait_finished(d, after, 60).status == COMPLETED
    finally:
        d.stop()


def test_the_largest_allowed_job_fails_cleanly_when_it_cannot_finish(make_config):
    """2048x2048 at 150 steps is within the API's bounds. On this CPU it cannot finish in
    the time allowed: it must end as a clear failure, never take the daemon down."""
    d = Daemon(make_config(performance={"job_timeout": 3.0}))
    d.start()
    try:
        job = d.submit({"prompt": "huge", "width": 2048, "height": 2048, "steps": 150})
        small = d.submit({"prompt": "small"})
        failed = wait_finished(d, job.id, 120)
        assert failed.status == FAILED and "performance.job_timeout" in failed.error
        assert wait_finished(d, small.id, 120).status == COMPLETED
        assert d.health()["status"] == "ok"
    finally:
        # One step of this job takes the tiny model tens of seconds on a busy 2-core machine:
        # the bound is for a hang, not for speed.
        d.stop(timeout=240)
    # A worker abandoned on the way ended at its next step, and stop waited for it: a thread
    # left in torch's native code aborts the interpreter at exit.
    assert not d.supervisor.stuck()
