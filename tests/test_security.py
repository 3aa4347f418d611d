"""Hostile requests against a real server on loopback: other sites' pages, other host names,
tokens in URLs and logs, ids that cannot exist, files that are not images."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from .conftest import Api, wait_for
from .test_http import assert_error

JSON = {"Content-Type": "application/json"}


def raw(api: Api, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as written (requests always writes its own Host)."""
    with socket.create_connection(("127.0.0.1", api.service.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ------------------------------------------------------------------------------- CSRF
def test_state_changes_need_json_and_this_origin(start_api):
    api = start_api(workers=False)
    body = b'{"prompt": "from another site"}'
    own = api.url  # e.g. http://127.0.0.1:PORT
    # What a page on another site can make a browser send without a preflight:
    # fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}) has no type...
    assert_error(api("POST", "/api/generate", data=body), 415)
    # ...a form posts text/plain or form-urlencoded...
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        assert_error(api("POST", "/api/generate", data=body, headers={"Content-Type": ctype}), 415)
    # ...and a browser names the page's origin, or says it is another site.
    evil = {**JSON, "Origin": "http://evil.example"}
    assert (
        "another origin"
        in assert_error(api("POST", "/api/generate", data=body, headers=evil), 403)["error"]
    )
    port_over = {**JSON, "Origin": own.rsplit(":", 1)[0] + ":1"}  # same host, other program
    assert_error(api("POST", "/api/generate", data=body, headers=port_over), 403)
    assert_error(api("POST", "/api/generate", data=body, headers={**JSON, "Origin": "null"}), 403)
    for site in ("cross-site", "same-site"):
        assert_error(
            api("POST", "/api/generate", data=body, headers={**JSON, "Sec-Fetch-Site": site}), 403
        )
    job = api("POST", "/api/generate", json={"prompt": "queued"}).json()["id"]
    for method, path in [
        ("DELETE", f"/api/jobs/{job}"),
        ("POST", f"/api/jobs/{job}/interrupt"),
        ("PUT", "/api/config/generation"),
        ("PUT", "/api/config"),
        ("PATCH", "/api/config"),
    ]:
        response = api(method, path, json={"steps": 3}, headers={"Origin": "http://evil.example"})
        assert_error(response, 403)
    assert api.daemon.store.counts()["queued"] == 1
    assert api.daemon.job(job).status == "queued"
    # This server's own pages, and clients that are not browsers, keep working.
    assert api("POST", "/api/generate", json={"prompt": "a"}, headers={"Origin": own}).ok
    same = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
    assert api("POST", "/api/generate", json={"prompt": "b"}, headers=same).status_code == 201
    assert api("POST", "/api/generate", json={"prompt": "c"}).status_code == 201
    # The original API's clients cancel with a bare DELETE: no body, no content type.
    # (No browser sends a DELETE to another origin without a CORS preflight.)
    assert api("DELETE", f"/api/jobs/{job}").json() == {"message": "Job cancelled successfully"}
    assert api.daemon.store.counts()["queued"] == 3
    # The server's answer for an origin listed in server.cors_origins.
    listed = start_api(workers=False, server={"cors_origins": ["http://nas.local:8080"]})
    cors = {**JSON, "Origin": "http://nas.local:8080", "Sec-Fetch-Site": "cross-site"}
    assert listed("POST", "/api/generate", data=body, headers=cors).status_code == 201


# -------------------------------------------------------------------- DNS rebinding
@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil", "[::1"],
)
def test_other_host_names_are_misdirected(api: Api, host: str):
    for target in ("/api/jobs", "/api/health", "/", "/app.js"):
        status, headers, body = raw(
            api, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 421, (host, target)
        assert headers["content-type"].startswith("application/json")
        assert b'"code": "misdirected_request"' in body and b"allowed_hosts" in body
    status, _, _ = raw(
        api,
        f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        'Content-Length: 15\r\nConnection: close\r\n\r\n{"prompt": "x"}'.encode(),
    )
    assert status == 421 and api.daemon.store.counts()["queued"] == 0


def test_own_names_and_allowed_hosts_are_answered(start_api):
    api = start_api(workers=False, server={"allowed_hosts": ["imagine.example.com", "*.lan"]})
    port = api.service.port
    names = [
        "localhost",
        f"localhost:{port}",
        "127.0.0.1",
        f"127.0.0.1:{port}",
        "[::1]",
        f"[::1]:{port}",
        "192.168.1.20:8080",
        socket.gethostname(),
        f"{socket.gethostname().split('.')[0]}.local",
        "imagine.example.com",
        "IMAGINE.example.com.",
        "nas.lan",
        "app.localhost",
    ]
    for host in names:
        status, _, _ = raw(
            api, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200, host
    status, _, _ = raw(api, b"GET /api/health HTTP/1.0\r\n\r\n")  # no Host at all: not a browser
    assert status == 200


# ----------------------------------------------------------------- token and cookie
def test_cookie_login_serves_images_and_events_and_logs_no_token(start_api, caplog):
    api = start_api(server={"auth_token": "s3cret-token"})
    good = {"Authorization": "Bearer s3cret-token"}
    job = api("POST", "/api/generate", json={"prompt": "private"}, headers=good).json()["id"]
    wait_for(lambda: api.daemon.job(job).finished, 60)
    image = api("GET", "/api/outputs", headers=good).json()["outputs"][0]["url"]
    caplog.set_level(logging.INFO, logger="imagineerd.access")

    import requests

    browser = requests.Session()
    url = api.url
    assert_error(browser.get(url + image, timeout=10), 401)
    assert_error(browser.get(url + "/api/events", timeout=10), 401)
    assert browser.get(url + "/api/session", timeout=10).json() == {
        "auth_required": True,
        "authenticated": False,
    }
    assert_error(browser.post(url + "/api/session", json={"token": "wrong"}, timeout=10), 401)
    login = browser.post(url + "/api/session", json={"token": "s3cret-token"}, timeout=10)
    assert login.status_code == 200
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "s3cret-token" not in cookie
    assert browser.get(url + "/api/session", timeout=10).json()["authenticated"] is True
    response = browser.get(url + image, timeout=10)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    assert response.headers["Cache-Control"].startswith("private")
    assert browser.get(url + image, params={"thumb": 256}, timeout=10).status_code == 200
    with browser.get(url + "/api/events", stream=True, timeout=10) as events:
        assert events.status_code == 200
        assert next(events.iter_lines()) == b"retry: 2000"
    assert browser.post(url + "/api/generate", json={"prompt": "x"}, timeout=10).status_code == 201
    # A forged or stale cookie is no login.
    forged = requests.get(url + "/api/jobs", cookies={"imagineerd_session": "1.2.3"}, timeout=10)
    assert_error(forged, 401)
    # Scripts may still put the token in a GET's query; the log shows it masked.
    assert requests.get(url + "/api/jobs", params={"token": "s3cret-token"}, timeout=10).ok
    assert_error(requests.get(url + "/api/jobs", params={"token": "nope"}, timeout=10), 401)
    assert requests.get(url + "/api/jobs?tok%65n=s3cret-token", timeout=10).ok  # same name
    assert browser.delete(url + "/api/session", timeout=10).ok  # log out
    assert_error(browser.get(url + "/api/jobs", timeout=10), 401)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/api/jobs?token=********" in logged
    assert "s3cret-token" not in logged and "nope" not in logged
    # Images are public in caches only when no token guards them.
    open_api = start_api(workers=False)
    open_api.daemon.outputs_dir.joinpath("a.png").write_bytes(
        api.daemon.outputs_dir.joinpath(image.split("/api/outputs/")[1]).read_bytes()
    )
    assert open_api("GET", "/api/outputs/a.png").headers["Cache-Control"].startswith("public")


def test_health_shows_details_only_with_the_token(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret"})
    anonymous = api("GET", "/api/health").json()
    assert anonymous == {
        "status": "ok",
        "queue_size": 0,
        "current_job": False,
        "total_completed": 0,
        "total_failed": 0,
        # Random at each start: it says the server restarted, nothing about the machine.
        "boot_id": api.daemon.boot_id,
    }
    full = api("GET", "/api/health", headers={"Authorization": "Bearer s3cret"}).json()
    assert full["backend"]["model"] == api.daemon.config["model"]["name"]
    assert "workers" in full and set(anonymous) < set(full)
    wrong = api("GET", "/api/health", headers={"Authorization": "Bearer nope"}).json()
    assert set(wrong) == set(anonymous)
    # Without a token configured there is nothing to hide from anyone.
    assert "backend" in start_api(workers=False)("GET", "/api/health").json()


def test_waitress_gets_the_connection_limits(start_api):
    api = start_api(workers=False, server={"connection_limit": 7, "channel_timeout": 33})
    adj = api.service.server.adj
    assert (adj.connection_limit, adj.channel_timeout) == (7, 33)


# ------------------------------------------------------------------ ids that cannot exist
IMPOSSIBLE_IDS = [
    "abc",
    "-1",
    "0",
    "1.5",
    "1e3",
    str(2**63),
    str(2**64 + 1),
    "9" * 30,
    "9" * 5000,
    "%201",
]


@pytest.mark.parametrize("job_id", IMPOSSIBLE_IDS)
def test_every_id_that_cannot_exist_is_404_on_every_method(start_api, job_id):
    api = start_api(workers=False)
    for method, path in [
        ("GET", f"/api/jobs/{job_id}"),
        ("DELETE", f"/api/jobs/{job_id}"),
        ("POST", f"/api/jobs/{job_id}/interrupt"),
        ("GET", f"/api/jobs/{job_id}/interrupt"),
    ]:
        assert_error(api(method, path, json={}), 404)
    assert_error(api("DELETE", f"/api/jobs/{job_id}"), 404)  # bare, as the seed sends it
    assert_error(api("GET", f"/api/jobs/{2**63 - 1}"), 404)  # the largest id SQLite holds


# ------------------------------------------------------------------------ gallery
def _png(api: Api) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


KEPT = ((4, 512), (5, 128), (5, 256), (5, 512))  # in the order they were last used


def test_thumbnails_of_non_images_sizes_and_cache_bound(start_api):
    api = start_api(workers=False)
    outputs = api.daemon.outputs_dir
    (outputs / "fake.png").write_bytes(b"not a png at all" * 10)
    (outputs / "cut.png").write_bytes(_png(api)[:40])
    for name in ("fake.png", "cut.png"):
        assert_error(api("GET", f"/api/outputs/{name}", params={"thumb": 256}), 404)
    png = _png(api)
    for i in range(6):
        (outputs / f"img{i}.png").write_bytes(png)
    body = assert_error(api("GET", "/api/outputs/img0.png", params={"thumb": 300}), 400, "thumb")
    assert "128, 256, 512" in body["error"]
    for size in (0, -1, 1, 16, 1000, 1024, 5000, "0128", "x", 2**70):
        assert_error(api("GET", "/api/outputs/img0.png", params={"thumb": size}), 400, "thumb")
    gallery = api.daemon.gallery
    gallery.max_thumbnail_files = 4
    for i in range(6):
        for size in (128, 256, 512):
            got = api("GET", f"/api/outputs/img{i}.png", params={"thumb": size})
            assert got.status_code == 200 and got.content[:2] == b"\xff\xd8"
    cached = [p for p in (api.daemon.state_dir / "thumbnails").rglob("*.jpg")]
    assert len(cached) == 4

    # Least recently used goes first: the four kept are the last four made.
    paths = {key: gallery.thumbnail(f"img{key[0]}.png", key[1]) for key in KEPT}
    assert set(cached) == set(paths.values())
    # File times are coarse (a few ms): give the use order one second apart, oldest first.
    now_ns = time.time_ns()
    for age, key in enumerate(reversed(KEPT), start=1):
        os.utime(paths[key], ns=(now_ns - age * 10**9, now_ns - age * 10**9))
    inode = paths[4, 512].stat().st_ino
    # A hit makes img4/512 the most recent; the next miss evicts img5/128, now the oldest.
    assert api("GET", "/api/outputs/img4.png", params={"thumb": 512}).status_code == 200
    assert api("GET", "/api/outputs/img0.png", params={"thumb": 128}).status_code == 200
    now = set((api.daemon.state_dir / "thumbnails").rglob("*.jpg"))
    assert len(now) == 4 and not paths[5, 128].exists()
    assert paths[4, 512] in now and paths[4, 512].stat().st_ino == inode  # kept, not remade
    listed = [o["filename"] for o in api("GET", "/api/outputs").json()["outputs"]]
    assert "fake.png" not in listed and "cut.png" not in listed


def test_listing_leaves_out_links_pointing_outside_outputs(api: Api, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(api))
    outputs = api.daemon.outputs_dir
    (outputs / "link-out.png").symlink_to(outside / "secret.png")
    (outputs / "real.png").write_bytes(_png(api))
    (outputs / "link-in.png").symlink_to(outputs / "real.png")
    listed = {o["filename"] for o in api("GET", "/api/outputs").json()["outputs"]}
    assert listed == {"real.png", "link-in.png"}
    assert_error(api("GET", "/api/outputs/link-out.png"), 404)


def test_names_too_long_for_the_file_system_are_404(api: Api):
    long = "9" * 300
    for path in (f"/{long}", f"/api/outputs/{long}.png", f"/api/outputs/a/{long}.png"):
        status, headers, _ = raw(
            api, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 404, path
    assert_error(api("GET", f"/api/outputs/{long}.png", params={"thumb": 128}), 404)


def test_session_cookie_is_secure_when_the_page_is_on_https(start_api):
    api = start_api(workers=False, server={"auth_token": "t0ken"})
    plain = api("POST", "/api/session", json={"token": "t0ken"})
    assert "Secure" not in plain.headers["Set-Cookie"]  # plain HTTP: a Secure cookie is lost
    # Behind a TLS proxy the daemon sees HTTP; the browser's Origin tells it is HTTPS.
    host = api.url.split("//")[1]
    proxied = api(
        "POST",
        "/api/session",
        json={"token": "t0ken"},
        headers={"Origin": f"https://{host}", "Sec-Fetch-Site": "same-origin"},
    )
    assert proxied.status_code == 200 and "Secure" in proxied.headers["Set-Cookie"]


def test_no_page_may_frame_the_ui_or_sniff_outputs(api: Api):
    for path in ("/", "/app.js", "/api/health", "/api/nothing"):
        headers = api("GET", path).headers
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = raw(
        api, b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    assert status == 421 and headers["x-frame-options"] == "DENY"


def test_the_log_masks_the_whole_token_value_as_the_query_parser_reads_it():
    from imagineerd.http.security import redact_token

    # The parser splits a query on "&" only, so "ab;cd" is one token: all of it is masked.
    assert redact_token("/api/jobs?token=ab;cd&x=1") == "/api/jobs?token=********&x=1"
    assert redact_token("/x?a=1&tok%65n=zz#f") == "/x?a=1&tok%65n=********#f"
    assert redact_token("/x?a=token") == "/x?a=token"


def test_http_basic_with_the_token_as_password_is_accepted_on_every_guarded_api(start_api):
    """A1111's API clients send their credentials as HTTP Basic; the token is the password
    (any user name). Every API served beside ours is guarded as /api/ is."""
    api = start_api(workers=False, server={"auth_token": "t0ken"})
    assert api("GET", "/api/jobs", auth=("anyone", "t0ken")).status_code == 200
    assert api("GET", "/api/jobs", auth=("anyone", "wrong")).status_code == 401
    for path in ("/sdapi/v1/sd-models", "/v1/models", "/metrics"):
        assert api("GET", path).status_code == 401, path
    bad = api("GET", "/api/jobs", headers={"Authorization": "Basic %%%"})
    assert bad.status_code == 401
