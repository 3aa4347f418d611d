"""GET /metrics against a real daemon and server: the format, the numbers, the token."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagineerd import metrics as metrics_mod

from .conftest import Api, wait_for

Samples = dict[tuple[str, frozenset], float]


def scrape(api: Api, **kwargs) -> Samples:
    """Every sample of one scrape, by name and labels; the body must parse."""
    response = api("GET", "/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.headers["cache-control"] == "no-store"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_value(api: Api, name: str, expected: float, **labels: str) -> Samples:
    """The first scrape where ``name`` has ``expected``: a job's API status is final a moment
    before the daemon announces it (and the metrics count it)."""
    return wait_for(
        lambda: value(samples := scrape(api), name, **labels) == expected and samples, 10
    )


def test_metrics_parse_and_the_queue_and_job_counters_move(start_api: Callable[..., Api]):
    api = start_api(workers=False)
    samples = scrape(api)
    assert value(samples, "imagineerd_queue_jobs", state="queued") == 0
    assert value(samples, "imagineerd_queue_jobs", state="running") == 0
    assert value(samples, "imagineerd_webhook_deliveries", state="pending") == 0
    assert value(samples, "imagineerd_jobs_total", source="api", outcome="completed") == 0
    ids = [api("POST", "/api/generate", json={"prompt": f"q{i}"}).json()["id"] for i in range(3)]
    assert value(scrape(api), "imagineerd_queue_jobs", state="queued") == 3
    assert api("DELETE", f"/api/jobs/{ids[0]}").status_code == 200
    samples = scrape(api)
    assert value(samples, "imagineerd_queue_jobs", state="queued") == 2
    assert value(samples, "imagineerd_jobs_submitted_total", source="api") == 3
    assert value(samples, "imagineerd_jobs_total", source="api", outcome="cancelled") == 1
    # A job cancelled while queued never ran: no wait or run time for it.
    assert value(samples, "imagineerd_job_queue_wait_seconds_count", source="api") == 0

    # A second daemon in the same process (own folders), with a worker: its own registry,
    # its own counts.
    busy = start_api(paths={"state": "state2", "outputs": "outputs2"})
    done = busy.wait_job(busy("POST", "/api/generate", json={"prompt": "run"}).json()["id"])
    assert done["status"] == "completed"
    samples = wait_value(busy, "imagineerd_jobs_total", 1, source="api", outcome="completed")
    assert value(samples, "imagineerd_jobs_total", source="api", outcome="cancelled") == 0
    assert value(samples, "imagineerd_queue_jobs", state="queued") == 0
    assert value(samples, "imagineerd_job_queue_wait_seconds_count", source="api") == 1
    assert value(samples, "imagineerd_job_run_seconds_count", outcome="completed") == 1
    assert value(samples, "imagineerd_images_total") == 1
    assert value(samples, "imagineerd_denoising_steps_total") == done["steps"]
    assert 0 < value(samples, "imagineerd_job_run_seconds_sum", outcome="completed") < 60
    assert value(samples, "imagineerd_model_loads_total", source="disk") >= 1
    assert value(samples, "imagineerd_model_load_seconds_count") >= 1
    assert value(samples, "imagineerd_worker_state", device="cpu", state="ready") == 1
    assert value(samples, "imagineerd_info", version=metrics_mod.__version__, backend="diffusers")
    # The first daemon's numbers did not move.
    idle = scrape(api)
    assert value(idle, "imagineerd_jobs_total", source="api", outcome="completed") == 0


def test_batches_are_counted_once_their_jobs_settle(start_api, monkeypatch):
    monkeypatch.setattr(metrics_mod, "BATCH_SETTLE_SECONDS", 0.0)
    api = start_api()
    for i in range(2):
        api.wait_job(api("POST", "/api/generate", json={"prompt": f"b{i}"}).json()["id"])
    # max_batch is 1 on the CPU: two batches of one.
    samples = wait_value(api, "imagineerd_batch_size_count", 2)
    assert value(samples, "imagineerd_batch_size_sum") == 2


def test_open_event_streams_are_counted(api: Api):
    assert value(scrape(api), "imagineerd_event_streams_open") == 0
    assert value(scrape(api), "imagineerd_event_streams_limit") == 8
    with api("GET", "/api/events", stream=True) as stream:
        assert stream.status_code == 200
        wait_for(lambda: value(scrape(api), "imagineerd_event_streams_open") == 1, 10)
    wait_for(lambda: value(scrape(api), "imagineerd_event_streams_open") == 0, 10)


def test_a_broken_part_is_left_out_logged_and_counted(api: Api, monkeypatch, caplog):
    def broken() -> dict:
        raise OSError("disk on fire")

    monkeypatch.setattr(api.daemon.store, "counts", broken)
    caplog.set_level(logging.ERROR, logger="imagineerd.metrics")
    for _ in range(2):
        samples = scrape(api)
    assert value(samples, "imagineerd_queue_jobs", state="queued") is None
    assert value(samples, "imagineerd_metrics_errors_total", part="queue") == 2
    assert value(samples, "imagineerd_metrics_errors_total", part="health") == 2  # health too
    assert value(samples, "imagineerd_event_streams_open") == 0  # the rest is there
    logged = [r for r in caplog.records if "queue" in r.getMessage()]
    assert len(logged) == 1 and "disk on fire" in (logged[0].exc_text or "")


def test_openmetrics_when_asked(api: Api):
    response = api("GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


@pytest.mark.parametrize("how", ["bearer", "basic", "query"])
def test_the_token_guards_metrics(start_api, how):
    api = start_api(workers=False, server={"auth_token": "s3cret"})
    response = api("GET", "/metrics")
    assert response.status_code == 401
    assert "imagineerd_" not in response.text
    assert api("GET", "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    kwargs = {
        "bearer": {"headers": {"Authorization": "Bearer s3cret"}},
        "basic": {"auth": ("prometheus", "s3cret")},
        "query": {"params": {"token": "s3cret"}},
    }[how]
    assert value(scrape(api, **kwargs), "imagineerd_queue_jobs", state="queued") == 0


def test_metrics_public_opens_only_metrics(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret"}, metrics={"public": True})
    assert value(scrape(api), "imagineerd_queue_jobs", state="queued") == 0
    assert api("GET", "/api/jobs").status_code == 401
    assert api("GET", "/metrics/../api/jobs").status_code == 401
