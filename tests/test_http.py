"""The REST API through a real Waitress server on a loopback port."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from imagineerd import daemon as daemon_mod
from imagineerd.jobs import SEED_MAX

from .conftest import Api, wait_for

DATA = Path(__file__).parent / "data"


def assert_error(response, status: int, field: str | None = None) -> dict:
    """Every error on /api/* has the one JSON shape."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) <= {"error", "code", "status", "field"}
    assert isinstance(body["error"], str) and body["error"]
    assert body["status"] == status and isinstance(body["code"], str)
    if field is not None:
        assert body["field"] == field, body
    return body


def test_original_python_example_runs_unchanged(api: Api, tmp_path: Path):
    # The original Imagineer README's example, byte for byte; only host:port is changed.
    code = (DATA / "imagineer_readme_example.py").read_text()
    script = tmp_path / "example.py"
    script.write_text(code.replace("http://localhost:5000", api.url))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert "Job 1 submitted, position: 1" in result.stdout
    assert "Job completed! Output: outputs/" in result.stdout
    output = result.stdout.split("Output: ")[1].strip()
    assert (api.daemon.config.base_dir / output).is_file()


def test_original_curl_example_runs_unchanged(api: Api, tmp_path: Path):
    script = (
        (DATA / "imagineer_readme_example.sh").read_text().replace("http://localhost:5000", api.url)
    )
    result = subprocess.run(
        ["bash", "-c", script.replace("\ncurl", "\necho; curl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    submitted, jobs, config = (json.loads(line) for line in result.stdout.split("\n") if line)
    assert submitted["status"] == "queued" and submitted["prompt"] == "a beautiful sunset"
    assert set(jobs) >= {"current", "running", "queued", "history"}
    assert config["generation"]["width"] == 64


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_original_javascript_example_runs_unchanged(api: Api, tmp_path: Path):
    # The README's JavaScript example, byte for byte, in Node's fetch (which sends
    # Sec-Fetch-Mode but no Origin): the same-site rule must let it through.
    code = (DATA / "imagineer_readme_example.mjs").read_text()
    script = tmp_path / "example.mjs"
    script.write_text(code.replace("http://localhost:5000", api.url))
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Job 1 submitted, position: 1" in result.stdout
    assert "Image ready: outputs/" in result.stdout


def test_generate_contract(api: Api):
    response = api(
        "POST", "/api/generate", json={"prompt": "  a beautiful landscape ", "seed": 42, "steps": 2}
    )
    assert response.status_code == 201
    body = response.json()
    assert response.headers["Location"] == f"/api/jobs/{body['id']}"
    assert body["status"] == "queued" and body["queue_position"] == 1
    assert body["prompt"] == "a beautiful landscape"
    assert len(body["submitted_at"]) == 26 and body["submitted_at"][10] == "T"
    done = api.wait_job(body["id"])
    assert done["status"] == "completed" and done["output_path"].startswith("outputs/")
    assert done["duration_seconds"] > 0 and done["progress"]["percent"] == 100.0
    for key in (
        "prompt",
        "seed",
        "steps",
        "width",
        "height",
        "guidance_scale",
        "negative_prompt",
        "submitted_at",
        "started_at",
        "completed_at",
    ):
        assert key in done


BOUNDS = [
    ("seed", 0, -1),
    ("seed", SEED_MAX, SEED_MAX + 1),
    ("steps", 1, 0),
    ("steps", 150, 151),
    ("width", 64, 56),
    ("width", 2048, 2056),
    ("height", 64, 63),
    ("height", 2048, 2049),
    ("guidance_scale", 0, -0.5),
    ("guidance_scale", 30, 30.5),
]


@pytest.mark.parametrize(("field", "good", "bad"), BOUNDS)
def test_every_bound_in_range_and_one_past(start_api, field, good, bad):
    api = start_api(workers=False)
    ok = api("POST", "/api/generate", json={"prompt": "x", field: good})
    assert (
        ok.status_code == 201 and api("GET", f"/api/jobs/{ok.json()['id']}").json()[field] == good
    )
    assert_error(api("POST", "/api/generate", json={"prompt": "x", field: bad}), 400, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"steps": 3}, "prompt"),
        ({"prompt": "x", "steps": "3"}, "steps"),
        ({"prompt": "x", "steps": True}, "steps"),
        ({"prompt": "x", "nsfw": True}, "nsfw"),
        ({"prompt": ["x"]}, "prompt"),
    ],
)
def test_bad_values_name_the_field(start_api, body, field):
    api = start_api(workers=False)
    assert_error(api("POST", "/api/generate", json=body), 400, field)


def test_malformed_bodies(start_api):
    api = start_api(workers=False)
    post = lambda data, ctype="application/json": api(  # noqa: E731
        "POST", "/api/generate", data=data, headers={"Content-Type": ctype}
    )
    assert "not valid JSON" in assert_error(post(b"{prompt: x"), 400)["error"]
    assert "JSON object" in assert_error(post(b'["a cat"]'), 400)["error"]
    assert "empty" in assert_error(post(b""), 400)["error"]
    assert "UTF-8" in assert_error(post(b'{"prompt": "\xff"}'), 400)["error"]
    assert_error(post(b"prompt=x", "application/x-www-form-urlencoded"), 415)
    assert api.daemon.store.counts()["queued"] == 0


def test_cancel_semantics_for_every_status(start_api):
    api = start_api(workers=False)
    ids = [api("POST", "/api/generate", json={"prompt": p}).json()["id"] for p in "abcd"]
    d = api.daemon
    assert api("DELETE", f"/api/jobs/{ids[0]}").json() == {"message": "Job cancelled successfully"}
    assert "already cancelled" in assert_error(api("DELETE", f"/api/jobs/{ids[0]}"), 410)["error"]
    running = d.store.claim_next(started_at=d.now_iso())  # ids[1] runs
    assert "interrupt" in assert_error(api("DELETE", f"/api/jobs/{ids[1]}"), 409)["error"]
    d.job_finished(running, "completed", output_path="outputs/x.png")
    assert_error(api("DELETE", f"/api/jobs/{ids[1]}"), 410)
    failed = d.store.claim_next(started_at=d.now_iso())
    d.job_finished(failed, "failed", error="boom")
    assert "already failed" in assert_error(api("DELETE", f"/api/jobs/{ids[2]}"), 410)["error"]
    assert_error(api("DELETE", "/api/jobs/9999"), 404)
    assert_error(api("GET", "/api/jobs/9999"), 404)
    assert_error(api("GET", "/api/jobs/not-a-number"), 404)
    assert_error(api("PATCH", f"/api/jobs/{ids[3]}", json={}), 405)


def test_interrupt_a_running_job(api: Api):
    with api.daemon.events.subscribe() as sub:
        job_id = api("POST", "/api/generate", json={"prompt": "long", "steps": 150}).json()["id"]
        wait_for(lambda: (e := sub.get(timeout=1)) and e.type == "job.progress", 60)
    view = api("GET", f"/api/jobs/{job_id}").json()
    assert view["status"] == "running" and view["queue_position"] == 0
    assert 0 < view["progress"]["step"] < 150 and view["progress"]["total"] == 150
    # A JSON content type even without a body: the rule that keeps other sites' pages out.
    assert_error(api("POST", f"/api/jobs/{job_id}/interrupt"), 415)
    response = api("POST", f"/api/jobs/{job_id}/interrupt", json={})
    assert response.status_code == 202
    assert api.wait_job(job_id)["status"] == "cancelled"
    assert_error(api("POST", f"/api/jobs/{job_id}/interrupt", json={}), 410)


def test_job_list_pagination_with_thousands_of_jobs(start_api):
    api = start_api(workers=False)
    store = api.daemon.store
    # Bulk rows straight into the real SQLite file: 3000 API calls would only test patience.
    db = store._db()
    spec = json.dumps(
        {
            "prompt": "p",
            "negative_prompt": "",
            "seed": 1,
            "steps": 2,
            "width": 64,
            "height": 64,
            "guidance_scale": 7.5,
            "scheduler": "euler",
        }
    )
    with store._write():
        db.executemany(
            "INSERT INTO jobs (seq, status, spec, submitted_at, completed_at) VALUES (?,?,?,?,?)",
            [
                (
                    i,
                    "completed" if i % 3 else "queued",
                    spec,
                    "2026-01-01T00:00:00.000000",
                    "2026-01-01T00:00:01.000000",
                )
                for i in range(1, 3001)
            ],
        )
    seen, before, pages = [], None, 0
    while True:
        params = {"limit": 500, **({"before": before} if before else {})}
        body = api("GET", "/api/jobs", params=params).json()
        ids = [j["id"] for j in body["history"]]
        assert ids == sorted(ids, reverse=True)
        seen += ids
        pages += 1
        before = body["next_before"]
        if before is None:
            break
    assert len(seen) == len(set(seen)) == 2000 and pages == 4
    assert len(body["queued"]) == 1000 and body["queued"][0]["queue_position"] == 1
    last_queued = 3000
    assert api("GET", f"/api/jobs/{last_queued}").json()["queue_position"] == 1000
    assert_error(api("GET", "/api/jobs", params={"limit": 0}), 400, "limit")
    assert_error(api("GET", "/api/jobs", params={"before": "x"}), 400, "before")


def read_events(
    api: Api, headers: dict | None = None, until: str = "job.completed", count: int = 1000
) -> list[tuple[int, str, dict]]:
    events = []
    # The server sends a heartbeat every 15 s, so a missing event fails here, not hangs.
    deadline = time.monotonic() + 90
    with api("GET", "/api/events", stream=True, headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event: dict = {}
        for line in response.iter_lines(decode_unicode=True):
            assert time.monotonic() < deadline, f"no {until} event within 90 s: {events}"
            if line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("event: "):
                event["type"] = line[7:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif not line and "type" in event:
                events.append((event["id"], event["type"], event["data"]))
                if event["type"] == until or len(events) >= count:
                    break
                event = {}
    return events


def test_event_stream_sees_progress_and_completion_and_replays(api: Api, monkeypatch):
    monkeypatch.setattr(daemon_mod, "PROGRESS_EVENT_INTERVAL", 0.0)  # every step, to count
    result: list = []
    reader = threading.Thread(target=lambda: result.extend(read_events(api)))
    reader.start()
    wait_for(lambda: api.daemon.events.subscriber_count == 1, 10)
    job_id = api("POST", "/api/generate", json={"prompt": "sse", "steps": 3}).json()["id"]
    reader.join(60)
    types = [t for _, t, d in result if d.get("id") == job_id]
    assert types == [
        "job.submitted",
        "job.started",
        "job.progress",
        "job.progress",
        "job.progress",
        "job.completed",
    ]
    assert result[-1][2]["output_path"].startswith("outputs/")
    # A client that reconnects after the first event gets the rest again.
    replay = read_events(api, headers={"Last-Event-ID": str(result[0][0])})
    assert [e[0] for e in replay] == [e[0] for e in result[1:]]
    assert_error(api("GET", "/api/events", headers={"Last-Event-ID": "x"}), 400)


def test_a_stream_resumed_from_an_id_the_server_no_longer_holds_starts_with_reset(start_api):
    """As after a restart: the browser sends the last id it saw, from the old process."""
    api = start_api(workers=False)
    old_id = api.daemon.events.epoch - 5
    (event,) = read_events(api, headers={"Last-Event-ID": str(old_id)}, count=1)
    assert event[1] == "reset" and "reload" in event[2]["reason"]
    submitted = api("POST", "/api/generate", json={"prompt": "after reset"}).json()
    replay = read_events(api, headers={"Last-Event-ID": str(event[0])}, until="job.submitted")
    assert [(t, d["id"]) for _, t, d in replay] == [("job.submitted", submitted["id"])]


def test_streams_are_capped_and_the_api_stays_responsive(start_api):
    api = start_api(workers=False, server={"max_event_streams": 3, "threads": 6})
    responses = [api("GET", "/api/events", stream=True) for _ in range(3)]
    try:
        wait_for(lambda: api.daemon.events.subscriber_count == 3, 10)
        for _ in range(20):  # API calls still have threads while every stream is open
            assert api("GET", "/api/health").status_code == 200
        assert "too many" in assert_error(api("GET", "/api/events"), 503)["error"]
    finally:
        for r in responses:
            r.close()
    # Closed streams give their threads back promptly: a new stream is accepted again.
    wait_for(lambda: api.service.streams.open == 0, 10)
    with api("GET", "/api/events", stream=True) as again:
        assert again.status_code == 200


def test_outputs_listing_image_thumbnail_and_caching(api: Api):
    ids = [
        api("POST", "/api/generate", json={"prompt": f"img {i}", "seed": i}).json()["id"]
        for i in range(3)
    ]
    for job_id in ids:
        api.wait_job(job_id)
    body = api("GET", "/api/outputs", params={"limit": 2}).json()
    assert [o["job_id"] for o in body["outputs"]] == [ids[2], ids[1]]
    first = body["outputs"][0]
    assert first["prompt"] == "img 2" and first["seed"] == 2 and first["width"] == 64
    assert first["sampler"] == "Euler" and "Steps: 2" in first["parameters"]
    rest = api("GET", "/api/outputs", params={"before": body["next_before"]}).json()
    assert [o["job_id"] for o in rest["outputs"]] == [ids[0]] and rest["next_before"] is None
    image = api("GET", first["url"])
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
    assert image.content.startswith(b"\x89PNG") and "max-age" in image.headers["Cache-Control"]
    again = api("GET", first["url"], headers={"If-None-Match": image.headers["ETag"]})
    assert again.status_code == 304
    thumb = api("GET", first["url"], params={"thumb": 128})
    assert thumb.headers["Content-Type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert len(list((api.daemon.state_dir / "thumbnails" / "128").iterdir())) == 1
    assert_error(api("GET", first["url"], params={"thumb": 5000}), 400, "thumb")


def raw_get(api: Api, path: str) -> tuple[int, bytes]:
    """Send the path exactly as written (requests would normalise ``..``)."""
    with socket.create_connection(("127.0.0.1", api.service.port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_traversal_and_symlinks_never_leave_outputs(api: Api, tmp_path: Path):
    outputs = api.daemon.outputs_dir
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG TOP-SECRET-BYTES")
    (outputs / "escape.png").symlink_to(secret)
    (outputs / "sub").mkdir()
    (outputs / "sub" / "up.png").symlink_to("../../secret.png")
    (outputs / ".hidden.png").write_bytes(b"\x89PNG HIDDEN-BYTES")
    for path in [
        "/api/outputs/../config.yaml",
        "/api/outputs/..%2Fconfig.yaml",
        "/api/outputs/%2e%2e/%2e%2e/secret.png",
        "/api/outputs/escape.png",
        "/api/outputs/sub/up.png",
        "/api/outputs/.hidden.png",
        "/api/outputs/sub/../../secret.png",
        "/api/outputs/%00.png",
        "/api/outputs/..%5C..%5Csecret.png",
        "/../state/imagineerd.db",
        "/%2e%2e/config.yaml",
    ]:
        status, body = raw_get(api, path)
        assert status in (400, 404), path
        assert b"TOP-SECRET" not in body and b"HIDDEN-BYTES" not in body
        assert b"SQLite" not in body and b"server:" not in body


def test_body_over_the_limit_is_413(start_api):
    api = start_api(workers=False, server={"max_body_bytes": 2048})
    body = json.dumps({"prompt": "x" * 4000})
    assert (
        "2048"
        in assert_error(
            api("POST", "/api/generate", data=body, headers={"Content-Type": "application/json"}),
            413,
        )["error"]
    )

    def chunks():
        yield body.encode()

    # Without a declared length (chunked) the same limit holds.
    assert_error(
        api("POST", "/api/generate", data=chunks(), headers={"Content-Type": "application/json"}),
        413,
    )
    # Absurd sizes are refused by Waitress before it reads them.
    with socket.create_connection(("127.0.0.1", api.service.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1073741824\r\n\r\n{"
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 413")
    assert api.daemon.store.counts()["queued"] == 0


def test_auth_token_guards_every_api_route_but_health(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret"})
    routes = [
        ("GET", "/api/jobs"),
        ("GET", "/api/jobs/1"),
        ("DELETE", "/api/jobs/1"),
        ("POST", "/api/jobs/1/interrupt"),
        ("POST", "/api/generate"),
        ("GET", "/api/config"),
        ("PUT", "/api/config"),
        ("PUT", "/api/config/generation"),
        ("GET", "/api/outputs"),
        ("GET", "/api/outputs/x.png"),
        ("GET", "/api/events"),
    ]
    for method, path in routes:
        response = api(method, path, json={"prompt": "x"})
        assert_error(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert_error(api(method, path, headers={"Authorization": "Bearer wrong"}), 401)
    assert api("GET", "/api/health").status_code == 200
    assert api("GET", "/").status_code == 200  # the page loads and asks for the token
    good = {"Authorization": "Bearer s3cret"}
    assert api("POST", "/api/generate", json={"prompt": "x"}, headers=good).status_code == 201
    assert api("GET", "/api/jobs", params={"token": "s3cret"}).status_code == 200
    assert_error(
        api("POST", "/api/generate", params={"token": "s3cret"}, json={"prompt": "x"}), 401
    )  # query tokens only for GET (EventSource, <img>)
    config = api("GET", "/api/config", headers=good).json()
    assert config["server"]["auth_token"] == "********"
    assert api("PUT", "/api/config", json=config, headers=good).status_code == 200
    assert yaml.safe_load(api.daemon.config.path.read_text())["server"]["auth_token"] == "s3cret"


def test_auth_token_from_environment(start_api, monkeypatch):
    monkeypatch.setenv("IMAGINEERD_AUTH_TOKEN", "from-env")
    api = start_api(workers=False)
    assert_error(api("GET", "/api/jobs"), 401)
    assert api("GET", "/api/jobs", headers={"Authorization": "Bearer from-env"}).ok


def test_cors_is_same_origin_by_default_and_configurable(start_api):
    api = start_api(workers=False)
    assert (
        "Access-Control-Allow-Origin"
        not in api("GET", "/api/health", headers={"Origin": "http://evil.example"}).headers
    )
    api2 = start_api(workers=False, server={"cors_origins": ["http://nas.local:8080"]})
    response = api2("GET", "/api/health", headers={"Origin": "http://nas.local:8080"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://nas.local:8080"
    assert (
        "Access-Control-Allow-Origin"
        not in api2("GET", "/api/health", headers={"Origin": "http://evil.example"}).headers
    )
    # ["*"], as config.yaml documents it, lets every origin in.
    api3 = start_api(workers=False, server={"cors_origins": ["*"]})
    response = api3("GET", "/api/health", headers={"Origin": "http://anywhere.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    cross = {"Origin": "http://anywhere.example", "Sec-Fetch-Site": "cross-site"}
    assert api3("POST", "/api/generate", json={"prompt": "x"}, headers=cross).status_code == 201


def test_config_get_put_and_generation_update(api: Api):
    config = api("GET", "/api/config").json()
    assert config["generation"]["steps"] == 2 and config["restart_required"] == []
    response = api("PUT", "/api/config/generation", json={"steps": 3, "scheduler": "DDIM"})
    assert response.status_code == 200 and response.json()["restart_required"] == []
    job = api.wait_job(api("POST", "/api/generate", json={"prompt": "uses new"}).json()["id"])
    assert job["steps"] == 3 and job["scheduler"] == "ddim"  # applied to the next job at once
    saved = yaml.safe_load(api.daemon.config.path.read_text())
    assert saved["generation"]["steps"] == 3
    assert_error(api("PUT", "/api/config/generation", json={"steps": 151}), 400, "generation.steps")
    assert_error(api("PUT", "/api/config/generation", json={"seed": 1}), 400, "generation.seed")
    config = api("GET", "/api/config").json()
    config["inbox"]["settle_seconds"] = 5  # server.* is read-only over the API (403)
    result = api("PUT", "/api/config", json=config).json()
    assert result["restart_required"] == ["inbox.settle_seconds"] and "restart" in result["message"]
    assert api("GET", "/api/config").json()["restart_required"] == ["inbox.settle_seconds"]
    config["performance"]["max_batch"] = 0
    assert_error(api("PUT", "/api/config", json=config), 400, "performance.max_batch")


def test_config_file_broken_by_hand_gives_a_clear_conflict(api: Api):
    api.daemon.config.path.write_text("generation: {steps: [\n")
    body = assert_error(api("PUT", "/api/config/generation", json={"steps": 4}), 409)
    assert "no longer valid YAML" in body["error"]
    assert api("GET", "/api/health").json()["status"] == "ok"


def test_health_matches_the_seed(api: Api):
    body = api("GET", "/api/health").json()
    assert {k: body[k] for k in ("status", "queue_size", "current_job", "total_completed")} == {
        "status": "ok",
        "queue_size": 0,
        "current_job": False,
        "total_completed": 0,
    }


def test_unknown_routes_and_methods_are_json(start_api):
    api = start_api(workers=False)
    assert_error(api("GET", "/api/nothing"), 404)
    assert_error(api("DELETE", "/api/health"), 405)
    assert_error(api("POST", "/api/jobs", json={}), 405)


def test_serve_command_runs_http_and_stops_on_sigterm(tmp_path: Path, tiny_model: Path):
    from .conftest import write_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, tiny_model)
    # The server's log goes to a file, not a pipe: a pipe nobody reads while polling fills
    # up with access-log lines and then blocks the server mid-write.
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagineerd",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
    import requests

    try:
        wait_for(lambda: _get(requests, f"http://127.0.0.1:{port}/api/health"), 120, 0.2)
        # More access log than a pipe buffer (64 KiB) holds: a server whose log nobody
        # reads would block here.
        with requests.Session() as http:
            for _ in range(700):
                assert http.get(f"http://127.0.0.1:{port}/api/health", timeout=10).ok
        job = requests.post(
            f"http://127.0.0.1:{port}/api/generate", json={"prompt": "cli"}, timeout=10
        ).json()
        wait_for(
            lambda: (
                requests.get(f"http://127.0.0.1:{port}/api/jobs/{job['id']}", timeout=10).json()[
                    "status"
                ]
                == "completed"
            ),
            120,
        )
        time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log_path.read_text()
    assert proc.returncode == 0, stderr[-2000:]
    # combined-format access log, with the byte count
    assert re.search(r'"POST /api/generate HTTP/1.1" 201 \d+ "-" "python-requests', stderr)
    assert "stopped cleanly" in stderr


def _get(requests, url):
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


def test_static_files_never_follow_links_out(tmp_path: Path):
    import falcon
    import falcon.testing

    from imagineerd.http.streams import StaticFiles

    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html>home")
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    from imagineerd.errors import ImagineerdError
    from imagineerd.http import errors

    app = falcon.App()
    app.add_error_handler(ImagineerdError, errors.handle_domain_error)
    ui = StaticFiles(root)
    app.add_route("/", ui)
    app.add_route("/{filename:path}", ui, suffix="item")
    client = falcon.testing.TestClient(app)
    assert "home" in client.simulate_get("/").text
    for path in ("/leak.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/.hidden"):
        response = client.simulate_get(path)
        assert response.status_code == 404 and "TOP-SECRET" not in response.text
