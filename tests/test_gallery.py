"""Whatever lies in outputs/ (put there by hand or over the share) never breaks the gallery,
the image routes or start-up: it is listed and served only if it is a regular PNG file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from imagineerd import outputs
from imagineerd.errors import NotFound
from imagineerd.gallery import Gallery
from imagineerd.gallery_index import GalleryIndex
from imagineerd.sqlite_store import SQLiteStore
from imagineerd.store import OutputQuery

from .conftest import Api

# The first bytes of a DirectDraw Surface: Pillow's DDS reader raises NotImplementedError
# on these (an error type no caller expected), under a .png name.
DDS = b"DDS " + (124).to_bytes(4, "little") + bytes(120)


@pytest.fixture
def gallery(tmp_path: Path) -> Gallery:
    folder = tmp_path / "outputs"
    folder.mkdir()
    outputs.save_png(Image.new("RGB", (8, 8), "red"), folder, "20260101_000000_good_1.png", {})
    return Gallery(folder, tmp_path / "thumbs")


def listed(gallery: Gallery) -> list[str]:
    """What the gallery lists: its index, after a pass over the folder."""
    store = SQLiteStore(gallery.directory.parent / "jobs.db")
    try:
        index = GalleryIndex(gallery, store)
        index.reconcile()
        return [e["filename"] for e in index.list(OutputQuery(), limit=100)]
    finally:
        store.close()


def in_thread(call, timeout: float = 10.0):
    """Run ``call`` and fail (not hang) if it blocks, as opening a FIFO would."""
    result: list = []

    def run() -> None:
        try:
            result.append(("value", call()))
        except BaseException as exc:  # handed to the test thread below
            result.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked"
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def test_other_bytes_under_a_png_name_are_left_out_and_not_thumbnailed(gallery: Gallery):
    (gallery.directory / "20260102_000000_dds_2.png").write_bytes(DDS)
    (gallery.directory / "20260103_000000_text_3.png").write_text("not an image")
    assert listed(gallery) == ["20260101_000000_good_1.png"]
    for name in ("20260102_000000_dds_2.png", "20260103_000000_text_3.png"):
        with pytest.raises(NotFound):
            gallery.thumbnail(name, 256)
    with pytest.raises(outputs.NotAPng):
        outputs.read_metadata(gallery.directory / "20260102_000000_dds_2.png")


def test_a_fifo_named_like_an_image_blocks_nothing(gallery: Gallery):
    fifo = gallery.directory / "20260104_000000_fifo_4.png"
    os.mkfifo(fifo)
    assert in_thread(lambda: listed(gallery)) == ["20260101_000000_good_1.png"]
    with pytest.raises(NotFound):
        in_thread(lambda: gallery.resolve(fifo.name))
    assert in_thread(lambda: outputs.find_output_for_job(gallery.directory, 4)) is None


def test_a_name_that_is_not_utf8_is_left_out_of_the_listing(gallery: Gallery):
    raw = os.fsencode(gallery.directory) + b"/20260105_000000_caf\xe9_5.png"
    Image.new("RGB", (8, 8)).save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    assert listed(gallery) == ["20260101_000000_good_1.png"]


def test_the_api_answers_for_every_odd_file_in_outputs(api: Api):
    folder = api.daemon.outputs_dir
    outputs.save_png(Image.new("RGB", (8, 8)), folder, "20260101_000000_good_1.png", {})
    (folder / "20260102_000000_dds_2.png").write_bytes(DDS)
    os.mkfifo(folder / "20260103_000000_fifo_3.png")
    Image.new("RGB", (8, 8)).save(os.fsencode(folder) + b"/20260104_000000_\xff_4.png", "PNG")
    listing = api("GET", "/api/outputs")
    assert listing.status_code == 200
    assert [o["filename"] for o in listing.json()["outputs"]] == ["20260101_000000_good_1.png"]
    for name in ("20260102_000000_dds_2.png", "20260103_000000_fifo_3.png"):
        for query in ("?thumb=256", ""):
            response = api("GET", f"/api/outputs/{name}{query}")
            assert response.status_code == 404 and response.json()["status"] == 404, name
    assert api("GET", "/api/outputs/20260101_000000_good_1.png").content[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_up_recovery_skips_files_that_are_not_images(make_config):
    from imagineerd.daemon import Daemon

    d = Daemon(make_config())
    d.start(workers=False)
    job = d.submit({"prompt": "was running"})
    d.store.claim_next(started_at=d.now_iso())
    d.store.close()  # died mid-job, and these lie where its image would be:
    (d.outputs_dir / f"20260101_000000_x_{job.id}.png").write_bytes(DDS)
    os.mkfifo(d.outputs_dir / f"20260101_000001_y_{job.id}.png")
    d2 = Daemon(make_config())
    try:
        in_thread(lambda: d2.start(workers=False), timeout=30)
        assert d2.job(job.id).status == "queued"  # recovered to run again, not "completed"
    finally:
        d2.stop()
