"""A real Prometheus scrapes a real daemon with the shipped scrape config and alert rules;
every Grafana dashboard panel's query must return data.

.ci/run installs Debian's prometheus; elsewhere the test is skipped when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from .conftest import Api, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
if not os.path.exists(PROMETHEUS):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's prometheus (see .ci/run)")
    pytest.skip("prometheus not installed (apt install prometheus)", allow_module_level=True)

TOKEN = "metrics-t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of the dashboard, Grafana's variables
    replaced as Grafana would (all instances, a rate window of a few scrapes)."""
    dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "20s")
            found.append((panel["title"], expr.replace("$instance", ".*")))
    assert all("$" not in expr for _, expr in found), found
    return found


@pytest.fixture
def prometheus(tmp_path: Path):
    """Start Prometheus for a daemon's URL: the shipped config, scraping every second."""
    started: list[subprocess.Popen] = []

    def start(target: str) -> str:
        config = yaml.safe_load((ROOT / "contrib" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ROOT / "contrib" / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        token_file = tmp_path / "imagineerd.token"
        token_file.write_text(TOKEN + "\n")
        job["authorization"]["credentials_file"] = str(token_file)
        job["static_configs"] = [{"targets": [target]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert started[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, 30, 0.2)
        return url

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def query(url: str, expr: str) -> list[dict]:
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_and_every_dashboard_panel_has_data(start_api, prometheus):
    from imagineerd.inbox import Inbox

    api: Api = start_api(server={"auth_token": TOKEN}, inbox={"enabled": True})
    inbox = Inbox(api.daemon, api.daemon.config)
    inbox.start()
    api.http.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        url = prometheus(api.url.removeprefix("http://"))
        wait_for(lambda: query(url, 'up{job="imagineerd"} == 1'), 30, 0.5)
        ids = [
            api("POST", "/api/generate", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)
        ]
        (api.daemon.config.path_for("inbox") / "one.txt").write_text("from the inbox\n")
        with api("GET", "/api/events", stream=True):  # an open stream
            for job_id in ids:
                assert api.wait_job(job_id)["status"] == "completed"
            wait_for(lambda: query(url, "imagineerd_inbox_files_total"), 30, 0.5)
            missing: list[tuple[str, str]] = []
            for title, expr in panel_queries():
                if "imagineerd_gpu_" in expr and not _cuda():
                    continue  # no GPU here: the panel is rightly empty
                try:
                    wait_for(lambda: query(url, expr), 30, 0.5)  # noqa: B023
                except AssertionError:
                    missing.append((title, expr))
            assert not missing, f"panels without data: {missing}"
        assert query(url, "imagineerd_event_streams_open")
        # Three from the API, one from the inbox.
        wait_for(lambda: query(url, 'sum(imagineerd_jobs_total{outcome="completed"}) >= 4'), 30)
        assert query(url, 'imagineerd_jobs_total{source="inbox", outcome="completed"} == 1')
        targets = requests.get(f"{url}/api/v1/targets", timeout=10).json()["data"]
        (target,) = targets["activeTargets"]
        assert target["health"] == "up", target
        rules = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
        assert set(loaded) == {"ImagineerdDown", "ImagineerdQueueStalled"}
        for rule in loaded.values():
            assert rule["health"] in ("ok", "unknown"), rule
            assert rule["state"] == "inactive", rule  # a healthy daemon raises no alert
    finally:
        inbox.stop()


def _cuda() -> bool:
    torch = __import__("sys").modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def test_a_wrong_token_makes_the_target_down(start_api, prometheus):
    api: Api = start_api(workers=False, server={"auth_token": "another-token"})
    url = prometheus(api.url.removeprefix("http://"))
    wait_for(lambda: query(url, 'up{job="imagineerd"} == 0'), 30, 0.5)
    (target,) = requests.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert re.search(r"\b401\b", target["lastError"]), target
