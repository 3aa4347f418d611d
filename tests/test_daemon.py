"""The daemon end to end on the tiny model: real SQLite, real diffusers, real PNGs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from imagineerd import daemon as daemon_mod
from imagineerd import outputs
from imagineerd.daemon import Daemon
from imagineerd.errors import Conflict, Gone, NotFound, ValidationError
from imagineerd.jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING

from .conftest import wait_finished, wait_for


def test_job_runs_to_a_png_with_metadata(daemon: Daemon):
    job = daemon.submit({"prompt": "a red fox, at dawn", "seed": 42, "negative_prompt": "blur"})
    assert job.status == QUEUED and job.spec.steps == 2  # default from config
    done = wait_finished(daemon, job.id)
    assert done.status == COMPLETED, done.error
    assert done.output_path.startswith("outputs/") and done.output_path.endswith(f"_{job.id}.png")
    assert done.duration_seconds > 0 and done.completed_at >= done.started_at
    path = daemon.config.base_dir / done.output_path
    with Image.open(path) as image:
        assert image.size == (64, 64)
    meta = outputs.read_metadata(path)
    info = outputs.parse_infotext(meta["parameters"])
    assert info["prompt"] == "a red fox, at dawn" and info["negative_prompt"] == "blur"
    assert info["Seed"] == "42" and info["Steps"] == "2" and info["Sampler"] == "Euler"
    assert info["Size"] == "64x64" and info["CFG scale"] == "7.5"
    assert info["Model"] == "tiny-sd15"
    record = meta["imagineerd"]
    assert record["id"] == job.id and record["seed"] == 42 and record["backend"] == "diffusers"
    assert record["started_at"] == done.started_at
    assert done.started_at <= record["completed_at"] <= done.completed_at
    view = daemon.job_view(done)
    assert view["progress"] == {"step": 2, "total": 2, "percent": 100.0}


def test_events_follow_a_job_through_every_step(daemon: Daemon, monkeypatch):
    monkeypatch.setattr(daemon_mod, "PROGRESS_EVENT_INTERVAL", 0.0)  # every step, to count
    with daemon.events.subscribe() as sub:
        job = daemon.submit({"prompt": "events", "steps": 3})
        seen = []
        while not seen or seen[-1].type != "job.completed":
            event = sub.get(timeout=30)
            assert event is not None
            if event.data.get("id") == job.id:
                seen.append(event)
    types = [e.type for e in seen]
    assert types[:2] == ["job.submitted", "job.started"]
    assert [e.data["step"] for e in seen if e.type == "job.progress"] == [1, 2, 3]
    assert [e.id for e in seen] == sorted(e.id for e in seen)


def test_progress_events_are_thinned_but_the_view_has_every_step(make_config):
    d = Daemon(make_config())
    d.start(workers=False)
    try:
        with d.events.subscribe(d.events.position) as sub:
            started = time.monotonic()
            for step in range(1, 201):
                d.report_progress(7, step, 200)
                if step == 150:
                    assert d.views.progress[7] == (150, 200)
            took = time.monotonic() - started
            seen = []
            while (event := sub.get(timeout=0.2)) is not None:
                seen.append(event.data["step"])
    finally:
        d.stop()
    assert seen[0] == 1 and seen[-1] == 200 and seen == sorted(seen)
    assert len(seen) <= 2 + took / daemon_mod.PROGRESS_EVENT_INTERVAL  # not one per step


def test_cancel_semantics_for_every_status(make_config):
    d = Daemon(make_config())
    d.start(workers=False)  # nothing runs: statuses are set up by hand below
    try:
        queued = d.submit({"prompt": "q"})
        running = d.submit({"prompt": "r"})
        assert d.cancel(queued.id).status == CANCELLED
        with pytest.raises(Gone, match="already cancelled"):
            d.cancel(queued.id)
        claimed = d.store.claim_next(started_at=d.now_iso())
        assert claimed.id == running.id
        with pytest.raises(Conflict, match="interrupt"):
            d.cancel(running.id)
        d.job_finished(claimed, COMPLETED, output_path="outputs/x.png")
        with pytest.raises(Gone, match="already completed"):
            d.cancel(running.id)
        with pytest.raises(NotFound):
            d.cancel(999)
        with pytest.raises(ValidationError):
            d.submit({"prompt": "x", "steps": 0})
        assert d.store.counts()[QUEUED] == 0  # the invalid job never reached the store
    finally:
        d.stop()


def test_interrupt_stops_the_running_job_at_a_step(daemon: Daemon):
    with daemon.events.subscribe() as sub:
        job = daemon.submit({"prompt": "long", "steps": 150})
        nxt = daemon.submit({"prompt": "next"})
        while True:
            event = sub.get(timeout=30)
            if event and event.type == "job.progress" and event.data["id"] == job.id:
                break
        with pytest.raises(Conflict, match="DELETE"):
            daemon.interrupt(nxt.id)
        daemon.interrupt(job.id)
    done = wait_finished(daemon, job.id)
    assert done.status == CANCELLED and done.progress_step < 150
    assert wait_finished(daemon, nxt.id).status == COMPLETED  # the queue goes on
    with pytest.raises(Gone):
        daemon.interrupt(job.id)


def test_same_seed_same_image_and_different_seed_differs(daemon: Daemon):
    ids = [daemon.submit({"prompt": "a lighthouse", "seed": s}).id for s in (5, 5, 6)]
    paths = [daemon.config.base_dir / wait_finished(daemon, i).output_path for i in ids]
    a, b, c = (Image.open(p).convert("RGB").tobytes() for p in paths)
    assert a == b
    assert a != c


def test_stop_puts_the_running_job_back_without_counting_an_attempt(make_config):
    d = Daemon(make_config())
    d.start()
    job = d.submit({"prompt": "slow", "steps": 150})
    wait_for(lambda: d.job(job.id).status == RUNNING and d.views.progress.get(job.id, (0, 0))[0])
    d.stop()
    d2 = Daemon(make_config())
    back = d2.job(job.id)
    assert back.status == QUEUED and back.attempts == 0
    assert not list(d2.outputs_dir.glob("*.png"))
    d2.store.close()


def test_recovery_after_a_crash_requeues_then_completes(make_config):
    d = Daemon(make_config())
    d.start(workers=False)
    first = d.submit({"prompt": "was running"})
    second = d.submit({"prompt": "was waiting"})
    d.store.claim_next(started_at=d.now_iso())  # running when the process "died"
    partial = d.outputs_dir / f"{outputs.TEMP_PREFIX}zz.png.tmp"
    partial.write_bytes(b"\x89PNG half")
    d.store.close()  # no stop(): the process is gone

    d2 = Daemon(make_config())
    d2.start()
    try:
        assert not partial.exists()
        a, b = wait_finished(d2, first.id), wait_finished(d2, second.id)
        assert (a.status, b.status, a.attempts) == (COMPLETED, COMPLETED, 2)
        assert a.completed_at <= b.completed_at  # recovered job went first
        assert len(list(d2.outputs_dir.glob("*.png"))) == 2
    finally:
        d2.stop()


def test_recovery_completes_a_job_whose_image_was_already_written(make_config):
    d = Daemon(make_config())
    d.start(workers=False)
    job = d.submit({"prompt": "written"})
    claimed = d.store.claim_next(started_at=d.now_iso())
    d.saver.save(claimed, Image.new("RGB", (64, 64)), duration=1.25, model_label="m")
    d.store.close()  # died between the rename and the store update

    d2 = Daemon(make_config())
    d2.start(workers=False)
    try:
        done = d2.job(job.id)
        assert done.status == COMPLETED and done.duration_seconds == 1.25
        assert len(list(d2.outputs_dir.glob("*.png"))) == 1  # not generated twice
    finally:
        d2.stop()


def test_recovery_announces_every_job_it_finishes_or_requeues(make_config):
    """Start-up recovery finishes jobs like any other path: an event and the hook each."""
    from imagineerd import hookimpl
    from imagineerd.plugins import get_plugin_manager

    d = Daemon(make_config(queue={"max_attempts": 1}))
    d.start(workers=False)
    written = d.submit({"prompt": "image already written"})
    doomed = d.submit({"prompt": "keeps killing the daemon"})
    first = d.store.claim_next(started_at=d.now_iso())
    d.saver.save(first, Image.new("RGB", (64, 64)), duration=0.5, model_label="m")
    d.store.claim_next(started_at=d.now_iso())  # 1 attempt = queue.max_attempts
    d.store.close()  # the process died with both running

    finished: list[tuple[int, str]] = []

    class Recorder:
        @hookimpl
        def imagineerd_job_finished(self, job):
            finished.append((job["id"], job["status"]))

    d2 = Daemon(
        make_config(queue={"max_attempts": 1}), plugin_manager=get_plugin_manager([Recorder()])
    )
    with d2.events.subscribe() as sub:
        d2.start(workers=False)
        events = []
        while (event := sub.get(timeout=0.1)) is not None:
            events.append((event.type, event.data["id"]))
    try:
        assert sorted(finished) == [(written.id, COMPLETED), (doomed.id, FAILED)]
        assert ("job.completed", written.id) in events and ("job.failed", doomed.id) in events
    finally:
        d2.stop()


def test_unavailable_model_fails_the_job_with_advice_and_daemon_stays_up(make_config, tmp_path):
    d = Daemon(make_config(model={"name": "nobody/no-such-model"}))
    d.start()
    try:
        done = wait_finished(d, d.submit({"prompt": "x"}).id)
        assert done.status == FAILED
        assert "nobody/no-such-model" in done.error and "model.name" in done.error
        missing = Path(tmp_path / "nope" / "model.safetensors")
        d.config.data["model"]["name"] = str(missing)
        done = wait_finished(d, d.submit({"prompt": "y"}).id)
        assert done.status == FAILED and "does not exist" in done.error
        assert d.health()["status"] == "ok"
    finally:
        d.stop()


def test_unwritable_outputs_fail_the_job_with_a_clear_reason(daemon: Daemon):
    # A file where the outputs folder should be: unwritable even for root, unlike chmod.
    daemon.outputs_dir.rmdir()
    daemon.outputs_dir.write_text("not a folder")
    done = wait_finished(daemon, daemon.submit({"prompt": "x"}).id)
    assert done.status == FAILED
    assert "could not write the image" in done.error and str(daemon.outputs_dir) in done.error
    daemon.outputs_dir.unlink()  # space is back: the next job works
    assert wait_finished(daemon, daemon.submit({"prompt": "y"}).id).status == COMPLETED


def test_health_counts(daemon: Daemon):
    job = daemon.submit({"prompt": "h"})
    wait_finished(daemon, job.id)
    health = daemon.health()
    assert health["status"] == "ok" and health["total_completed"] == 1
    assert health["queue_size"] == 0 and health["current_job"] is False
    assert health["backend"]["state"] == "ready"


def test_hooks_see_submitted_and_finished_jobs(make_config):
    from imagineerd import hookimpl
    from imagineerd.plugins import get_plugin_manager

    seen: list[tuple[str, int, str]] = []
    done = threading.Event()

    class Recorder:
        @hookimpl
        def imagineerd_job_submitted(self, job):
            seen.append(("submitted", job["id"], job["status"]))

        @hookimpl
        def imagineerd_job_finished(self, job):
            seen.append(("finished", job["id"], job["status"]))
            done.set()

    d = Daemon(make_config(), plugin_manager=get_plugin_manager([Recorder()]))
    d.start()
    try:
        job = d.submit({"prompt": "hooked"})
        assert done.wait(60)
        assert seen == [("submitted", job.id, "queued"), ("finished", job.id, "completed")]
    finally:
        d.stop()


def test_estimated_time_remaining_counts_batches_ahead(make_config):
    from imagineerd.worker import Supervisor

    d = Daemon(make_config())
    d.start(workers=False)
    try:
        first = d.submit({"prompt": "no history yet"})
        assert d.job_view(first)["estimated_time_remaining"] is None
        d.submit({"prompt": "h2"})
        d.submit({"prompt": "h3"})
        for _ in range(3):  # history: similar jobs took 10 s each
            job = d.store.claim_next(started_at=d.now_iso())
            d.store.finish(job.id, COMPLETED, completed_at=d.now_iso(), duration_seconds=10.0)
        queued = [d.submit({"prompt": f"q{i}"}) for i in range(5)]
        views = [d.job_view(j) for j in queued]
        assert [v["queue_position"] for v in views] == [1, 2, 3, 4, 5]
        assert [v["estimated_time_remaining"] for v in views] == [10, 20, 30, 40, 50]
        d.supervisor = Supervisor(d, ["cpu"], 4)  # not started: only its batch size counts
        assert [d.job_view(j)["estimated_time_remaining"] for j in queued] == [10, 10, 10, 10, 20]
        running = d.store.claim_next(started_at=d.now_iso())
        d.report_progress(running.id, 1, 2)  # half done
        assert d.job_view(d.job(running.id))["estimated_time_remaining"] == 5.0
        assert d.job_view(d.job(queued[1].id))["estimated_time_remaining"] == 15.0
    finally:
        d.supervisor = None
        d.stop()
