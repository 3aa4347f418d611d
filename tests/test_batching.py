"""Batching in the worker, per-job control inside a batch, OOM retries, several devices."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imagineerd import hookimpl
from imagineerd.backends import BackendBase
from imagineerd.daemon import Daemon
from imagineerd.jobs import CANCELLED, COMPLETED, RUNNING
from imagineerd.plugins import get_plugin_manager

from .conftest import wait_finished, wait_for


def run_all(daemon: Daemon, ids: list[int], timeout: float = 120) -> list:
    return [wait_finished(daemon, i, timeout) for i in ids]


def pixels(daemon: Daemon, job) -> np.ndarray:
    with Image.open(daemon.config.base_dir / job.output_path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_batched_jobs_make_the_same_images_as_alone(make_config, tmp_path_factory):
    requests = [
        {"prompt": p, "seed": s, "negative_prompt": n, "steps": 4}
        for p, s, n in (("a cat", 1, ""), ("a dog", 2, "blurry"), ("a cow", 3, ""))
    ]
    batched = Daemon(make_config(performance={"max_batch": 4}))
    ids = [batched.submit(r).id for r in requests]  # all queued before the worker starts
    batched.start()
    together = run_all(batched, ids)
    batched.stop()
    assert len({j.started_at for j in together}) == 1  # one batch, one claim

    alone_cfg = make_config(
        performance={"max_batch": 1}, paths={"outputs": "alone", "state": "state-alone"}
    )
    single = Daemon(alone_cfg)
    single.start()
    apart = run_all(single, [single.submit(r).id for r in requests])
    single.stop()
    assert len({j.started_at for j in apart}) == 3
    for a, b in zip(together, apart, strict=True):
        assert a.status == b.status == COMPLETED
        diff = np.abs(pixels(batched, a) - pixels(single, b))
        # Rounding at most (another prompt moves the tiny model's image by a mean of > 1).
        assert diff.mean() <= 0.05 and diff.max() <= 1, (diff.mean(), diff.max())
    # Each job keeps its own metadata in a batch.
    negative = [a for a in together if a.spec.prompt == "a dog"][0]
    assert (
        "Negative prompt: blurry"
        in Image.open(batched.config.base_dir / negative.output_path).info["parameters"]
    )


def test_head_of_queue_always_runs_next(make_config):
    d = Daemon(make_config(performance={"max_batch": 4}))
    small = [d.submit({"prompt": f"s{i}", "seed": i}).id for i in range(6)]
    big = d.submit({"prompt": "big", "width": 128, "height": 128}).id
    later = [d.submit({"prompt": f"l{i}", "seed": i}).id for i in range(6)]
    d.start()
    jobs = {j.id: j for j in run_all(d, small + [big] + later)}
    d.stop()
    starts = sorted({j.started_at for j in jobs.values()})
    batches = [[i for i, j in sorted(jobs.items()) if j.started_at == s] for s in starts]
    # The big job waits for at most the batches that the small ones ahead of it are in,
    # then runs before the small jobs that did not fit in those.
    assert batches[0] == small[:4]
    assert batches[1] == small[4:] + later[:2]
    assert batches[2] == [big]
    assert batches[3] == later[2:]


def test_cancel_one_job_inside_a_batch(make_config):
    d = Daemon(make_config(performance={"max_batch": 3}))
    ids = [d.submit({"prompt": f"p{i}", "steps": 150, "seed": i}).id for i in range(3)]
    d.start()
    try:
        wait_for(lambda: d.views.progress.get(ids[1], (0, 0))[0] >= 2, 60)
        assert all(d.job(i).status == RUNNING for i in ids)
        listing = d.list_jobs()
        assert [j["id"] for j in listing["running"]] == ids  # a batch runs several at once
        assert listing["current"]["id"] == ids[0] and listing["queued"] == []
        assert all(j["progress"]["total"] == 150 for j in listing["running"])
        d.interrupt(ids[1])
        wait_for(lambda: d.job(ids[1]).status == CANCELLED, 30)
        assert d.job(ids[0]).status == RUNNING  # the others go on
        done = run_all(d, ids)
        assert [j.status for j in done] == [COMPLETED, CANCELLED, COMPLETED]
        assert len(list(d.outputs_dir.glob("*.png"))) == 2
    finally:
        d.stop()


class FlakyMemoryBackend(BackendBase):
    """Raises CUDA's real out-of-memory error for batches larger than two (a real GPU
    cannot be made to run out of memory on demand here)."""

    calls: list[int] = []

    def __init__(self, settings):
        self.settings = settings

    def generate(self, batch, on_step):
        FlakyMemoryBackend.calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for step in range(1, batch[0].steps + 1):
            on_step(step, batch[0].steps)
        return [Image.new("RGB", (r.width, r.height), (r.seed % 256, 0, 0)) for r in batch]


class Plugin:
    @hookimpl
    def imagineerd_register_backends(self, registry):
        registry.add("flaky", FlakyMemoryBackend)
        registry.add("slow", SlowBackend)


def test_out_of_memory_splits_the_batch_and_loses_no_job(make_config):
    FlakyMemoryBackend.calls = []
    d = Daemon(
        make_config(model={"backend": "flaky"}, performance={"max_batch": 4}),
        plugin_manager=get_plugin_manager([Plugin()]),
    )
    first = [d.submit({"prompt": f"a{i}", "seed": i}).id for i in range(4)]
    d.start()
    try:
        assert all(j.status == COMPLETED for j in run_all(d, first))
        assert FlakyMemoryBackend.calls == [4, 2, 2]
        more = [d.submit({"prompt": f"b{i}", "seed": 10 + i}).id for i in range(4)]
        assert all(j.status == COMPLETED for j in run_all(d, more))
        later = FlakyMemoryBackend.calls[3:]
        assert max(later) <= 2 and sum(later) == 4  # capped at 2: no second OOM
        for job_id in first:
            job = d.job(job_id)
            with Image.open(d.config.base_dir / job.output_path) as image:
                assert image.getpixel((0, 0)) == (job.spec.seed, 0, 0)  # its own image
    finally:
        d.stop()


class SlowBackend(BackendBase):
    """Takes a little time per step and records which device each batch ran on."""

    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def __init__(self, settings):
        self.device = settings["device"]

    def generate(self, batch, on_step):
        with SlowBackend.lock:
            SlowBackend.seen.append((self.device, threading.current_thread().name))
        for step in range(1, batch[0].steps + 1):
            time.sleep(0.05)
            on_step(step, batch[0].steps)
        return [Image.new("RGB", (r.width, r.height)) for r in batch]


def test_one_worker_per_device_on_one_queue(make_config):
    SlowBackend.seen = []
    d = Daemon(
        make_config(
            model={"backend": "slow", "device": ["cpu", "cpu"]}, performance={"max_batch": 1}
        ),
        plugin_manager=get_plugin_manager([Plugin()]),
    )
    d.start()
    try:
        assert [w.device for w in d.workers] == ["cpu", "cpu"]
        ids = [d.submit({"prompt": f"p{i}", "steps": 4}).id for i in range(8)]
        assert all(j.status == COMPLETED for j in run_all(d, ids))
        assert {thread for _, thread in SlowBackend.seen} == {
            "imagineerd-worker-0",
            "imagineerd-worker-1",
        }  # both took jobs
        assert len(SlowBackend.seen) == 8  # each job ran once
        assert [w["device"] for w in d.health()["workers"]] == ["cpu", "cpu"]
    finally:
        d.stop()


def test_device_list_is_validated(make_config):
    from imagineerd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.device.*\[cuda:0, cuda:1\]"):
        make_config(model={"device": ["cuda:0", "tpu"]})


def test_compiled_unet_with_bucket_padding_gives_the_same_image(tiny_model, tmp_path):
    """The compile thread prepares the bucket of two; until then a job runs on the plain
    UNet, afterwards a batch of one is padded to two and runs compiled. Compiled with
    dynamo's ``aot_eager`` backend (the real tracing, guards and AOT autograd, without
    inductor's code generation, which takes minutes on this CPU); no step is made to wait."""
    from imagineerd.backends import GenerationRequest
    from imagineerd.backends.diffusers_backend import DiffusersBackend

    gate = threading.Event()
    compiled_on: list[str] = []
    ran_on: list[str] = []

    def backend_fn(gm, example_inputs):
        gate.wait(60)  # the first compile waits until the eager job below is done
        compiled_on.append(threading.current_thread().name)
        inner = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            ran_on.append(threading.current_thread().name)
            return inner(*args)

        return run

    backend = DiffusersBackend(
        {
            "name": str(tiny_model),
            "device": "cpu",
            "dtype": "auto",
            "arch": "auto",
            "performance": {
                "compile": True,
                "batch_buckets": [2],
                "max_padding": 0.5,
                "channels_last": True,
            },
            "state_dir": str(tmp_path),
            "warm_sizes": [[64, 64]],
            "compile_backend": backend_fn,
        }
    )
    request = [GenerationRequest("a boat", "rough sea", 5, 3, 64, 64, 7.5, "euler")]
    eager = backend.generate(request, lambda *_: None)[0]  # not compiled yet: plain UNet
    assert backend.ready_shapes == set() and backend._to_compile == [(2, 64, 64, True)]
    gate.set()
    assert backend.current.compiler.wait_idle(120)
    assert backend.ready_shapes == {(2, 64, 64, True)}
    assert compiled_on and all(name.startswith("imagineerd-compile") for name in compiled_on)
    ran_on.clear()  # the compile thread's warm-up calls
    calls = []
    compiled = backend.generate(request, lambda s, n: calls.append(s))[0]
    assert calls == [1, 2, 3] and backend.pipe.unet is backend.current.eager_unet
    assert ran_on == ["MainThread"] * 3  # each step through the compiled graph
    diff = np.abs(np.asarray(eager, dtype=np.int16) - np.asarray(compiled, dtype=np.int16))
    assert diff.mean() <= 0.05 and diff.max() <= 1, (diff.mean(), diff.max())
