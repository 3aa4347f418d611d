"""Steering the queue over the REST API (moving jobs, pausing and resuming), the fields the
UI reads (stopped, output_file, boot_id, the model's architecture) and PNG info: a real
daemon and a real Waitress server on a loopback port."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

from PIL import Image, PngImagePlugin

from imagineerd import config as config_mod
from imagineerd.daemon import Daemon

from .conftest import Api, wait_for
from .test_http import assert_error, read_events


def queued_ids(api: Api) -> list[int]:
    return [job["id"] for job in api("GET", "/api/jobs").json()["queued"]]


def submit(api: Api, prompt: str, **fields) -> int:
    response = api("POST", "/api/generate", json={"prompt": prompt, "steps": 2, **fields})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_queued_job_moves_and_every_page_hears_of_it(start_api):
    api = start_api(workers=False)
    a, b, c, d = (submit(api, p) for p in "abcd")
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_events(api, until="job.moved")))
    reader.start()
    wait_for(lambda: api.daemon.events.subscriber_count == 1, 10)
    response = api("POST", f"/api/jobs/{d}/move", json={"to": "top"})
    reader.join(30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == d and body["queue_position"] == 1
    assert body["move"] == {"from": 4, "to": 1, "first": 1, "order": [d, a, b, c]}
    assert queued_ids(api) == [d, a, b, c]
    (moved,) = [data for _, kind, data in events if kind == "job.moved"]
    assert moved["id"] == d and moved["move"]["order"] == [d, a, b, c]
    assert api("POST", f"/api/jobs/{a}/move", json={"to": "down"}).json()["move"]["to"] == 3
    assert api("POST", f"/api/jobs/{c}/move", json={"to": "up"}).json()["move"]["to"] == 3
    assert queued_ids(api) == [d, b, c, a]
    assert api("POST", f"/api/jobs/{d}/move", json={"to": 3}).json()["move"]["order"] == [b, c, d]
    assert api("POST", f"/api/jobs/{b}/move", json={"to": 40}).json()["queue_position"] == 4
    assert queued_ids(api) == [c, d, a, b]
    # Each job's own position agrees with the list.
    assert [api("GET", f"/api/jobs/{i}").json()["queue_position"] for i in (c, d, a, b)] == [
        1,
        2,
        3,
        4,
    ]


def test_a_move_refuses_bad_targets_unknown_jobs_and_jobs_not_queued(start_api):
    api = start_api(workers=False)
    a, b = submit(api, "a"), submit(api, "b")
    for bad in ("bottom", 0, -2, 1.5, True, None, [1], {"to": 1}, "2"):
        assert_error(api("POST", f"/api/jobs/{b}/move", json={"to": bad}), 400, "to")
    assert_error(api("POST", f"/api/jobs/{b}/move", json={}), 400, "to")
    assert_error(api("POST", f"/api/jobs/{b}/move", json={"to": 1, "x": 1}), 400, "x")
    assert_error(api("POST", f"/api/jobs/{b}/move", json=[1]), 400)
    assert_error(api("POST", f"/api/jobs/{b}/move", data="to=top"), 415)
    assert_error(api("POST", "/api/jobs/9999/move", json={"to": "top"}), 404)
    d = api.daemon
    d.store.claim_next(started_at=d.now_iso())  # a runs
    assert (
        "running" in assert_error(api("POST", f"/api/jobs/{a}/move", json={"to": 2}), 409)["error"]
    )
    api("DELETE", f"/api/jobs/{b}")
    assert_error(api("POST", f"/api/jobs/{b}/move", json={"to": "top"}), 409)
    assert queued_ids(api) == []


def test_a_paused_queue_runs_nothing_until_resumed_and_a_restart_keeps_it_paused(
    start_api, make_config
):
    config = make_config()
    api = start_api(config=config)
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_events(api, until="queue.paused")))
    reader.start()
    wait_for(lambda: api.daemon.events.subscriber_count == 1, 10)
    response = api("POST", "/api/queue/pause", json={})
    reader.join(30)
    assert response.status_code == 200 and response.json()["paused"] is True
    assert [kind for _, kind, _ in events][-1:] == ["queue.paused"]
    assert events[-1][2]["paused"] is True and events[-1][2]["by"] == api.daemon.node
    job_id = submit(api, "held")
    # Workers ask the queue every second: several chances to take the job if they would.
    wait_for(lambda: all(w.state()["state"] == "ready" for w in api.daemon.workers), 60)
    for _ in range(3):
        api.daemon.wake()
        threading.Event().wait(1.0)
    view = api("GET", f"/api/jobs/{job_id}").json()
    assert view["status"] == "queued" and view["estimated_time_remaining"] is None
    assert api("GET", "/api/jobs").json()["queue_paused"] is True
    assert api("GET", "/api/health").json()["queue_paused"] is True
    assert api("GET", "/api/queue").json()["paused"] is True
    assert api("POST", "/api/queue/pause", json={}).json()["since"] == response.json()["since"]

    # A restart reads the pause from the store.
    api.daemon.stop()
    again = start_api(config=config_mod.load(config.path))
    assert again("GET", "/api/health").json()["queue_paused"] is True
    assert again("GET", f"/api/jobs/{job_id}").json()["status"] == "queued"
    resumed = again("POST", "/api/queue/resume", json={})
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert again.wait_job(job_id)["status"] == "completed"
    assert again("GET", "/api/jobs").json()["queue_paused"] is False
    assert again("POST", "/api/queue/resume", json={}).json()["paused"] is False
    assert_error(again("POST", "/api/queue/pause", data="x"), 415)


def test_the_running_job_finishes_when_the_queue_is_paused(api: Api):
    with api.daemon.events.subscribe() as sub:
        first = submit(api, "running", steps=30)
        second = submit(api, "waiting")
        wait_for(lambda: (e := sub.get(timeout=1)) and e.type == "job.progress", 60)
    assert api("POST", "/api/queue/pause", json={}).status_code == 200
    assert api.wait_job(first)["status"] == "completed"
    threading.Event().wait(1.5)
    assert api("GET", f"/api/jobs/{second}").json()["status"] == "queued"
    api("POST", "/api/queue/resume", json={})
    assert api.wait_job(second)["status"] == "completed"


def test_a_stopped_job_says_so_and_a_completed_one_names_its_file(api: Api):
    done = api.wait_job(submit(api, "a red fox"))
    assert done["stopped"] is False
    name = done["output_file"]
    assert "/" not in name and done["output_path"].endswith(name)
    served = api("GET", f"/api/outputs/{name}")
    assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
    listed = api("GET", "/api/jobs").json()["history"]
    assert listed[0]["output_file"] == name and listed[0]["stopped"] is False
    with api.daemon.events.subscribe() as sub:
        job_id = submit(api, "long", steps=150)
        wait_for(lambda: (e := sub.get(timeout=1)) and e.type == "job.progress", 60)
    api("POST", f"/api/jobs/{job_id}/interrupt", json={})
    stopped = api.wait_job(job_id)
    assert stopped["status"] == "cancelled" and stopped["stopped"] is True
    assert "output_file" not in stopped
    api("POST", "/api/queue/pause", json={})
    cancelled_id = submit(api, "never")
    api("DELETE", f"/api/jobs/{cancelled_id}")
    cancelled = api("GET", f"/api/jobs/{cancelled_id}").json()
    assert cancelled["status"] == "cancelled" and cancelled["stopped"] is False


def test_health_has_a_boot_id_new_at_each_start_and_the_models_arch(start_api, make_config):
    config = make_config()
    first = start_api(config=config, workers=False)
    body = first("GET", "/api/health").json()
    assert body["backend"]["arch"] == "sd15"  # the tiny model is an SD1.5 pipeline
    boot = body["boot_id"]
    assert isinstance(boot, str) and boot and first("GET", "/api/health").json()["boot_id"] == boot
    first.daemon.stop()
    second = start_api(config=config_mod.load(config.path), workers=False)
    assert second("GET", "/api/health").json()["boot_id"] != boot


def test_a_public_health_check_sees_the_boot_id_but_not_the_machine(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret-token-for-tests"})
    body = api("GET", "/api/health").json()
    assert body["boot_id"] == api.daemon.boot_id and "backend" not in body


# -- PNG info ------------------------------------------------------------------------------
def png(text: dict[str, str] | None = None, *, itxt: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    for key, value in (itxt or {}).items():
        info.add_itxt(key, value, zip=True)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def post_png(api: Api, data: bytes, ctype: str = "image/png"):
    return api("POST", "/api/png-info", data=data, headers={"Content-Type": ctype})


A1111 = (
    "a castle on a hill, <lora:detail:0.5>\nat dusk\nNegative prompt: blurry, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
    "Size: 512x768, Model hash: abc123, Model: dreamshaper_8, Clip skip: 2, "
    'Lora hashes: "detail: 1f"'
)


def test_png_info_reads_our_own_images_and_they_run_again(api: Api):
    done = api.wait_job(submit(api, "a lighthouse", seed=77, negative_prompt="fog"))
    image = api("GET", f"/api/outputs/{done['output_file']}").content
    body = post_png(api, image).json()
    assert body["format"] == "imagineerd"
    params = body["parameters"]
    assert {k: params[k] for k in ("prompt", "negative_prompt", "seed", "steps")} == {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "seed": 77,
        "steps": 2,
    }
    assert body["infotext"].startswith("a lighthouse\nNegative prompt: fog\n")
    # The answer is a job request as it stands.
    again = api("POST", "/api/generate", json=params)
    assert again.status_code == 201, again.text
    # The same as JSON with base64 or a data: URL (what a page has after reading a file).
    encoded = base64.b64encode(image).decode()
    for value in (encoded, "data:image/png;base64," + encoded):
        assert api("POST", "/api/png-info", json={"image": value}).json() == body


def test_png_info_reads_a1111_parameters_in_our_field_names(start_api):
    api = start_api(workers=False)
    for image in (png({"parameters": A1111}), png(itxt={"parameters": A1111})):
        body = post_png(api, image, "application/octet-stream").json()
        assert body["format"] == "a1111" and body["infotext"] == A1111
        assert body["parameters"] == {
            "prompt": "a castle on a hill, <lora:detail:0.5>\nat dusk",
            "negative_prompt": "blurry, lowres",
            "steps": 28,
            "scheduler": "dpmpp_2m_karras",
            "guidance_scale": 6.5,
            "seed": 1234,
            "width": 512,
            "height": 768,
            "model": "dreamshaper_8",
            "clip_skip": 2,
        }
        assert body["extra"] == {"Model hash": "abc123", "Lora hashes": "detail: 1f"}
    only_prompt = post_png(api, png({"parameters": "just a prompt"})).json()
    assert only_prompt["parameters"] == {"prompt": "just a prompt"}


def test_png_info_reads_a_simple_comfyui_graph(start_api):
    api = start_api(workers=False)
    graph = {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 8566257,
                "steps": 20,
                "cfg": 8,
                "sampler_name": "euler_ancestral",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bottle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    body = post_png(api, png({"prompt": json.dumps(graph), "workflow": "{}"})).json()
    assert body["format"] == "comfyui"
    assert body["parameters"] == {
        "prompt": "a bottle",
        "negative_prompt": "watermark",
        "seed": 8566257,
        "steps": 20,
        "guidance_scale": 8.0,
        "scheduler": "euler_a",
        "width": 512,
        "height": 640,
        "model": "v1-5.safetensors",
    }
    nothing = post_png(api, png()).json()
    assert nothing == {"format": None, "parameters": {}, "extra": {}, "infotext": None}
    odd = post_png(api, png({"prompt": json.dumps({"1": {"class_type": "KSampler", "inputs": 5}})}))
    assert odd.json()["format"] is None


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def test_png_info_turns_hostile_bytes_into_clear_400s(start_api):
    api = start_api(workers=False, server={"max_image_bytes": 1 << 20})
    good = png({"parameters": A1111})
    bomb = zlib.compress(b"A" * (64 << 20), 9)  # 64 MiB of text in about 64 KB
    hostile = {
        "not a png": b"GIF89a" + b"\0" * 100,
        "cut off": good[: len(good) // 2],
        "signature only": good[:8] + b"\0\0",
        "huge length": good[:8] + struct.pack(">I", 2**31) + b"tEXt" + b"x" * 20,
        "bad crc": good[:8] + chunk(b"tEXt", b"parameters\0x", crc=1),
        "no keyword": good[:8] + chunk(b"tEXt", b"no separator"),
        "bomb": good[:8] + chunk(b"zTXt", b"parameters\0\0" + bomb),
        "itxt bomb": good[:8] + chunk(b"iTXt", b"parameters\0\1\0\0\0" + bomb),
        "bad zlib": good[:8] + chunk(b"zTXt", b"parameters\0\0" + b"not zlib"),
        "bad utf-8": good[:8] + chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe"),
        "long line": png({"parameters": "p\n" + "Steps: 1, " * 5000}),
    }
    for what, data in hostile.items():
        body = assert_error(post_png(api, data), 400)
        assert "PNG" in body["error"] or "parameter" in body["error"], (what, body)
    assert_error(post_png(api, b""), 400)
    assert_error(api("POST", "/api/png-info", json={"image": "%%%"}), 400, "image")
    assert_error(api("POST", "/api/png-info", json={"image": 5}), 400, "image")
    assert_error(api("POST", "/api/png-info", json={"image": "data:image/png,abc"}), 400, "image")
    assert_error(api("POST", "/api/png-info", json={"image": "aGVsbG8="}), 400, "image")
    assert_error(post_png(api, good, "text/plain"), 415)
    assert_error(post_png(api, b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20)), 413)
    # Chunked, without a declared length: refused once past the limit all the same.
    chunks = iter([good[:8], b"\0" * (1 << 20), b"\0" * 16])
    assert_error(
        api("POST", "/api/png-info", data=chunks, headers={"Content-Type": "image/png"}), 413
    )
    # Another site's page cannot use it either (the origin rule holds for image bodies).
    foreign = {"Content-Type": "image/png", "Origin": "http://evil.example"}
    assert_error(api("POST", "/api/png-info", data=good, headers=foreign), 403)
    assert post_png(api, good).status_code == 200


def test_pause_is_in_the_store_so_another_daemon_on_it_sees_it(make_config):
    config = make_config()
    one = Daemon(config)
    one.start(workers=False)
    try:
        one.pause()
        other = Daemon(config_mod.load(config.path))
        other.start(workers=False)
        try:
            assert other.queue_paused() and other.health()["queue_paused"]
            submitted = other.submit({"prompt": "x", "steps": 2})
            assert other.claim_batch(lambda spec: 1, lambda spec: 0) == []
            other.resume()
            assert one.queue_state() == {"paused": False, "since": None, "by": None}
            (claimed,) = one.claim_batch(lambda spec: 1, lambda spec: 0)
            assert claimed.id == submitted.id
        finally:
            other.stop()
    finally:
        one.stop()
