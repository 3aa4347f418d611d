"""Real diffusers inference on the tiny random-weight SD1.5 and SDXL models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imagineerd.backends import GenerationRequest
from imagineerd.backends.diffusers_backend import DiffusersBackend, cpu_threads, detect_arch
from imagineerd.errors import JobInterrupted
from imagineerd.jobs import SCHEDULERS


def backend_for(model: Path) -> DiffusersBackend:
    return DiffusersBackend(
        {"name": str(model), "device": "cpu", "dtype": "auto", "arch": "auto", "cache_dir": ""}
    )


@pytest.fixture(scope="module")
def sd15(tiny_model: Path) -> DiffusersBackend:
    return backend_for(tiny_model)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl: Path) -> DiffusersBackend:
    return backend_for(tiny_sdxl)


def req(seed: int = 1, **kw) -> GenerationRequest:
    fields = dict(
        prompt="a house",
        negative_prompt="",
        seed=seed,
        steps=3,
        width=64,
        height=64,
        guidance_scale=7.5,
        scheduler="euler",
    )
    fields.update(kw)
    return GenerationRequest(**fields)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_test_model_is_a_diffusers_folder(tiny_model: Path, tiny_sdxl: Path):
    for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / folder).is_dir()
    assert json.loads((tiny_model / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline"
    )
    assert (tiny_sdxl / "text_encoder_2").is_dir()
    assert detect_arch(str(tiny_model)) == "sd15" and detect_arch(str(tiny_sdxl)) == "sdxl"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_seed_reproduces_and_differs(arch, sd15, sdxl):
    backend = sd15 if arch == "sd15" else sdxl
    assert backend.arch == arch
    steps: list[tuple[int, int]] = []
    a = backend.generate([req(7)], lambda s, n: steps.append((s, n)))[0]
    b = backend.generate([req(7)], lambda s, n: None)[0]
    c = backend.generate([req(8)], lambda s, n: None)[0]
    assert a.size == (64, 64)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs(sd15, scheduler):
    calls: list[int] = []
    image = sd15.generate([req(3, scheduler=scheduler)], lambda s, n: calls.append(n))[0]
    assert image.size == (64, 64) and calls
    assert type(sd15.pipe.scheduler).__name__ != "" and sd15.pipe.scheduler is sd15.scheduler(
        scheduler
    )


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_batch_gives_the_same_images_as_alone(sd15, scheduler):
    alone = [
        sd15.generate([req(s, prompt=p, scheduler=scheduler)], lambda *_: None)[0]
        for s, p in ((11, "a cat"), (12, "a dog"))
    ]
    batched = sd15.generate(
        [
            req(11, prompt="a cat", scheduler=scheduler),
            req(12, prompt="a dog", scheduler=scheduler),
        ],
        lambda *_: None,
    )
    for one, many in zip(alone, batched, strict=True):
        diff = np.abs(pixels(one) - pixels(many))
        # Rounding at most (another prompt moves the tiny model's image by a mean of > 1).
        assert diff.mean() <= 0.05 and diff.max() <= 1, (diff.mean(), diff.max())


def test_on_step_raising_interrupts(sd15):
    def stop(step: int, total: int) -> None:
        if step == 2:
            raise JobInterrupted("stop")

    with pytest.raises(JobInterrupted):
        sd15.generate([req(steps=10)], stop)


def test_unicode_and_long_prompts_are_tokenized(sd15):
    image = sd15.generate([req(prompt="猫と☃ " * 200)], lambda *_: None)[0]
    assert image.size == (64, 64)


def test_torch_leaves_a_core_to_the_front_door_on_a_cpu():
    assert cpu_threads("auto", "cpu", 2) == 1  # the API, inbox and saver keep a core
    assert cpu_threads("auto", "cpu", 16) == 15
    assert cpu_threads("auto", "cpu", 1) is None  # nothing to leave
    assert cpu_threads("auto", "cuda", 16) is None  # a GPU computes: torch's own choice
    assert cpu_threads(3, "cuda", 16) == 3


def test_a_cpu_backend_computes_with_the_threads_configured(tiny_model: Path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever earlier backends of this process chose
    try:
        DiffusersBackend(
            {"name": str(tiny_model), "device": "cpu", "performance": {"cpu_threads": 1}}
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)  # process-wide: the other tests keep theirs
