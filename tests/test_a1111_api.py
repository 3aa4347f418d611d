"""AUTOMATIC1111's /sdapi/v1 API, driven by the real ``webuiapi`` client against a real server
(tiny model, 64x64, 2 steps)."""

from __future__ import annotations

import base64
import io
import json
from urllib.parse import urlsplit

import pytest
from PIL import Image

from .conftest import wait_for as wait_for_value

webuiapi = pytest.importorskip("webuiapi")

TOKEN = "a1111-test-token-0123456789abcdef"


def client_for(api, **kwargs) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(api.url).port, **kwargs)


def test_txt2img_batch_sampler_and_errors(start_api) -> None:
    api = start_api()
    client = client_for(api)
    result = client.txt2img(prompt="a fox", seed=5, steps=2, width=64, height=64, batch_size=2)
    assert len(result.images) == 2
    assert all(image.size == (64, 64) for image in result.images)
    info = result.info
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["all_prompts"] == ["a fox", "a fox"]
    assert len(info["infotexts"]) == 2 and "Seed: 6" in info["infotexts"][1]
    assert info["sampler_name"] == "Euler a" and info["width"] == 64
    # What webuiapi sends with every request means "off": nothing is reported as ignored.
    assert info["imagineerd_ignored"] == []
    assert result.parameters["batch_size"] == 2
    jobs = [api.daemon.job(i) for i in info["imagineerd_jobs"]]
    assert [j.source for j in jobs] == ["a1111", "a1111"]

    karras = client.txt2img(
        prompt="a fox",
        seed=1,
        steps=2,
        width=64,
        height=64,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        cfg_scale=5,
        override_settings={"CLIP_stop_at_last_layers": 2},
    )
    job = api.daemon.job(karras.info["imagineerd_jobs"][0])
    assert job.spec.scheduler == "dpmpp_2m_karras"
    assert job.spec.guidance_scale == 5.0 and job.spec.clip_skip == 2
    assert karras.info["sampler_name"] == "DPM++ 2M" and karras.info["scheduler"] == "Karras"

    with pytest.raises(RuntimeError) as raised:
        client.txt2img(prompt="a fox", steps=2, width=64, height=64, sampler_name="LMS")
    status, text = raised.value.args
    body = json.loads(text)
    assert status == 400 and body["field"] == "sampler_name" and "DPM++ 2M" in body["error"]

    # Our own field names never leak into the errors: cfg_scale, not guidance_scale.
    bad = api("POST", "/sdapi/v1/txt2img", json={"prompt": "x", "cfg_scale": 99})
    assert bad.status_code == 400 and bad.json()["field"] == "cfg_scale"
    bad = api("POST", "/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": "2"})
    assert bad.status_code == 400 and bad.json()["field"] == "batch_size"
    bad = api(
        "POST", "/sdapi/v1/txt2img", data=b"[1]", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid"

    # Unknown and unsupported fields are ignored, as A1111 does, and named.
    extra = {"restore_faces": True, "frobnicate": 1, "override_settings": {"foo": 1}}
    answer = api(
        "POST",
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "n_iter": 1, **extra},
    )
    assert answer.status_code == 200, answer.text
    ignored = json.loads(answer.json()["info"])["imagineerd_ignored"]
    assert sorted(ignored) == ["frobnicate", "override_settings.foo", "restore_faces"]
    assert api("GET", "/sdapi/v1/no-such-thing").status_code == 404

    hires = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": True}
    hires.update(hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.6)
    answer = api("POST", "/sdapi/v1/txt2img", json={**hires, "hr_second_pass_steps": 1})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (96, 96)
    job = api.daemon.job(json.loads(body["info"])["imagineerd_jobs"][0])
    assert job.spec.hires == (1.5, 1, 0.6, "lanczos")
    bad = api("POST", "/sdapi/v1/txt2img", json={**hires, "hr_upscaler": "R-ESRGAN 4x+"})
    assert bad.status_code == 400 and bad.json()["field"] == "hr_upscaler"

    progress = client.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert client.interrupt() == {"interrupted": [], "cancelled": []}


def test_img2img(start_api) -> None:
    api = start_api()
    client = client_for(api)
    start = Image.new("RGB", (64, 64), (200, 40, 40))
    result = client.img2img(
        images=[start],
        denoising_strength=0.5,
        prompt="a red fox",
        seed=3,
        steps=2,
        width=64,
        height=64,
    )
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    job = api.daemon.job(result.info["imagineerd_jobs"][0])
    assert job.spec.strength == 0.5 and job.spec.init_image.startswith("sha256:")
    assert result.parameters["init_images"] is None  # not echoed unless asked, as in A1111
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = client.img2img(
        images=[start],
        mask_image=mask,
        mask_blur=2,
        prompt="a red fox",
        seed=3,
        steps=2,
        width=64,
        height=64,
    )
    job = api.daemon.job(inpaint.info["imagineerd_jobs"][0])
    assert job.spec.mask and job.spec.inpaint_area == "masked" and job.spec.mask_blur == 2

    bad = api(
        "POST", "/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}
    )
    assert bad.status_code == 400 and bad.json()["field"] == "init_images"


def test_models_samplers_and_options(start_api, model_files) -> None:
    api = start_api(workers=False, paths={"models": str(model_files)})
    client = client_for(api)
    models = client.get_sd_models()
    names = {m["model_name"] for m in models}
    assert {"alpha", "beta", "xl_gamma"} <= names
    alpha = next(m for m in models if m["model_name"] == "alpha")
    assert alpha["title"].startswith("alpha.safetensors") and alpha["filename"].endswith(
        "alpha.safetensors"
    )
    assert {"DPM++ 2M", "Euler a", "DPM++ 2M Karras"} <= {s["name"] for s in client.get_samplers()}
    assert {"automatic", "karras"} <= {s["name"] for s in client.get_schedulers()}
    assert [lora["name"] for lora in client.get_loras()] == ["detail", "xl-style"]
    memory = client.get_memory()
    assert memory["ram"]["total"] > 0 and "cuda" in memory

    options = client.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1
    answer = client.set_options({"sd_model_checkpoint": alpha["title"], "show_progressbar": 1})
    assert "model.name" in answer["restart_required"]
    assert answer["imagineerd_ignored"] == ["show_progressbar"]
    assert api.daemon.saved_config["model"]["name"] == "alpha"
    # The title carries the short hash once the background thread has computed it.
    assert client.get_options()["sd_model_checkpoint"].split(" [")[0] == "alpha.safetensors"
    assert client.util_get_current_model().split(" [")[0] == "alpha.safetensors"

    bad = api("POST", "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert bad.status_code == 400 and bad.json()["field"] == "sd_model_checkpoint"
    assert client.refresh_checkpoints() == {}


def test_auth(start_api) -> None:
    api = start_api(workers=False, server={"auth_token": TOKEN})
    client = client_for(api)
    assert client.session.get(client.baseurl + "/samplers").status_code == 401
    client.set_auth("user", TOKEN)
    assert "Euler" in client.util_get_sampler_names()
    client.set_auth("user", "wrong")
    assert client.session.get(client.baseurl + "/samplers").status_code == 401
    client.session.auth = None
    answer = client.session.get(
        client.baseurl + "/options", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 200


def test_other_sites_cannot_post(start_api) -> None:
    api = start_api(workers=False)
    answer = api(
        "POST",
        "/sdapi/v1/interrupt",
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert answer.status_code == 403


def test_progress_shows_the_live_preview_as_a1111_does(start_api) -> None:
    """``current_image`` is the running job's latest preview (bare base64, as A1111 sends
    it), or null with ``skip_current_image``."""
    api = start_api(previews={"every_steps": 1})
    client = client_for(api)
    job = api("POST", "/api/generate", json={"prompt": "a long one", "steps": 150}).json()
    try:
        progress = wait_for_value(lambda: (p := client.get_progress())["current_image"] and p)
        assert 0 < progress["state"]["sampling_step"] < 150
        picture = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert picture.format == "JPEG" and picture.size == (8, 8)
        skipped = api("GET", "/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        assert skipped["current_image"] is None and skipped["state"]["sampling_step"] > 0
    finally:
        api("POST", f"/api/jobs/{job['id']}/interrupt", json={})
    assert api.wait_job(job["id"])["status"] == "cancelled"
    assert client.get_progress()["current_image"] is None  # nothing runs: no preview
