"""Webhooks against a real receiver on loopback: down, then up; signatures checked with the
Standard Webhooks project's own library; a slow receiver never holds up a job."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
from standardwebhooks import Webhook

from imagineerd import webhooks

from .conftest import wait_for
from .test_http import assert_error

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
JOB_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """An HTTP server that records what it is sent (and can answer slowly)."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                receiver.received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    started: list[Receiver] = []

    def start(port: int, delay: float = 0.0) -> Receiver:
        started.append(Receiver(port, delay))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def test_signatures_verify_with_the_standard_webhooks_library():
    body = b'{"type": "job.completed"}'
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(time.time())),
    }
    headers["webhook-signature"] = webhooks.sign(
        SECRET, "msg_1", int(headers["webhook-timestamp"]), body
    )
    assert Webhook(SECRET).verify(body, headers) == {"type": "job.completed"}


def test_backoff_doubles_with_jitter_up_to_an_hour():
    import random

    rng = random.Random(1)
    pauses = [webhooks.backoff(n, rng) for n in range(1, 16)]
    assert 1.0 <= pauses[0] <= 3.0 and 8.0 <= pauses[3] <= 24.0
    assert max(pauses) <= webhooks.MAX_BACKOFF * 1.5


def test_a_receiver_that_is_down_gets_the_delivery_once_it_is_up(start_api, receivers):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    api = start_api(webhooks={"endpoints": [{"url": url, "secret": SECRET}]})
    job = api("POST", "/api/generate", json={"prompt": "a fox", "seed": 3}).json()
    assert api.wait_job(job["id"])["status"] == "completed"
    # Refused at first: recorded, and due again later.
    tried = wait_for(
        lambda: [
            d
            for d in api("GET", "/api/webhooks/deliveries").json()["deliveries"]
            if d["attempts"] >= 1
        ],
        30,
    )
    assert tried[0]["state"] == "pending" and tried[0]["last_error"]
    receiver = receivers(port)
    wait_for(lambda: receiver.received, 30)
    delivered = wait_for(
        lambda: [
            d
            for d in api("GET", "/api/webhooks/deliveries").json()["deliveries"]
            if d["state"] == "delivered"
        ],
        30,
    )
    assert len(delivered) == 1 and delivered[0]["last_status"] == 204
    time.sleep(1.5)
    assert len(receiver.received) == 1  # once, not again
    headers, body = receiver.received[0]
    payload = Webhook(SECRET).verify(body, {k.lower(): v for k, v in headers.items()})
    assert payload["type"] == "job.completed" and payload["data"]["id"] == job["id"]
    assert payload["data"]["output_path"].startswith("outputs/")


def test_a_jobs_own_webhook_url_only_for_allowed_hosts(start_api, receivers):
    port = free_port()
    receiver = receivers(port)
    api = start_api(webhooks={"allowed_hosts": ["127.0.0.1"], "job_secret": JOB_SECRET})
    refused = api(
        "POST", "/api/generate", json={"prompt": "x", "webhook_url": "http://10.1.2.3/steal"}
    )
    assert "webhooks.allowed_hosts" in assert_error(refused, 400)["error"]
    bad = api("POST", "/api/generate", json={"prompt": "x", "webhook_url": "file:///etc/passwd"})
    assert "webhook_url" in assert_error(bad, 400)["error"]
    url = f"http://127.0.0.1:{port}/mine"
    job = api("POST", "/api/generate", json={"prompt": "x", "webhook_url": url}).json()
    wait_for(lambda: receiver.received, 60)
    headers, body = receiver.received[0]
    payload = Webhook(JOB_SECRET).verify(body, {k.lower(): v for k, v in headers.items()})
    assert payload["data"]["id"] == job["id"] and payload["data"]["webhook_url"] == url


def test_a_slow_receiver_never_holds_up_the_jobs(start_api, receivers):
    port = free_port()
    receiver = receivers(port, delay=8.0)
    api = start_api(
        webhooks={"endpoints": [{"url": f"http://127.0.0.1:{port}/", "secret": SECRET}]}
    )
    ids = [api("POST", "/api/generate", json={"prompt": f"job {i}"}).json()["id"] for i in range(2)]
    for job_id in ids:
        assert api.wait_job(job_id)["status"] == "completed"
    # Both jobs are done while the receiver is still busy with the first delivery: nothing
    # it took has come back yet (sent inline, the second job would wait for the first).
    assert receiver.received == []
    wait_for(lambda: len(receiver.received) == 2, 60)


def test_the_config_api_never_shows_the_secrets_and_keeps_them(start_api):
    url = "http://127.0.0.1:9/hook"
    api = start_api(
        workers=False,
        webhooks={"endpoints": [{"url": url, "secret": SECRET}], "job_secret": JOB_SECRET},
    )
    shown = api("GET", "/api/config").json()
    assert SECRET not in json.dumps(shown) and JOB_SECRET not in json.dumps(shown)
    assert shown["webhooks"]["endpoints"][0]["secret"] == "********"
    saved = api("PUT", "/api/config", json=shown)
    assert saved.status_code == 200, saved.text
    assert api.daemon.saved_config["webhooks"]["endpoints"][0]["secret"] == SECRET
    change = {"webhooks": {"allowed_hosts": ["evil.example"]}}
    assert_error(api("PATCH", "/api/config", json=change), 403)
