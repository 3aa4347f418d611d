"""Look-ahead (``performance.look_ahead``): the next batch is claimed and its prompts encoded
at the current batch's last step, on the worker thread, and nothing about the jobs changes:
the same images, the same order, nothing lost when the daemon stops or a worker hangs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imagineerd import hookimpl
from imagineerd import jobs as jobs_mod
from imagineerd import worker as worker_mod
from imagineerd.backends import BackendBase, settings, wants_previews
from imagineerd.backends.diffusers_backend import DiffusersBackend
from imagineerd.backends.runtime import LoadedModel
from imagineerd.daemon import Daemon
from imagineerd.errors import Conflict
from imagineerd.jobs import CANCELLED, COMPLETED, FAILED, QUEUED
from imagineerd.plugins import get_plugin_manager
from imagineerd.worker import Supervisor

from .conftest import wait_finished, wait_for


class Timeline:
    """What the diffusers backend does, in order: each batch's start and end, every step the
    worker is told of, every prompt encoded, every decode, every start announced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        self.after_prepare: list = []  # called with the batch once prepare has encoded it
        real_generate, real_prepare = DiffusersBackend.generate, DiffusersBackend.prepare
        real_encode = DiffusersBackend._encode
        real_decode = LoadedModel._vae_decode
        real_started = Daemon.job_started
        timeline = self

        def generate(backend, batch, on_step):
            seeds = [r.seed for r in batch]
            timeline.events.append(("generate", seeds))

            def step(step, total, **preview):
                timeline.events.append(("step", step, total))
                on_step(step, total, **preview)

            step.takes_preview = wants_previews(on_step)
            step.look_ahead = getattr(on_step, "look_ahead", None)
            try:
                return real_generate(backend, batch, step)
            finally:
                timeline.events.append(("end", seeds))

        def prepare(backend, batch):
            timeline.events.append(("prepare", [r.seed for r in batch]))
            real_prepare(backend, batch)
            for hook in timeline.after_prepare:
                hook(batch)

        def encode(backend, model, request):
            timeline.events.append(("encode", request.seed))
            return real_encode(backend, model, request)

        monkeypatch.setattr(DiffusersBackend, "generate", generate)
        monkeypatch.setattr(DiffusersBackend, "prepare", prepare)

        def decode(model, vae, latents, *, upcast):
            timeline.events.append(("decode", len(latents)))
            return real_decode(model, vae, latents, upcast=upcast)

        def job_started(daemon, job):
            timeline.events.append(("started", job.spec.seed))
            real_started(daemon, job)

        monkeypatch.setattr(DiffusersBackend, "_encode", encode)
        monkeypatch.setattr(Daemon, "job_started", job_started)
        monkeypatch.setattr(LoadedModel, "_vae_decode", decode)

    def without_steps(self) -> list[tuple]:
        """The events with each batch's steps but its last left out."""
        return [e for e in self.events if e[0] != "step" or e[1] == e[2]]


def pixels(daemon: Daemon, job) -> np.ndarray:
    with Image.open(daemon.config.base_dir / job.output_path) as image:
        return np.asarray(image.convert("RGB"))


def run(daemon: Daemon, requests: list[dict]) -> list:
    ids = [daemon.submit(r).id for r in requests]  # all queued before the worker starts
    daemon.start()
    try:
        return [wait_finished(daemon, i, 120) for i in ids]
    finally:
        daemon.stop()


REQUESTS = [{"prompt": f"a lighthouse, study {i}", "seed": i, "steps": 3} for i in range(1, 7)]


def test_the_next_batch_is_claimed_and_encoded_at_the_last_step(make_config, monkeypatch):
    timeline = Timeline(monkeypatch)
    config = make_config(performance={"max_batch": 2, "look_ahead": True})
    daemon = Daemon(config)
    finished = run(daemon, REQUESTS)
    assert [j.status for j in finished] == [COMPLETED] * 6
    assert timeline.without_steps() == [
        ("started", 1),
        ("started", 2),
        ("generate", [1, 2]),
        ("encode", 1),
        ("encode", 2),
        ("step", 3, 3),
        ("decode", 2),
        # While the first batch's decode runs on the device: the next batch is claimed, its
        # prompts encoded and its start announced, so its own call does none of that.
        ("prepare", [3, 4]),
        ("encode", 3),
        ("encode", 4),
        ("started", 3),
        ("started", 4),
        ("end", [1, 2]),
        ("generate", [3, 4]),
        ("step", 3, 3),
        ("decode", 2),
        ("prepare", [5, 6]),
        ("encode", 5),
        ("encode", 6),
        ("started", 5),
        ("started", 6),
        ("end", [3, 4]),
        ("generate", [5, 6]),
        ("step", 3, 3),
        ("decode", 2),
        ("end", [5, 6]),  # nothing left to claim
    ]
    assert daemon.workers[0].looked_ahead == 2
    # Each batch is still one claim, in queue order.
    starts = [j.started_at for j in finished]
    assert starts[0] == starts[1] < starts[2] == starts[3] < starts[4] == starts[5]


def test_images_are_the_same_with_and_without_look_ahead(make_config, tmp_path):
    ahead = Daemon(make_config(performance={"max_batch": 2, "look_ahead": True}))
    with_ahead = run(ahead, REQUESTS)
    plain_config = make_config(
        performance={"max_batch": 2, "look_ahead": False},
        paths={"outputs": "plain", "state": "state-plain"},
    )
    plain = Daemon(plain_config)
    without = run(plain, REQUESTS)
    assert ahead.workers[0].looked_ahead == 2 and plain.workers[0].looked_ahead == 0
    for a, b in zip(with_ahead, without, strict=True):
        assert a.status == b.status == COMPLETED
        assert np.array_equal(pixels(ahead, a), pixels(plain, b)), a.spec.seed


def test_without_look_ahead_each_batch_is_claimed_and_encoded_when_it_starts(
    make_config, monkeypatch
):
    timeline = Timeline(monkeypatch)
    daemon = Daemon(make_config(performance={"max_batch": 2}))  # auto: off on a CPU
    run(daemon, REQUESTS[:4])
    assert daemon.workers[0].look_ahead is False
    assert timeline.without_steps() == [
        ("started", 1),
        ("started", 2),
        ("generate", [1, 2]),
        ("encode", 1),
        ("encode", 2),
        ("step", 3, 3),
        ("decode", 2),
        ("end", [1, 2]),
        ("started", 3),
        ("started", 4),
        ("generate", [3, 4]),
        ("encode", 3),
        ("encode", 4),
        ("step", 3, 3),
        ("decode", 2),
        ("end", [3, 4]),
    ]


def test_auto_looks_ahead_on_gpus_only(make_config):
    daemon = Daemon(make_config())
    auto = Supervisor(daemon, ["cuda:0", "cuda:1", "cpu"], "auto", "auto")
    assert [w.look_ahead for w in auto.workers] == [True, True, False]
    assert [w.max_batch for w in auto.workers] == [8, 8, 1]
    assert [w.look_ahead for w in Supervisor(daemon, ["cuda", "cpu"], 2, False).workers] == [
        False,
        False,
    ]
    assert [w.look_ahead for w in Supervisor(daemon, ["cpu"], 2, True).workers] == [True]


def test_a_stop_puts_the_batch_claimed_ahead_back_at_the_head_in_order(make_config, monkeypatch):
    timeline = Timeline(monkeypatch)
    config = make_config(performance={"max_batch": 2, "look_ahead": True})
    daemon = Daemon(config)
    ids = [daemon.submit(r).id for r in REQUESTS]
    stopper = threading.Thread(target=daemon.stop)

    def stop_now(batch):  # the next batch is claimed: one of it interrupted, then a stop
        if not stopper.is_alive():
            daemon.interrupt(ids[3])
            stopper.start()
            wait_for(daemon.stopping.is_set, 10)

    timeline.after_prepare.append(stop_now)
    daemon.start()
    stopper_started = wait_for(lambda: stopper.ident, 60)
    assert stopper_started
    stopper.join(60)
    again = Daemon(config)  # the stopped daemon's store is closed: the file, as restarted
    jobs = [again.job(i) for i in ids]
    # The batch in hand was past its last step: it ended. The one claimed ahead never
    # started: queued again, ahead of the rest, without an attempt counted; but the job
    # interrupted meanwhile ended as its interrupt was answered: cancelled.
    statuses = [COMPLETED, COMPLETED, QUEUED, CANCELLED, QUEUED, QUEUED]
    assert [j.status for j in jobs] == statuses
    rest = [ids[2], ids[4], ids[5]]
    assert [j.id for j in again.store.queued()] == rest
    assert all(again.job(i).attempts == 0 for i in rest), [j.attempts for j in jobs]
    again.start()
    try:
        finished = [wait_finished(again, i, 120) for i in rest]
    finally:
        again.stop()
    assert [j.status for j in finished] == [COMPLETED] * 3
    assert finished[0].started_at == finished[1].started_at < finished[2].started_at


def test_a_job_claimed_ahead_can_be_interrupted_not_cancelled(make_config, monkeypatch):
    timeline = Timeline(monkeypatch)
    daemon = Daemon(make_config(performance={"max_batch": 2, "look_ahead": True}))
    ids = [daemon.submit(r).id for r in REQUESTS[:4]]
    refused: list[Exception] = []

    def interrupt_one(batch):
        if batch[0].seed == 3:
            try:
                daemon.cancel(ids[2])
            except Conflict as exc:  # running, as far as anyone can see
                refused.append(exc)
            daemon.interrupt(ids[2])

    timeline.after_prepare.append(interrupt_one)
    daemon.start()
    try:
        jobs = [wait_finished(daemon, i, 120) for i in ids]
    finally:
        daemon.stop()
    assert [j.status for j in jobs] == [COMPLETED, COMPLETED, CANCELLED, COMPLETED]
    assert refused and "interrupt" in refused[0].message
    assert jobs[2].progress_step == 1  # it stopped at its first step; its neighbour went on


def test_a1111_skip_stops_the_images_in_progress_not_the_batch_claimed_ahead(
    start_api, monkeypatch
):
    timeline = Timeline(monkeypatch)
    api = start_api(performance={"max_batch": 2, "look_ahead": True})
    assert api("POST", "/api/queue/pause", json={}).status_code == 200
    ids = [api("POST", "/api/generate", json=r).json()["id"] for r in REQUESTS[:4]]
    answers: list[dict] = []

    def skip(batch):  # the first batch is at its last step; the second is claimed
        if batch[0].seed == 3:
            answers.append(api("POST", "/sdapi/v1/skip", json={}).json())

    timeline.after_prepare.append(skip)
    assert api("POST", "/api/queue/resume", json={}).status_code == 200
    statuses = [api.wait_job(i, 120)["status"] for i in ids]
    # The first batch was past its last step (skipping it changes nothing); the second,
    # claimed ahead, had not started: it is not what skip means.
    assert answers == [{"interrupted": ids[:2], "cancelled": []}]
    assert statuses == [COMPLETED] * 4


def test_prepare_encodes_only_for_the_model_and_loras_in_use(make_config, monkeypatch):
    timeline = Timeline(monkeypatch)
    config = make_config()
    backend = DiffusersBackend(settings(config, "cpu"))
    defaults = config["generation"]

    def spec(**fields):
        return jobs_mod.validate({"prompt": "a harbour", "steps": 2, **fields}, defaults)

    backend.prepare([spec(model="another-model.safetensors", seed=1)])
    backend.prepare([spec(prompt="a harbour <lora:ink:0.8>", seed=2)])
    assert [e for e in timeline.events if e[0] == "encode"] == []

    here = [spec(seed=3), spec(seed=4)]
    backend.prepare(here)
    assert [e for e in timeline.events if e[0] == "encode"] == [("encode", 3), ("encode", 4)]
    timeline.events.clear()
    images = backend.generate(here, lambda step, total: None)
    assert len(images) == 2 and ("encode", 3) not in timeline.events
    # An entry is used once: the same requests again are encoded anew.
    backend.generate(here, lambda step, total: None)
    assert [e for e in timeline.events if e[0] == "encode"] == [("encode", 3), ("encode", 4)]


def test_a_batch_of_two_prompt_lengths_counts_its_steps_as_one_bar(make_config):
    config = make_config()
    backend = DiffusersBackend(settings(config, "cpu"))
    defaults = config["generation"]
    long = ", ".join(f"detail {i}" for i in range(60))  # more than one 75-token chunk
    batch = [
        jobs_mod.validate({"prompt": prompt, "steps": 3, "seed": 5}, defaults)
        for prompt in ("a short prompt", long)
    ]
    steps: list[tuple[int, int]] = []
    images = backend.generate(batch, lambda step, total: steps.append((step, total)))
    assert len(images) == 2
    # Two calls, one bar: the last step (where the next batch is claimed) comes once.
    assert steps == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]


class HangsAfterItsLastStep(BackendBase):
    """A backend that reports its last step and then stops responding, like a driver that
    wedges in the decode (a real hang cannot be made on purpose); for the prompt "hang"."""

    release = threading.Event()

    def __init__(self, settings):
        pass

    def generate(self, batch, on_step):
        steps = batch[0].steps
        for step in range(1, steps + 1):
            on_step(step, steps)
        if batch[0].prompt == "hang":
            HangsAfterItsLastStep.release.wait(60)
        return [Image.new("RGB", (r.width, r.height), "white") for r in batch]


class HangsPlugin:
    @hookimpl
    def imagineerd_register_backends(self, registry):
        registry.add("hangs-after-last-step", HangsAfterItsLastStep)


def test_a_hung_worker_gives_back_the_batch_it_claimed_ahead(make_config):
    config = make_config(
        model={"backend": "hangs-after-last-step"},
        performance={"max_batch": 1, "look_ahead": True, "job_timeout": 1.0},
    )
    daemon = Daemon(config, plugin_manager=get_plugin_manager([HangsPlugin()]))
    hung = daemon.submit({"prompt": "hang"})
    ahead = daemon.submit({"prompt": "second"})
    daemon.start()
    original = daemon.workers[0]
    try:
        assert wait_finished(daemon, hung.id, 30).status == FAILED
        done = wait_finished(daemon, ahead.id, 30)
        assert done.status == COMPLETED and done.attempts == 1  # the claim ahead: not counted
        assert original.abandoned and daemon.workers[0] is not original
        HangsAfterItsLastStep.release.set()  # the stuck thread returns: it changes nothing
        original.join(30)
        assert not original.is_alive()
        assert daemon.job(ahead.id).status == COMPLETED
        assert original.take_next() == []
    finally:
        HangsAfterItsLastStep.release.set()
        daemon.stop()
        HangsAfterItsLastStep.release.clear()


class OutOfMemoryOnce(BackendBase):
    """Runs every step, then runs out of memory on the first batch of two, where a decode
    would (a real out-of-memory error cannot be made on purpose on a CPU)."""

    failed = False

    def __init__(self, settings):
        pass

    def generate(self, batch, on_step):
        steps = batch[0].steps
        for step in range(1, steps + 1):
            on_step(step, steps)
        if len(batch) > 1 and not OutOfMemoryOnce.failed:
            OutOfMemoryOnce.failed = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return [Image.new("RGB", (r.width, r.height), "white") for r in batch]


class OutOfMemoryPlugin:
    @hookimpl
    def imagineerd_register_backends(self, registry):
        registry.add("oom-once", OutOfMemoryOnce)


def test_an_out_of_memory_split_after_the_claim_ahead_claims_no_second_batch(make_config):
    OutOfMemoryOnce.failed = False
    config = make_config(
        model={"backend": "oom-once"}, performance={"max_batch": 2, "look_ahead": True}
    )
    daemon = Daemon(config, plugin_manager=get_plugin_manager([OutOfMemoryPlugin()]))
    ids = [daemon.submit({"prompt": f"p{i}", "seed": i}).id for i in range(6)]
    daemon.start()
    try:
        jobs = [wait_finished(daemon, i, 60) for i in ids]
    finally:
        daemon.stop()
    assert OutOfMemoryOnce.failed and [j.status for j in jobs] == [COMPLETED] * 6
    # Claimed ahead: [3, 4] at the failed attempt's last step, then (batches capped at 1
    # since) [5] and [6]; the halves run again claimed nothing over [3, 4].
    assert daemon.workers[0].looked_ahead == 3


def test_a_slow_claim_ahead_does_not_count_against_the_batch_in_hand(make_config):
    config = make_config(
        model={"backend": "hangs-after-last-step"},
        performance={"max_batch": 1, "look_ahead": True, "job_timeout": 1.0},
    )
    daemon = Daemon(config, plugin_manager=get_plugin_manager([HangsPlugin()]))
    real_claim = daemon.claim_batch

    def slow_claim(limit, key):  # a store that takes its time, while a batch is in hand
        if any(w.batch_started is not None for w in daemon.workers):
            time.sleep(4)  # past the 1 s limit and its 2 s grace
        return real_claim(limit, key)

    daemon.claim_batch = slow_claim
    first, second = (daemon.submit({"prompt": p}).id for p in ("first", "second"))
    daemon.start()
    original = daemon.workers[0]
    try:
        assert wait_finished(daemon, first, 30).status == COMPLETED
        assert wait_finished(daemon, second, 30).status == COMPLETED
        assert not original.abandoned and daemon.workers[0] is original
    finally:
        daemon.stop()


def test_a_batch_claimed_ahead_by_a_stuck_worker_goes_back_to_the_queue(make_config, monkeypatch):
    monkeypatch.setattr(worker_mod, "AHEAD_HOLD_SECONDS", 1.0)
    config = make_config(
        model={"backend": "hangs-after-last-step"},
        performance={"max_batch": 1, "look_ahead": True},  # no job_timeout: none abandons
    )
    daemon = Daemon(config, plugin_manager=get_plugin_manager([HangsPlugin()]))
    hung = daemon.submit({"prompt": "hang"})
    ahead = daemon.submit({"prompt": "second"})
    daemon.start()
    try:
        # Claimed at the hung job's last step, then given back for another device to take.
        wait_for(lambda: daemon.workers[0].looked_ahead == 1, 30)
        wait_for(lambda: daemon.job(ahead.id).status == QUEUED and not daemon.claimed_ahead())
        HangsAfterItsLastStep.release.set()
        assert wait_finished(daemon, hung.id, 30).status == COMPLETED
        assert wait_finished(daemon, ahead.id, 30).status == COMPLETED
    finally:
        HangsAfterItsLastStep.release.set()
        daemon.stop()
        HangsAfterItsLastStep.release.clear()
