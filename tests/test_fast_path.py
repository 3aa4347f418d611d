"""The GPU fast path, on the CPU: bucket plans, the UNet wrapper's canonical inputs, the
background compile thread (never the worker), eager until ready, decoding only real items,
and the same image alone or batched for every sampler.

Compiling with inductor takes minutes on this CPU, so these tests compile with a dynamo
backend of their own that runs the traced graph as it is and records which thread traced
it and which threads ran it: the dynamo machinery (guards, recompiles, cache reuse) is the
real one, only code generation is left out. CUDA graphs cannot be recorded without a GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from imagineerd.backends import GenerationRequest
from imagineerd.backends.diffusers_backend import DiffusersBackend
from imagineerd.backends.fast_path import UNetInputs, copy_in, plan_parts
from imagineerd.daemon import Daemon
from imagineerd.jobs import COMPLETED

from .conftest import wait_finished, wait_for


class Recorder:
    """A dynamo backend: records the thread of every compile and of every graph run."""

    def __init__(self) -> None:
        self.compiled_on: list[str] = []
        self.ran_on: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def backend(self, gm, example_inputs):
        self.gate.wait(60)  # a test holds a compile back to see jobs run eager meanwhile
        self.compiled_on.append(threading.current_thread().name)

        def run(*args):
            self.ran_on.append(threading.current_thread().name)
            return gm.forward(*args)

        return run


def make_backend(
    model: Path, tmp_path: Path, recorder: Recorder | None, **perf
) -> DiffusersBackend:
    warm_sizes = perf.pop("warm_sizes", [[64, 64]])
    performance = {"compile": recorder is not None, "batch_buckets": [1, 2, 4], **perf}
    return DiffusersBackend(
        {
            "name": str(model),
            "device": "cpu",
            "dtype": "auto",
            "arch": "auto",
            "performance": performance,
            "state_dir": str(tmp_path),
            "warm_sizes": warm_sizes,
            "compile_backend": recorder.backend if recorder else None,
        }
    )


def req(seed: int, scheduler: str = "euler", **kw) -> GenerationRequest:
    fields = dict(
        prompt=f"a lighthouse {seed}",
        negative_prompt="fog" if seed % 2 else "",
        seed=seed,
        steps=3,
        width=64,
        height=64,
        guidance_scale=7.5,
        scheduler=scheduler,
    )
    fields.update(kw)
    return GenerationRequest(**fields)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same(a, b) -> None:
    """The same image up to rounding (batch sizes change the order of float sums): another
    prompt or seed moves the tiny model's image by a mean of more than one level."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.mean() <= 0.05 and diff.max() <= 1, (diff.mean(), diff.max())


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def compiled(tiny_model, tmp_path_factory, recorder) -> DiffusersBackend:
    backend = make_backend(tiny_model, tmp_path_factory.mktemp("state"), recorder)
    assert backend.current.compiler.wait_idle(120)
    return backend


@pytest.fixture(scope="module")
def eager(tiny_model, tmp_path_factory) -> DiffusersBackend:
    return make_backend(tiny_model, tmp_path_factory.mktemp("state"), None)


# -- bucket plans ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("count", "parts"),
    [
        (1, [(1, 1)]),
        (2, [(2, 2)]),
        (3, [(3, 4)]),  # one pad in four: 25 %, allowed
        (5, [(4, 4), (1, 1)]),  # 3 pads in 8 would be 37.5 %: split
        (6, [(6, 8)]),
        (7, [(7, 8)]),
        (8, [(8, 8)]),
        (9, [(8, 8), (1, 1)]),
        (11, [(8, 8), (3, 4)]),
        (13, [(8, 8), (4, 4), (1, 1)]),
    ],
)
def test_plan_pads_only_within_the_limit(count, parts):
    plan = plan_parts(count, [1, 2, 4, 8], 0.25)
    assert plan == parts
    assert sum(real for real, _ in plan) == count
    assert all(bucket is None or (bucket - real) / bucket <= 0.25 for real, bucket in plan)


def test_plan_edges():
    assert plan_parts(3, [1, 2, 4, 8], 0.0) == [(2, 2), (1, 1)]  # no padding at all
    assert plan_parts(5, [1, 2, 4, 8], 0.5) == [(5, 8)]
    assert plan_parts(1, [2, 4], 0.25) == [(1, None)]  # below every bucket: as it is
    assert plan_parts(3, [2, 4], 0.25) == [(3, 4)]
    assert plan_parts(0, [1, 2], 0.25) == []


# -- the wrapper ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "ddim", "unipc"])
def test_wrapper_gives_float32_timesteps_per_item_whatever_the_scheduler(eager, scheduler):
    """DPM++, DDIM and UniPC pass int64 timesteps where Euler passes float32: the compiled
    graph sees one kind only, so the schedulers share it."""
    model = eager.current
    seen = []

    def runner(sample, timestep, hidden, text_embeds, time_ids):
        seen.append((timestep.dtype, tuple(timestep.shape), timestep.device, sample.dtype))
        return UNetInputs(model.eager_unet)._plain(sample, timestep, hidden, text_embeds, time_ids)

    batch = [req(1, scheduler), req(2, scheduler)]
    encoded = [model.encoder.encode(r.prompt, r.negative_prompt) for r in batch]
    model._call(
        "txt2img",
        batch,
        model._embeds(encoded),
        lambda *_: None,
        UNetInputs(model.eager_unet, runner),
    )
    assert seen and all(
        s == (torch.float32, (4,), torch.device("cpu"), torch.float32) for s in seen
    )
    assert model.pipe.unet is model.eager_unet  # the pipeline keeps the real UNet


def test_wrapper_changes_no_pixel(eager):
    """The canonical inputs are what the UNet makes of its inputs anyway."""
    model = eager.current
    for scheduler in ("ddim", "euler"):
        batch = [req(4, scheduler)]
        encoded = [model.encoder.encode(r.prompt, r.negative_prompt) for r in batch]
        plain = model._call(
            "txt2img", batch, model._embeds(encoded), lambda *_: None, model.eager_unet
        )
        wrapped = model._call(
            "txt2img",
            batch,
            model._embeds(encoded),
            lambda *_: None,
            UNetInputs(model.eager_unet),
        )
        assert np.array_equal(pixels(plain[0]), pixels(wrapped[0]))


# -- compiling in the background --------------------------------------------------------------
def test_every_scheduler_and_guidance_runs_compiled_never_compiling_on_the_worker(
    compiled, recorder
):
    compile_thread = {name for name in recorder.compiled_on}
    assert len(compile_thread) == 1 and next(iter(compile_thread)).startswith("imagineerd-compile")
    assert compiled.ready_shapes == {(b, 64, 64, True) for b in (1, 2, 4)}
    compiles = len(recorder.compiled_on)
    for scheduler in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"):
        recorder.ran_on.clear()
        compiled.generate([req(s, scheduler) for s in (1, 2, 3)], lambda *_: None)
        # One padded call of 4, three steps, all through the compiled graph.
        assert recorder.ran_on == ["MainThread"] * 3, scheduler
    assert len(recorder.compiled_on) == compiles  # no scheduler recompiled anything
    # Guidance off halves the UNet's batch: another key, compiled in the background.
    recorder.ran_on.clear()
    compiled.generate([req(5, guidance_scale=1.0)], lambda *_: None)
    assert recorder.ran_on == []  # not ready: eager
    assert compiled.current.compiler.wait_idle(60)
    assert (1, 64, 64, False) in compiled.ready_shapes
    recorder.ran_on.clear()  # the compile thread's warm-up calls
    compiled.generate([req(5, guidance_scale=1.0)], lambda *_: None)
    assert recorder.ran_on == ["MainThread"] * 3
    assert all(name.startswith("imagineerd-compile") for name in recorder.compiled_on)


def test_a_shape_not_ready_runs_eager_and_the_same_image(tiny_model, tmp_path, eager):
    recorder = Recorder()
    recorder.gate.clear()  # the compile thread is held inside its first compile
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[2], max_padding=0.5)
    try:
        wait_for(lambda: backend._to_compile == [(2, 64, 64, True)], 30)
        assert backend.ready_shapes == set()
        steps = []
        before = backend.generate([req(7)], lambda s, n: steps.append((s, n)))[0]
        assert recorder.ran_on == [] and steps == [(1, 3), (2, 3), (3, 3)]  # eager
    finally:
        recorder.gate.set()
    assert backend.current.compiler.wait_idle(60)
    assert backend.ready_shapes == {(2, 64, 64, True)}
    recorder.ran_on.clear()  # the compile thread's warm-up calls
    after = backend.generate([req(7)], lambda *_: None)[0]  # padded to 2, compiled
    assert recorder.ran_on == ["MainThread"] * 3
    alone = eager.generate([req(7)], lambda *_: None)[0]
    assert_same(before, after)
    assert np.array_equal(pixels(before), pixels(alone))


def test_a_new_size_is_compiled_in_the_background(compiled, recorder):
    recorder.ran_on.clear()
    compiles = len(recorder.compiled_on)
    compiled.generate([req(8, width=72, height=64)], lambda *_: None)
    assert recorder.ran_on == []  # eager for now
    assert compiled.current.compiler.wait_idle(60)
    assert {(b, 72, 64, True) for b in (1, 2, 4)} <= compiled.ready_shapes
    assert len(recorder.compiled_on) > compiles
    assert all(name.startswith("imagineerd-compile") for name in recorder.compiled_on)


def test_pause_drops_graphs_and_resume_makes_them_again(tiny_model, tmp_path):
    recorder = Recorder()
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[1])
    model = backend.current
    assert model.compiler.wait_idle(60) and backend.ready_shapes == {(1, 64, 64, True)}
    model.pause_fast_path()
    assert backend.ready_shapes == set() and backend._to_compile == [(1, 64, 64, True)]
    recorder.ran_on.clear()
    backend.generate([req(1)], lambda *_: None)
    assert recorder.ran_on == []  # paused: eager
    model.resume_fast_path()
    assert model.compiler.wait_idle(60) and backend.ready_shapes == {(1, 64, 64, True)}


def test_a_failed_compile_leaves_the_shape_eager(tiny_model, tmp_path):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    backend = DiffusersBackend(
        {
            "name": str(tiny_model),
            "device": "cpu",
            "performance": {"compile": True, "batch_buckets": [1]},
            "state_dir": str(tmp_path),
            "warm_sizes": [[64, 64]],
            "compile_backend": broken,
        }
    )
    assert backend.current.compiler.wait_idle(60)
    assert backend.ready_shapes == set()
    image = backend.generate([req(3)], lambda *_: None)[0]
    assert image.size == (64, 64)
    assert backend.current.compiler.wait_idle(5) and backend._to_compile == []  # not retried


def test_daemon_compiles_off_the_worker_thread(make_config, monkeypatch):
    """The real daemon and its worker thread, with the default compile call (torch.compile)
    pointed at the recording backend."""
    recorder = Recorder()
    real = torch.compile

    def compile_(fn, **kwargs):
        return real(fn, backend=recorder.backend, fullgraph=True)

    monkeypatch.setattr(torch, "compile", compile_)
    d = Daemon(make_config(performance={"compile": True, "max_batch": 4, "batch_buckets": [2, 4]}))
    d.start()
    try:
        worker = d.workers[0]
        wait_for(lambda: worker.backend_state == "ready", 60)
        assert worker._backend.current.compiler.wait_idle(120)
        ids = [
            d.submit({"prompt": f"p{i}", "seed": i, "scheduler": s}).id
            for i, s in enumerate(["euler", "ddim", "euler", "ddim", "unipc", "unipc", "unipc"])
        ]
        assert all(wait_finished(d, i, 120).status == COMPLETED for i in ids)
    finally:
        d.stop()
    assert recorder.compiled_on and recorder.ran_on
    assert all(name.startswith("imagineerd-compile") for name in recorder.compiled_on)
    # Graphs ran on the compile thread (its warm-up) and on the worker, nowhere else.
    assert {n for n in recorder.ran_on if not n.startswith("imagineerd-compile")} == {worker.name}


# -- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim", "unipc"])
def test_same_seed_same_image_alone_or_batched_padded_or_split(compiled, eager, scheduler):
    """5 jobs run as 4 + 1 and 3 as a padded 4, compiled; each image equals its job run
    alone on the plain UNet."""
    batch = [req(seed, scheduler) for seed in (21, 22, 23, 24, 25)]
    alone = [eager.generate([r], lambda *_: None)[0] for r in batch]
    steps: list[tuple[int, int]] = []
    split = compiled.generate(batch, lambda s, n: steps.append((s, n)))
    padded = compiled.generate(batch[:3], lambda *_: None)
    assert steps == [(s, 6) for s in range(1, 7)]  # two calls, one progress bar
    for one, many in zip(alone, split, strict=True):
        assert_same(one, many)
    for one, many in zip(alone[:3], padded, strict=True):
        assert_same(one, many)


def test_only_real_items_are_decoded(compiled, monkeypatch):
    vae = compiled.current.pipe.vae
    sizes = []
    real_decode = vae.decode

    def decode(latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    images = compiled.generate([req(s) for s in (1, 2, 3)], lambda *_: None)  # padded to 4
    assert len(images) == 3 and sizes == [3]


def test_own_decode_matches_diffusers_postprocess(eager):
    model = eager.current
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = model._decode(latents)
    with torch.inference_mode():
        vae = model.pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    theirs = model.pipe.image_processor.postprocess(decoded, output_type="pil")
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == "RGB" and np.array_equal(pixels(a), pixels(b))


def test_vae_upcast_setting(eager):
    model = eager.current
    vae = model.pipe.vae
    saved = model.vae_upcast, model.arch
    try:
        model.vae_upcast, model.arch = "auto", "sd15"
        assert model._upcast(vae) is False  # SD1.5's VAE is fp16-safe
        model.arch = "sdxl"
        assert model._upcast(vae) is bool(vae.config.force_upcast)
        model.vae_upcast = False
        assert model._upcast(vae) is False
        model.vae_upcast = True
        assert model._upcast(vae) is True
    finally:
        model.vae_upcast, model.arch = saved


def test_fused_qkv_gives_the_same_image(tiny_model, tmp_path, eager):
    fused = make_backend(tiny_model, tmp_path, None, fuse_qkv=True)
    assert fused.current.fused_qkv
    a = fused.generate([req(9)], lambda *_: None)[0]
    b = eager.generate([req(9)], lambda *_: None)[0]
    assert_same(a, b)


def test_prefetched_euler_a_is_diffusers_euler_a_to_the_bit(eager):
    """The same noise in the same order: the samples equal diffusers' own scheduler's."""
    from diffusers import EulerAncestralDiscreteScheduler

    ours = eager.scheduler("euler_a")
    stock = EulerAncestralDiscreteScheduler.from_config(ours.config)
    assert type(ours) is not EulerAncestralDiscreteScheduler
    results = []
    for scheduler in (ours, stock):
        generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
        scheduler.set_timesteps(6)
        sample = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in generators])
        for t in scheduler.timesteps:
            model_output = torch.tanh(scheduler.scale_model_input(sample, t)) * 0.5
            sample = scheduler.step(model_output, t, sample, generator=generators).prev_sample
        results.append(sample)
    assert torch.equal(results[0], results[1])


# -- the compile thread around pauses, LoRAs and GPU work ------------------------------------
def test_pause_does_not_wait_for_a_compile_and_cancels_it(tiny_model, tmp_path):
    """A compile in progress (held at the gate) does not hold pause() back: the build is
    cancelled at its next GPU phase, and made again after resume."""
    recorder = Recorder()
    recorder.gate.clear()
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[1])
    model = backend.current
    try:
        wait_for(lambda: model.compiler.current == (1, 64, 64, True), 30)
        paused = threading.Thread(target=model.pause_fast_path)
        paused.start()
        paused.join(30)  # a deadlock guard only: the compile waits for the gate meanwhile
        assert not paused.is_alive()
    finally:
        recorder.gate.set()
    assert model.compiler.wait_idle(60)
    assert backend.ready_shapes == set() and backend._to_compile == [(1, 64, 64, True)]
    assert recorder.ran_on == []  # the cancelled build ran nothing
    model.resume_fast_path()
    assert model.compiler.wait_idle(60) and backend.ready_shapes == {(1, 64, 64, True)}


def test_compile_thread_gpu_work_holds_the_device_lock(tiny_model, tmp_path):
    """Every run of the compiled graph on the compile thread (each is a UNet forward) holds
    the device's GPU lock, which the worker holds for a batch; compiling does not."""
    held: list[tuple[str, bool]] = []
    backend = None

    def recording(gm, example_inputs):
        held.append(("compile", backend.gpu_lock._is_owned()))

        def run(*args):
            held.append(("run", backend.gpu_lock._is_owned()))
            return gm.forward(*args)

        return run

    backend = make_backend(tiny_model, tmp_path, None, compile=True, warm_sizes=[])
    model = backend.current
    model.compiler.close()
    assert model.gpu_lock is backend.gpu_lock  # one lock per device, for every model
    from imagineerd.backends.fast_path import ShapeCompiler

    compiler = ShapeCompiler(
        model.eager_unet,
        model.pipe,
        device="cpu",
        backend=recording,
        cuda_graphs=False,
        gpu_lock=backend.gpu_lock,
    )
    compiler.want((1, 64, 64, True))
    assert compiler.wait_idle(60) and compiler.ready() == {(1, 64, 64, True)}
    compiler.close()
    assert held == [("compile", False), ("run", True), ("run", True)]


def test_a_lora_that_fails_to_load_leaves_the_fast_path_on(tiny_model, tmp_path):
    from imagineerd.errors import BackendError

    recorder = Recorder()
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[1], fuse_qkv=True)
    model = backend.current
    assert model.compiler.wait_idle(60) and model.fused_qkv
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a LoRA")
    with pytest.raises(BackendError):
        model.set_loras((("bad", 1.0),), lambda name: bad)
    assert model.adapters == {} and model.fused_qkv
    assert model.compiler.wait_idle(60) and backend.ready_shapes == {(1, 64, 64, True)}
    recorder.ran_on.clear()
    backend.generate([req(1)], lambda *_: None)
    assert recorder.ran_on == ["MainThread"] * 3


def test_a_job_without_loras_runs_compiled_again(tiny_model, tmp_path, eager):
    from imagineerd.backends.test_files import make_test_lora

    lora = make_test_lora(tmp_path / "detail.safetensors", arch="sd15", seed=4)
    recorder = Recorder()
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[1])
    model = backend.current
    assert model.compiler.wait_idle(60)
    model.set_loras((("detail", 0.8),), lambda name: lora)
    recorder.ran_on.clear()
    with_lora = model.run_txt2img([req(2)], [model.encoder.encode("a lighthouse 2", "")], print)
    assert recorder.ran_on == []  # LoRAs: the plain UNet
    model.set_loras((), lambda name: lora)
    assert model.adapters == {}
    assert model.compiler.wait_idle(60) and backend.ready_shapes == {(1, 64, 64, True)}
    recorder.ran_on.clear()
    without = backend.generate([req(2)], lambda *_: None)[0]
    assert recorder.ran_on == ["MainThread"] * 3
    assert_same(without, eager.generate([req(2)], lambda *_: None)[0])
    assert np.abs(pixels(with_lora[0]) - pixels(without)).mean() > 1


def test_job_sizes_are_capped(tiny_model, tmp_path, monkeypatch):
    from imagineerd.backends import runtime

    monkeypatch.setattr(runtime, "MAX_JOB_SIZES", 1)
    recorder = Recorder()
    recorder.gate.clear()  # nothing needs compiling here
    backend = make_backend(tiny_model, tmp_path, recorder, batch_buckets=[1])
    model = backend.current
    try:
        model.want_shapes(72, 64)
        model.want_shapes(80, 64)  # past the cap: stays eager
        model.want_shapes(64, 64)  # a warm size is always compiled
        assert {key[1:3] for key in backend._to_compile} == {(64, 64), (72, 64)}
    finally:
        recorder.gate.set()
        model.close()


def test_progress_never_goes_back_in_a_split_heun_batch(compiled):
    """Heun makes 2N - 1 UNet passes of N steps: each call of a split batch counts them."""
    steps: list[tuple[int, int]] = []
    compiled.generate([req(s, "heun") for s in (31, 32, 33, 34, 35)], lambda *a: steps.append(a))
    totals = {total for _, total in steps}
    assert len(totals) == 1 and [s for s, _ in steps] == list(range(1, totals.pop() + 1))
    assert steps[-1] == (10, 10)  # two calls (4 + 1) of 2 * 3 - 1


def test_an_fp16_decode_that_overflows_is_done_again_in_fp32(eager, monkeypatch):
    model = eager.current
    real_vae = model.pipe.vae

    class HalfVae:  # what _decode reads of an fp16 VAE
        config = real_vae.config
        dtype = torch.float16

    vae = HalfVae()
    calls: list[bool] = []

    def decode(vae_, latents, *, upcast):
        calls.append(upcast)
        out = real_vae.decode(latents.float(), return_dict=False)[0]
        return out if upcast else torch.full_like(out, float("nan"))

    monkeypatch.setattr(model.pipe, "vae", vae)
    monkeypatch.setattr(model, "_vae_decode", decode)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    first = model._decode(latents)[0]
    assert calls == [False, True]  # overflowed, then in fp32
    second = model._decode(latents)[0]
    assert calls == [False, True, True]  # fp32 from then on, for this VAE
    assert np.array_equal(pixels(first), pixels(second))
    assert vae in model._upcast_vaes


def test_a_graph_takes_only_inputs_of_its_shape():
    static = (torch.zeros(4, 3), None)
    copy_in(static, (torch.ones(4, 3), None))
    assert static[0].sum() == 12
    with pytest.raises(ValueError):
        copy_in(static, (torch.ones(1, 3), None))  # copy_ would broadcast it
    with pytest.raises(ValueError):
        copy_in(static, (torch.ones(4, 3, dtype=torch.float16), None))
    with pytest.raises(ValueError):
        copy_in(static, (torch.ones(4, 3), torch.ones(1)))
