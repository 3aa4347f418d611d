"""Live previews: the latent projection, the events a real run sends, and that they change
nothing about the images."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imagineerd import worker
from imagineerd.backends.previews import _PROJECTIONS, Previewer, PreviewPixels
from imagineerd.daemon import Daemon
from imagineerd.events import EventBus
from imagineerd.preview_feed import PreviewFeed

from .conftest import wait_finished, wait_for


def test_the_projection_maps_each_latent_channel_to_its_colour():
    weights, _ = _PROJECTIONS["sd15"]
    latents = torch.zeros(3, 4, 2, 5)
    latents[1, 3] = 1.0  # image 1: only channel 3, whose colour is (-0.184, -0.271, -0.473)
    made = Previewer("sd15").start(latents, count=2)  # the third is padding
    assert made is not None and len(made) == 2
    blank, coloured = (np.asarray(p.image()) for p in made)
    assert blank.shape == (2, 5, 3) and (blank == 127).all()  # zero latents: mid grey
    expected = [int((w + 1.0) * 127.5) for w in weights[3]]
    assert (coloured == expected).all(), (coloured[0, 0], expected)


def test_sdxl_latents_use_their_own_projection_and_unknown_latents_none():
    latents = torch.zeros(1, 4, 1, 1)
    sd15 = np.asarray(Previewer("sd15").start(latents, 1)[0].image())
    sdxl = np.asarray(Previewer("sdxl").start(latents, 1)[0].image())
    assert (sd15 != sdxl).any()  # SDXL's bias moves the grey
    assert Previewer("sd15").start(torch.zeros(1, 16, 4, 4), 1) is None  # 16 channels


def _previews_and_images(make_config, every: int, tmp_name: str, monkeypatch):
    monkeypatch.setattr(worker, "PREVIEW_INTERVAL", 0.0)  # every wanted step, for counting
    config = make_config(
        performance={"max_batch": 2},
        previews={"every_steps": every},
        paths={"outputs": f"out-{tmp_name}", "state": f"state-{tmp_name}"},
    )
    d = Daemon(config)
    ids = [d.submit({"prompt": p, "seed": s, "steps": 12}).id for p, s in (("a", 1), ("b", 2))]
    events = d.events.subscribe(d.events.position)
    d.start()
    try:
        jobs = [wait_finished(d, i, 120) for i in ids]
        seen = []
        while (event := events.get(timeout=1)) is not None:
            seen.append(event)
    finally:
        events.close()
        d.stop()
    assert len({j.started_at for j in jobs}) == 1  # one batch
    images = [
        np.asarray(Image.open(d.config.base_dir / j.output_path).convert("RGB")) for j in jobs
    ]
    return ids, seen, images


def test_a_batch_sends_each_job_its_previews_and_the_same_images_as_without(
    make_config, monkeypatch
):
    ids, seen, with_previews = _previews_and_images(make_config, 3, "on", monkeypatch)
    for job_id in ids:
        mine = [e for e in seen if e.data.get("id") == job_id]
        previews = [e for e in mine if e.type == "job.preview"]
        # Steps 3, 6 and 9 of 12; the last step's picture is the image itself.
        assert [e.data["step"] for e in previews] == [3, 6, 9], [e.data for e in previews]
        completed = next(i for i, e in enumerate(mine) if e.type == "job.completed")
        assert all(mine.index(e) < completed for e in previews)  # never after the image
        for event in previews:
            head, data = event.data["image"].split(",", 1)
            assert head == "data:image/jpeg;base64"
            picture = Image.open(io.BytesIO(base64.b64decode(data)))
            # An eighth of the 64x64 image: the latents' own size.
            assert picture.format == "JPEG" and picture.size == (8, 8)
            assert (event.data["width"], event.data["height"], event.data["total"]) == (8, 8, 12)
    ids, seen, without = _previews_and_images(make_config, 0, "off", monkeypatch)
    assert not [e for e in seen if e.type == "job.preview"]
    for a, b in zip(with_previews, without, strict=True):
        assert (a == b).all()  # making previews does not touch the latents


def test_previews_are_throttled_per_batch(make_config, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    sent: list[tuple[int, int]] = []

    class Host:
        stopping = threading.Event()

        def preview_every(self) -> int:
            return 1

        def report_preview(self, job_id, step, total, pixels):
            sent.append((job_id, step))

        def __getattr__(self, name):  # everything else a batch needs, doing nothing
            return lambda *args, **kwargs: None

    class Backend:
        model_label = None

        def generate(self, batch, on_step):
            for step in range(1, 6):
                # 0.1 s a step: a preview is due at most every PREVIEW_INTERVAL (0.25 s).
                clock[0] += 0.1
                on_step(step, 6, preview=lambda: [(r, None) for r in batch])
            return [Image.new("RGB", (8, 8))] * len(batch)

        def is_out_of_memory(self, exc):
            return False

    from imagineerd.config import DEFAULTS
    from imagineerd.jobs import Job, validate

    w = worker.Worker(Host())
    w._backend = Backend()
    jobs = [
        Job(i, "running", validate({"prompt": str(i)}, DEFAULTS["generation"]), "") for i in (7, 8)
    ]
    w.process(jobs)
    # Steps at 100.1, .2, .3, .4, .5: the first, then the first a quarter second later.
    assert sent == [(7, 1), (8, 1), (7, 4), (8, 4)]


def test_the_feed_drops_a_preview_whose_job_finished_meanwhile():
    bus = EventBus()
    feed = PreviewFeed(bus.publish)
    gate = threading.Event()

    class Slow(PreviewPixels):
        def image(self):
            gate.wait(10)  # still copying off the device when the job finishes
            return super().image()

    with bus.subscribe(bus.position) as events:
        feed.start()
        try:
            feed.offer(1, 3, 12, Slow(torch.zeros(2, 2, 3, dtype=torch.uint8)))
            wait_for(lambda: not feed._waiting, timeout=10)  # being encoded now
            feed.forget(1)  # the job ends: its end is announced after this returns
            gate.set()
            feed.offer(2, 3, 12, PreviewPixels(torch.zeros(2, 2, 3, dtype=torch.uint8)))
            event = wait_for(lambda: events.get(timeout=0.1), timeout=10)
        finally:
            feed.stop()
    assert event.type == "job.preview" and event.data["id"] == 2
    assert feed.latest(1) is None and feed.latest(2) == event.data


def test_every_job_gets_its_turn_when_encoding_falls_behind():
    published: list[int] = []
    feed = PreviewFeed(lambda type_, data: published.append(data["id"]))
    pixels = PreviewPixels(torch.zeros(2, 2, 3, dtype=torch.uint8))
    for job_id in (1, 2, 3, 1):  # job 1 sends a newer one before the encoder starts
        feed.offer(job_id, 3, 12, pixels)
    feed.start()
    try:
        wait_for(lambda: len(published) == 3, timeout=10)
    finally:
        feed.stop()
    assert published == [2, 3, 1]  # the oldest waiting first; one each, the newest


@pytest.mark.parametrize("value", [-1, 1001, "5", True])
def test_every_steps_is_checked(make_config, value):
    from imagineerd.errors import ConfigError

    with pytest.raises(ConfigError, match="previews.every_steps"):
        make_config(previews={"every_steps": value})


def test_a_running_jobs_view_carries_its_latest_preview(start_api):
    """A page opened mid-run shows the picture so far at once (GET /api/jobs and the job)."""
    api = start_api(previews={"every_steps": 1})
    job = api("POST", "/api/generate", json={"prompt": "slow", "steps": 150}).json()
    try:
        view = wait_for(
            lambda: (v := api("GET", f"/api/jobs/{job['id']}").json()).get("preview") and v
        )
        assert view["status"] == "running"
        preview = view["preview"]
        assert 0 < preview["step"] < preview["total"] == 150
        assert preview["image"].startswith("data:image/jpeg;base64,")
        listed = api("GET", "/api/jobs").json()
        assert any(j["id"] == job["id"] and "preview" in j for j in listed["running"])
    finally:
        api("POST", f"/api/jobs/{job['id']}/interrupt", json={})
    done = api.wait_job(job["id"])
    assert done["status"] == "cancelled" and "preview" not in done
