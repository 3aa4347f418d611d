"""Image inputs: img2img, inpainting and the hires fix, from the API and the command line.

Real inference on the tiny model on the CPU, a real daemon behind a real HTTP server, real
PNG/JPEG files made with Pillow; a crafted PNG header stands in for a decompression bomb
(making a real 30,000 x 30,000 image would take gigabytes, which is the point).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagineerd import inputs as inputs_mod
from imagineerd import outputs
from imagineerd.daemon import Daemon

from .conftest import wait_finished, write_config
from .test_http import assert_error
from .test_your_models import generate as run
from .test_your_models import params


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def square_mask(size=(64, 64), box=(24, 24, 40, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# -- img2img --------------------------------------------------------------------------------
def test_img2img_from_an_upload_and_from_an_earlier_output(api):
    photo = png(noise(70, 60))
    first, first_px, meta = run(api, init_image=data_url(photo), strength=0.6, steps=10)
    # The input's size rounded to multiples of 8, its hash in the record, A1111's words.
    assert (first["width"], first["height"]) == (72, 64) and first_px.shape == (64, 72, 3)
    assert first["init_image"] == "sha256:" + hashlib.sha256(photo).hexdigest()
    assert meta["imagineerd"]["init_image"] == first["init_image"]
    assert "base64" not in json.dumps(meta["imagineerd"])  # the hash, never the image
    assert params(meta)["Denoising strength"] == "0.6"
    b64 = base64.b64encode(photo).decode()
    _, strong_px, _ = run(api, init_image=b64, strength=0.95, steps=10)
    assert np.abs(first_px - strong_px).mean() > 1  # bare base64 works; strength matters

    name = first["output_path"].removeprefix("outputs/")
    second, _, second_meta = run(api, init_image=name, width=64, height=64)
    assert second["init_image_name"] == name and (second["width"], second["height"]) == (64, 64)
    output_bytes = (api.daemon.config.base_dir / first["output_path"]).read_bytes()
    assert second["init_image"] == "sha256:" + hashlib.sha256(output_bytes).hexdigest()
    assert second_meta["imagineerd"]["init_image_name"] == name


def test_a_strength_too_small_for_one_step_still_runs_one_and_zero_keeps_the_input(api):
    photo = noise(64, 64, seed=9)
    body, _, _ = run(api, init_image=data_url(png(photo)), strength=0.3)  # 2 steps x 0.3
    assert body["status"] == "completed"
    _, kept, _ = run(api, init_image=data_url(png(photo)), strength=0.0)
    assert np.array_equal(kept, np.asarray(photo, dtype=np.int16))


def test_a_jpeg_and_a_webp_are_inputs_too(api):
    for kind, fmt in (("jpeg", "JPEG"), ("webp", "WEBP")):
        body, _, _ = run(api, init_image=data_url(png(noise(64, 64), fmt), kind))
        assert body["init_image"].startswith("sha256:")


# -- inpainting -----------------------------------------------------------------------------
@pytest.mark.parametrize("area", ["whole", "masked"])
def test_inpainting_keeps_every_pixel_outside_the_mask_and_changes_the_inside(api, area):
    original = noise(64, 64, seed=3)
    mask = square_mask()
    body, px, meta = run(
        api,
        init_image=data_url(png(original)),
        mask=data_url(png(mask)),
        mask_blur=2,
        inpaint_area=area,
        strength=1.0,
    )
    assert body["mask"].startswith("sha256:") and body["inpaint_area"] == area
    before = np.asarray(original, dtype=np.int16)
    # Beyond the blur's reach (PIL's Gaussian spans about three radii) nothing changed.
    reach = mask.filter(ImageFilter.MaxFilter(2 * 3 * 2 + 3))
    outside = np.asarray(reach) == 0
    assert outside.sum() > 2000
    assert np.array_equal(px[outside], before[outside])
    inside = np.asarray(mask) == 255
    assert np.abs(px[inside] - before[inside]).mean() > 10
    assert params(meta)["Mask blur"] == "2"


def test_a_mask_of_another_size_is_resized_but_not_of_another_shape(api):
    original = noise(64, 64, seed=4)
    image = data_url(png(original))
    big_mask = square_mask((128, 128), (48,) * 2 + (80,) * 2)  # the square 24-40 at 64x64
    _, px, _ = run(api, init_image=image, mask=data_url(png(big_mask)), strength=1.0)
    before = np.asarray(original, dtype=np.int16)
    outside = np.asarray(square_mask().filter(ImageFilter.MaxFilter(2 * 3 * 4 + 3))) == 0
    assert np.array_equal(px[outside], before[outside])  # resized, and applied where it was
    assert np.abs(px[24:40, 24:40] - before[24:40, 24:40]).mean() > 10
    response = api(
        "POST",
        "/api/generate",
        json={"prompt": "x", "init_image": image, "mask": data_url(png(square_mask((64, 32))))},
    )
    assert "aspect ratio" in assert_error(response, 400)["error"]


# -- hires fix ------------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_times_two_from_64_gives_128_with_every_step_reported(api, upscaler):
    with api.daemon.events.subscribe() as events:
        body, px, meta = run(
            api, hires={"scale": 2, "steps": 3, "denoising_strength": 0.5, "upscaler": upscaler}
        )
        totals = set()
        while (event := events.get(timeout=0.2)) is not None:
            if event.type == "job.progress" and event.data["id"] == body["id"]:
                totals.add(event.data["total"])
    assert px.shape == (128, 128, 3)
    assert totals == {2 + 3}  # the job's 2 steps, then the 3 hires steps, as one bar
    info = params(meta)
    assert (info["Size"], info["Hires upscale"], info["Hires steps"]) == ("64x64", "2", "3")
    assert info["Hires upscaler"] == upscaler.capitalize()
    assert info["Denoising strength"] == "0.5"


# -- batching, restarts, storage -----------------------------------------------------------
def test_image_jobs_batched_give_the_same_pixels_as_alone(tiny_model, tmp_path):
    from imagineerd.backends.diffusers_backend import DiffusersBackend
    from imagineerd.gallery import Gallery
    from imagineerd.jobs import JobSpec

    store = inputs_mod.InputStore(
        tmp_path / "inputs", Gallery(tmp_path, tmp_path / "t"), max_bytes=1 << 24
    )
    refs = [store.take("init_image", png(noise(seed=s))).ref for s in (1, 2)]
    mask = store.take("mask", png(square_mask())).ref
    backend = DiffusersBackend(
        {"name": str(tiny_model), "device": "cpu", "dtype": "auto", "arch": "auto", "inputs": store}
    )
    for extra in ({}, {"mask": mask}):
        specs = [
            JobSpec(
                "a cat", "", 7 + i, 3, 64, 64, 7.0, "euler", init_image=ref, strength=0.7, **extra
            )
            for i, ref in enumerate(refs)
        ]
        alone = [np.asarray(backend.generate([s], lambda *_: None)[0], np.int16) for s in specs]
        together = backend.generate(specs, lambda *_: None)
        assert np.abs(alone[0] - alone[1]).mean() > 1  # two inputs, two images
        for one, both in zip(alone, together, strict=True):
            assert np.abs(one - np.asarray(both, dtype=np.int16)).max() <= 2


def test_a_queued_image_job_survives_a_restart_and_its_input_goes_when_done(
    make_config, monkeypatch
):
    config = make_config()
    first = Daemon(config)
    first.start(workers=False)
    job = first.submit({"prompt": "x", "init_image": data_url(png(noise()))})
    first.stop()  # as after a crash: the job is queued, its input stored (and fsynced)
    stored = first.state_dir / "inputs" / job.spec.init_image.removeprefix("sha256:")
    assert stored.is_file()
    monkeypatch.setattr(inputs_mod, "GRACE_SECONDS", 0.0)
    second = Daemon(config)
    second.start()
    try:
        done = wait_finished(second, job.id)
        assert done.status == "completed", done.error
        assert not stored.exists()  # no job needs it now
    finally:
        second.stop()


def test_a_pasted_chunk_finds_its_input_by_hash_then_by_output_name_or_says_it_is_gone(
    api, monkeypatch
):
    source, _, _ = run(api)
    name = source["output_path"].removeprefix("outputs/")
    _, px, meta = run(api, init_image=name, seed=11)
    again, again_px, _ = run(api, **meta["imagineerd"])  # stored: found by hash
    assert np.array_equal(px, again_px)
    monkeypatch.setattr(inputs_mod, "GRACE_SECONDS", 0.0)
    api.daemon.collect_inputs()
    assert not any((api.daemon.state_dir / "inputs").iterdir())
    _, from_output, _ = run(api, **meta["imagineerd"])  # gone: found through the output
    assert np.array_equal(px, from_output)
    api.daemon.collect_inputs()
    record = {k: v for k, v in meta["imagineerd"].items() if k != "init_image_name"}
    response = api("POST", "/api/generate", json=record)
    assert "is gone" in assert_error(response, 400)["error"]


# -- bad input ------------------------------------------------------------------------------
def bomb() -> bytes:
    """A valid PNG header announcing 30,000 x 30,000 pixels, in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        outputs.PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"init_image": data_url(b"hello, not an image")}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": data_url(png(noise())[:300])}, "init_image", "truncated or damaged"),
        ({"init_image": data_url(png(noise(), "GIF"), "gif")}, "init_image", "not a PNG"),
        ({"init_image": data_url(bomb())}, "init_image", "megapixels"),
        ({"init_image": "data:image/png;base64,@@@@"}, "init_image", "base64"),
        ({"init_image": "20260101_000000_nothing_1.png"}, "init_image", "no output image named"),
        ({"init_image": "../config.yaml.png"}, "init_image", "no output image named"),
        ({"init_image": "sha256:" + "0" * 64}, "init_image", "is gone"),
        ({"init_image": 5}, "init_image", "must be an image"),
        ({"mask": data_url(png(square_mask()))}, "mask", "needs an init_image"),
        ({"hires": {"scale": 2}, "init_image": data_url(png(noise()))}, "hires", "text-to-image"),
        ({"hires": {"scale": 4}, "width": 1024}, "hires", "over the limit of 2048"),
        ({"hires": {"scale": 2, "upscaler": "esrgan"}}, "hires.upscaler", "latent, lanczos"),
        ({"strength": 1.5, "init_image": data_url(png(noise()))}, "strength", "0 to 1"),
        ({"inpaint_area": "some"}, "inpaint_area", "whole, masked"),
    ],
)
def test_bad_image_inputs_are_400_naming_the_field(api, job, field, words):
    response = api("POST", "/api/generate", json={"prompt": "x", **job})
    body = assert_error(response, 400)
    assert words in body["error"] and field in body["error"], body
    assert api.daemon.store.counts()["queued"] == 0


def test_image_bodies_may_be_larger_than_text_bodies(start_api):
    api = start_api(server={"max_body_bytes": 4096, "max_image_bytes": 1 << 20})
    photo = data_url(png(noise(64, 64)))
    assert len(photo) > 4096
    response = api("POST", "/api/generate", json={"prompt": "x", "init_image": photo})
    assert response.status_code == 201, response.text
    padded = json.dumps({"prompt": "x", "negative_prompt": "y"}) + " " * 5000
    response = api(
        "POST", "/api/generate", data=padded, headers={"Content-Type": "application/json"}
    )
    assert "server.max_body_bytes" in assert_error(response, 413)["error"]
    # Past the text limit only long strings may grow a body: structure is refused unparsed.
    nested = '{"prompt": "x", "init_image": "x", "a": [' + "[]," * 20000 + "[]]}"
    response = api(
        "POST", "/api/generate", data=nested, headers={"Content-Type": "application/json"}
    )
    assert "only images may make a body larger" in assert_error(response, 413)["error"]
    huge = data_url(os.urandom(1 << 20))
    response = api("POST", "/api/generate", json={"prompt": "x", "init_image": huge})
    assert "server.max_image_bytes" in assert_error(response, 413)["error"]


# -- the command line -----------------------------------------------------------------------
def test_the_command_line_takes_an_init_image_and_a_mask(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model)
    (tmp_path / "photo.png").write_bytes(png(noise()))
    (tmp_path / "mask.png").write_bytes(png(square_mask()))
    result = subprocess.run(
        [sys.executable, "-m", "imagineerd", "generate", "a fox", "--config", str(config)]
        + ["--init-image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
        + ["--strength", "0.8"],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = outputs.read_metadata(tmp_path / result.stdout.strip())["imagineerd"]
    assert record["strength"] == 0.8 and record["mask"].startswith("sha256:")
    missing = subprocess.run(
        [sys.executable, "-m", "imagineerd", "generate", "x", "--config", str(config)]
        + ["--init-image", str(tmp_path / "nope.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "--init-image" in missing.stderr
