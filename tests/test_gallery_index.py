"""The gallery index: listing and filtering from the store, favourites, the trash and its
undo, zips, the purge, and the pass that keeps the index true to the outputs folder, on a
real SQLite file (and PostgreSQL for the store's part) behind a real HTTP server."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from imagineerd import outputs
from imagineerd.gallery import Gallery
from imagineerd.gallery_index import DAY, EMPTY_CONFIRM_SECONDS, TRASH, GalleryIndex
from imagineerd.sqlite_store import SQLiteStore
from imagineerd.store import OutputQuery, OutputRecord, Store

from . import test_store as contract
from .conftest import Api, wait_for
from .test_gallery import DDS, in_thread

#: The store fixtures of the contract suite: every store-level test runs on SQLite and on
#: PostgreSQL, as test_store.py's do.
open_store = contract.open_store
store = contract.store
sqlite_store = contract.sqlite_store

T = "2026-01-01T00:00:00.000000"


def error(response, status: int, field: str | None = None) -> dict:
    """The one JSON error shape, with ``status`` (and ``field``)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "code", "status", "field"} and body["status"] == status
    if field is not None:
        assert body.get("field") == field, body
    return body


def make_png(
    folder: Path,
    name: str,
    *,
    prompt: str = "a fox",
    model: str = "sd15/base",
    source: str | None = "api",
    size: tuple[int, int] = (64, 64),
    job_id: int = 1,
    when: datetime | None = None,
) -> Path:
    """A PNG with our metadata chunk, as a job of ``source`` writes it."""
    record = {"id": job_id, "prompt": prompt, "negative_prompt": "", "model": model, "seed": 1}
    if source is not None:
        record["source"] = source
    text = {"imagineerd": json.dumps(record), "parameters": f"{prompt}\nSteps: 2, Seed: 1"}
    where = folder / name
    path = outputs.save_png(Image.new("RGB", size, "red"), where.parent, where.name, text)
    if when is not None:
        os.utime(path, (when.timestamp(), when.timestamp()))
    return path


def names(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [o["filename"] for o in response.json()["outputs"]]


def record(path: str, **fields) -> OutputRecord:
    values = {
        "filename": path,
        "created": T,
        "size_bytes": 10,
        "mtime_ns": 1,
        "entry": {"filename": path, "url": f"/api/outputs/{path}"},
        **fields,
    }
    return OutputRecord(path=path, **values)


# -- the store's part, on SQLite and PostgreSQL -------------------------------------------------
def test_rows_are_listed_newest_first_paged_and_kept_by_path(store: Store):
    rows = [record(f"2026010{i}_000000_p_{i}.png", prompt=f"p{i}") for i in range(5)]
    rows.append(record("sub/20260109_000000_s_9.png", prompt="in a folder"))
    store.put_outputs(rows)
    page = store.list_outputs(OutputQuery(), limit=3)
    assert [r.filename for r in page] == [
        "sub/20260109_000000_s_9.png",
        "20260104_000000_p_4.png",
        "20260103_000000_p_3.png",
    ]
    rest = store.list_outputs(OutputQuery(), limit=10, before=page[-1].filename)
    assert [r.name for r in rest] == [f"2026010{i}_000000_p_{i}.png" for i in (2, 1, 0)]
    assert store.output_stats()["20260101_000000_p_1.png"] == (10, 1, None)
    # A file read again (it changed) keeps what only the index knows: its favourite mark.
    assert store.set_favourite("20260101_000000_p_1.png", True).favourite is True
    store.put_outputs([record("20260101_000000_p_1.png", prompt="changed", size_bytes=20)])
    (again,) = store.find_outputs(["20260101_000000_p_1.png"]).values()
    assert again.prompt == "changed" and again.size_bytes == 20 and again.favourite is True
    assert store.set_favourite("nope.png", True) is None
    assert store.find_outputs(["nope.png", "20260100_000000_p_0.png"]).keys() == {
        "20260100_000000_p_0.png"
    }
    assert store.drop_outputs(["20260100_000000_p_0.png", "nope.png"]) == 1
    assert len(store.output_stats()) == 5


def test_every_filter_of_a_listing(store: Store):
    store.put_outputs(
        [
            record("a.png", prompt="A red FOX in Äpfeln", model="m1", source="ui", width=512),
            record("b.png", prompt="a blue fox", model="m2", source="api", width=512, height=768),
            record("c.png", prompt="no animal", model="m1", source=None, width=64, height=64),
            record("d.png", prompt=None, created="2026-03-02T10:00:00.000000", source="inbox"),
        ]
    )
    store.set_favourite("b.png", True)

    def listed(**query) -> list[str]:
        return [r.path for r in store.list_outputs(OutputQuery(**query), limit=10)]

    assert listed(text="fox") == ["b.png", "a.png"]
    assert listed(text="äPFEL") == ["a.png"]  # case-folded beyond ASCII
    assert listed(text="100%") == [] and listed(text="_") == []  # no wildcards
    assert listed(model="m1") == ["c.png", "a.png"]
    assert listed(source="ui") == ["a.png"] and listed(source="inbox") == ["d.png"]
    assert listed(favourite=True) == ["b.png"]
    assert listed(favourite=False) == ["d.png", "c.png", "a.png"]
    assert listed(width=512) == ["b.png", "a.png"] and listed(width=512, height=768) == ["b.png"]
    assert listed(since="2026-03-01T00:00:00.000000") == ["d.png"]
    assert listed(until="2026-01-01T00:00:00.000000") == ["c.png", "b.png", "a.png"]
    assert listed(text="fox", model="m2", favourite=True) == ["b.png"]


def test_a_row_moved_to_the_trash_and_back_keeps_its_favourite(store: Store):
    store.put_outputs([record("x.png"), record("y.png")])
    store.set_favourite("x.png", True)
    moved = store.move_output("x.png", record(".trash/x.png", filename="x.png", trashed_at=1000.0))
    assert moved.path == ".trash/x.png" and moved.filename == "x.png" and moved.favourite
    assert [r.path for r in store.list_outputs(OutputQuery(), limit=10)] == ["y.png"]
    # The same name trashed again (made anew, deleted again): the trash holds both.
    store.put_outputs([record("x.png")])
    store.move_output("x.png", record(".trash/x-1.png", filename="x.png", trashed_at=2000.0))
    trash = store.trashed_outputs(limit=10)
    assert [(r.path, r.trashed_at) for r in trash] == [
        (".trash/x-1.png", 2000.0),
        (".trash/x.png", 1000.0),
    ]
    assert [r.path for r in store.trashed_outputs(limit=10, trashed_before=1500.0)] == [
        ".trash/x.png"
    ]
    assert store.find_outputs(["x.png"], trashed=True)["x.png"].path == ".trash/x-1.png"
    assert store.find_outputs(["x.png"]) == {}  # not listed while in the trash
    assert store.set_favourite("x.png", False) is None
    # Rows a pass finds in the trash again keep the time they went there.
    store.put_outputs([record(".trash/x.png", filename="x.png", trashed_at=9999.0)])
    assert store.find_outputs(["x.png"], trashed=True)["x.png"].path == ".trash/x-1.png"
    back = store.move_output(".trash/x.png", record("x.png"))
    assert back.favourite and back.trashed_at is None
    assert [r.path for r in store.list_outputs(OutputQuery(), limit=10)] == ["y.png", "x.png"]


def test_rows_name_the_node_that_read_them_and_are_found_by_path(store: Store):
    store.put_outputs([record("a.png", node="gpu-1"), record(".trash/b.png", trashed_at=5.0)])
    store.set_favourite("a.png", True)
    # Read again by another node (a shared folder): the row is that node's now, its mark kept.
    store.put_outputs([record("a.png", node="gpu-2", size_bytes=11)])
    assert store.output_stats() == {"a.png": (11, 1, "gpu-2"), ".trash/b.png": (10, 1, None)}
    found = store.outputs_at(["a.png", ".trash/b.png", "nope.png"])
    assert set(found) == {"a.png", ".trash/b.png"}
    assert found["a.png"].favourite and found["a.png"].node == "gpu-2"
    assert found[".trash/b.png"].trashed_at == 5.0
    moved = store.move_output("a.png", record(".trash/a.png", trashed_at=6.0, node="gpu-1"))
    assert moved.node == "gpu-1" and moved.favourite


def test_the_trash_pages_on_past_rows_trashed_at_the_same_time(store: Store):
    """A bulk delete trashes every image at one time: pages go by time, then path."""
    store.put_outputs([record(f".trash/{i}.png", trashed_at=7.0) for i in range(5)])
    store.put_outputs([record(".trash/late.png", trashed_at=9.0)])
    seen, after = [], None
    while page := store.trashed_outputs(limit=2, trashed_before=8.0, after=after):
        seen += [r.path for r in page]
        after = (page[-1].trashed_at, page[-1].path)
    assert seen == [f".trash/{i}.png" for i in (4, 3, 2, 1, 0)]


def test_two_nodes_reconciling_one_folder_at_once_index_each_image_once(open_store, tmp_path):
    folder = tmp_path / "outputs"
    for i in range(60):
        make_png(folder, f"20260101_0000{i:02d}_n_{i}.png", job_id=i, size=(8, 8))
    indexes = [
        GalleryIndex(Gallery(folder, tmp_path / "thumbs"), open_store(), clock=time.time)
        for _ in range(2)
    ]
    start = threading.Barrier(2)

    def node(index: GalleryIndex) -> None:
        start.wait()
        index.reconcile()

    threads = [threading.Thread(target=node, args=(index,)) for index in indexes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    listed = [r.path for r in indexes[0].store.list_outputs(OutputQuery(), limit=100)]
    assert len(listed) == len(set(listed)) == 60
    assert len(indexes[1].store.output_stats()) == 60


def test_hostile_metadata_is_indexed_as_text_either_store_can_hold(open_store, tmp_path):
    """A PNG's JSON chunk may carry a NUL (PostgreSQL's text holds none), a lone surrogate
    (no UTF-8 for it), a number where text belongs or an id that is no id: the image is
    listed, what cannot be held is replaced, and the images beside it are indexed."""
    folder = tmp_path / "outputs"
    chunk = '{"id": "x", "prompt": "a\\u0000b \\ud800 c", "model": 5, "source": ["ui"]}'
    outputs.save_png(
        Image.new("RGB", (8, 8)), folder, "20260102_000000_odd_2.png", {"imagineerd": chunk}
    )
    make_png(folder, "20260101_000000_plain_1.png")
    index = GalleryIndex(Gallery(folder, tmp_path / "thumbs"), open_store())
    index.reconcile()
    odd, plain = index.list(OutputQuery(), limit=10)
    assert plain["filename"] == "20260101_000000_plain_1.png"
    assert odd["filename"] == "20260102_000000_odd_2.png" and odd["job_id"] == "x"
    json.dumps(odd, ensure_ascii=False).encode("utf-8")  # any answer can carry it
    (row,) = index.store.find_outputs(["20260102_000000_odd_2.png"]).values()
    assert row.prompt == "a\ufffdb \ufffd c" and row.model is None and row.job_id is None
    assert [e["filename"] for e in index.list(OutputQuery(text="B \ufffd C"), limit=10)] == [
        "20260102_000000_odd_2.png"
    ]


def test_listing_queries_walk_an_index_not_the_table(sqlite_store: SQLiteStore):
    """A page of a large gallery, alone or with one filter, never scans or sorts the table."""
    ran: list[str] = []
    sqlite_store.put_outputs([record(f"{i:05d}.png", model="m", source="ui") for i in range(50)])
    sqlite_store._db().set_trace_callback(ran.append)
    for query in (
        OutputQuery(),
        OutputQuery(model="m"),
        OutputQuery(source="ui"),
        OutputQuery(favourite=True),
        OutputQuery(width=64, height=64),
    ):
        sqlite_store.list_outputs(query, limit=50)
        sqlite_store.list_outputs(query, limit=50, before="00010.png")
    sqlite_store.trashed_outputs(limit=10)
    sqlite_store.trashed_outputs(limit=10, trashed_before=5.0)
    sqlite_store.trashed_outputs(limit=10, trashed_before=5.0, after=(4.0, ".trash/a.png"))
    sqlite_store.outputs_at([".trash/a.png"])
    sqlite_store.find_outputs(["a.png"], trashed=True)
    sqlite_store._db().set_trace_callback(None)
    selects = {sql for sql in ran if sql.lstrip().upper().startswith("SELECT")}
    assert len(selects) >= 12
    for sql in selects:
        plan = " | ".join(r[3] for r in sqlite_store._db().execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "TEMP B-TREE" not in plan, (sql, plan)
        assert "SCAN outputs" not in plan or "INDEX" in plan, (sql, plan)


# -- listing over HTTP ---------------------------------------------------------------------------
def test_the_listing_filters_and_pages_from_the_index(start_api):
    api: Api = start_api(workers=False)
    folder = api.daemon.outputs_dir
    make_png(
        folder,
        "20260301_100000_red_fox_1.png",
        prompt="A red Fox",
        model="m1",
        source="ui",
        when=datetime(2026, 3, 1, 10, 0),
    )
    make_png(
        folder,
        "20260301_110000_blue_fox_2.png",
        prompt="a blue fox",
        model="m2",
        size=(64, 128),
        job_id=2,
        when=datetime(2026, 3, 1, 11, 0),
    )
    make_png(
        folder,
        "20260302_090000_owl_3.png",
        prompt="an owl",
        model="m1",
        source="inbox",
        when=datetime(2026, 3, 2, 9, 0),
    )
    make_png(
        folder,
        "sub/20260303_000000_cat_4.png",
        prompt="a cat",
        source=None,
        when=datetime(2026, 3, 3, 0, 0),
    )
    api.daemon.gallery_index.reconcile()

    everything = api("GET", "/api/outputs").json()
    assert [o["filename"] for o in everything["outputs"]] == [
        "sub/20260303_000000_cat_4.png",
        "20260302_090000_owl_3.png",
        "20260301_110000_blue_fox_2.png",
        "20260301_100000_red_fox_1.png",
    ]
    blue = everything["outputs"][2]
    assert blue["favourite"] is False and blue["prompt"] == "a blue fox"
    assert (blue["width"], blue["height"], blue["job_id"]) == (64, 128, 2)
    assert blue["url"] == "/api/outputs/20260301_110000_blue_fox_2.png"
    assert blue["created"] == "2026-03-01T11:00:00.000000" and blue["source"] == "api"
    assert everything["next_before"] is None

    page = api("GET", "/api/outputs", params={"limit": 3}).json()
    assert page["next_before"] == "20260301_110000_blue_fox_2.png"
    rest = api("GET", "/api/outputs", params={"before": page["next_before"]}).json()
    assert [o["filename"] for o in rest["outputs"]] == ["20260301_100000_red_fox_1.png"]

    def listed(**params) -> list[str]:
        return [name.split("_", 2)[2] for name in names(api("GET", "/api/outputs", params=params))]

    assert listed(q="FOX") == ["blue_fox_2.png", "red_fox_1.png"]
    assert listed(model="m1") == ["owl_3.png", "red_fox_1.png"]
    assert listed(source="ui") == ["red_fox_1.png"] and listed(source="inbox") == ["owl_3.png"]
    assert listed(width=64, height=128) == ["blue_fox_2.png"]
    assert listed(since="2026-03-02") == ["cat_4.png", "owl_3.png"]
    assert listed(until="2026-03-01") == ["blue_fox_2.png", "red_fox_1.png"]
    assert listed(until="20260301") == ["blue_fox_2.png", "red_fox_1.png"]  # basic format
    assert listed(since="2026-03-01T10:30", until="2026-03-02T08:59:59") == ["blue_fox_2.png"]
    offset = datetime(2026, 3, 1, 11, 0).astimezone().isoformat()  # the same moment, with +hh:mm
    assert listed(since=offset, until=offset) == ["blue_fox_2.png"]
    assert listed(q="fox", model="m2", limit=1) == ["blue_fox_2.png"]


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"limit": 0}, "limit", "1 to 500"),
        ({"limit": "many"}, "limit", "whole number"),
        ({"source": "email"}, "source", "api, inbox, ui, a1111, openai, cli"),
        ({"favourite": "maybe"}, "favourite", "true or false"),
        ({"width": "wide"}, "width", "whole number"),
        ({"height": 0}, "height", "1 to 65535"),
        ({"since": "yesterday"}, "since", "ISO date"),
        ({"until": "2026-13-01"}, "until", "2026-03-01"),
        ({"until": "9999-12-31T23:59:59-14:00"}, "until", "ISO date"),
        ({"until": "0999-01-01"}, "until", "ISO date"),  # would sort after every date
        ({"since": "0001-01-01T00:00:00+14:00"}, "since", "ISO date"),
        ({"q": "a\x00b"}, "q", "without NUL"),
        ({"model": "m" * 1001}, "model", "up to 1000"),
        ({"before": "\x00"}, "before", "without NUL"),
    ],
)
def test_a_bad_listing_parameter_is_a_400_naming_it(api: Api, params, field, words):
    body = error(api("GET", "/api/outputs", params=params), 400, field)
    assert words in body["error"], body


def test_a_png_copied_in_by_hand_is_listed_and_one_removed_is_dropped(api: Api):
    folder = api.daemon.outputs_dir
    assert names(api("GET", "/api/outputs")) == []
    stays = "20260100_000000_stays_0.png"
    make_png(folder, stays)
    make_png(folder, "20260101_000000_by_hand_1.png")
    make_png(folder, "later/20260102_000000_in_a_new_folder_2.png")
    # The next listing reads the folders that changed (no waiting for the background pass).
    wait_for(lambda: len(names(api("GET", "/api/outputs"))) == 3, 10)
    (folder / "20260101_000000_by_hand_1.png").unlink()
    wait_for(
        lambda: (
            names(api("GET", "/api/outputs"))
            == ["later/20260102_000000_in_a_new_folder_2.png", stays]
        ),
        10,
    )
    # A folder removed with its images takes their rows with it.
    (folder / "later" / "20260102_000000_in_a_new_folder_2.png").unlink()
    (folder / "later").rmdir()
    wait_for(lambda: names(api("GET", "/api/outputs")) == [stays], 10)
    assert set(api.daemon.store.output_stats()) == {stays}


def test_an_outputs_folder_away_or_found_empty_keeps_the_index(api: Api, tmp_path: Path):
    """A share not mounted yet (the folder gone, then an empty mount point) must not cost
    the favourite marks: an unreadable folder changes nothing, an empty one is believed only
    by a background pass an hour after the first that found it so."""
    folder, index = api.daemon.outputs_dir, api.daemon.gallery_index
    name = "20260101_000000_kept_1.png"
    make_png(folder, name)
    assert api("PATCH", f"/api/outputs/{name}", json={"favourite": True}).status_code == 200
    away = tmp_path / "away"
    folder.rename(away)
    index.reconcile()
    assert names(api("GET", "/api/outputs")) == [name]
    folder.mkdir()  # the empty mount point
    index.reconcile()
    assert api.daemon.store.find_outputs([name])[name].favourite
    folder.rmdir()
    away.rename(folder)  # mounted again
    index.reconcile()
    assert api("GET", "/api/outputs").json()["outputs"][0]["favourite"] is True
    (folder / name).unlink()  # emptied for real: believed at a pass an hour later
    index.reconcile()
    assert api.daemon.store.output_stats() != {}
    index.reconcile()  # a pass right after is no second look
    assert api.daemon.store.output_stats() != {}
    real = index.clock
    index.clock = lambda: real() + EMPTY_CONFIRM_SECONDS + 1
    try:
        index.reconcile()
    finally:
        index.clock = real
    assert api.daemon.store.output_stats() == {}


def test_the_pass_ignores_links_out_fifos_and_other_files_and_survives_a_bad_png(
    start_api, tmp_path: Path
):
    api: Api = start_api(workers=False, gallery={"rescan_seconds": 1})
    folder = api.daemon.outputs_dir
    good = make_png(folder, "20260101_000000_good_1.png")
    make_png(folder, "20260105_000000_good_5.png", job_id=5)
    outside = make_png(tmp_path / "elsewhere", "20260109_000000_secret_9.png", prompt="secret")
    (folder / "20260102_000000_link_in_2.png").symlink_to(good)
    (folder / "20260103_000000_link_out_3.png").symlink_to(outside)
    (folder / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    (folder / "20260114_000000_dangling_14.png").symlink_to(folder / "nothing.png")
    (folder / "20260115_000000_loop_15.png").symlink_to(folder / "20260115_000000_loop_15.png")
    make_png(folder / TRASH, "20260116_000000_trashed_16.png")
    (folder / "20260116_000000_into_trash_16.png").symlink_to(
        folder / TRASH / "20260116_000000_trashed_16.png"
    )
    os.mkfifo(folder / "20260104_000000_fifo_4.png")
    (folder / "20260117_000000_link_to_fifo_17.png").symlink_to(
        folder / "20260104_000000_fifo_4.png"
    )
    (folder / "20260106_000000_dds_6.png").write_bytes(DDS)
    (folder / "20260107_000000_truncated_7.png").write_bytes(good.read_bytes()[:60])
    (folder / "20260108_000000_text_8.png").write_text("not an image")
    (folder / "notes.txt").write_text("a note")
    Image.new("RGB", (8, 8)).save(folder / "20260110_000000_jpeg_10.jpg")
    make_png(folder, ".20260111_000000_hidden_11.png")
    make_png(folder / ".hidden-folder", "20260112_000000_hidden_12.png")
    # The FIFO would block a pass that opened it: the pass must still finish.
    in_thread(lambda: api.daemon.gallery_index.reconcile(), timeout=20)
    listed = set(names(api("GET", "/api/outputs")))
    # What the folder scan listed: regular PNGs, and a link to one inside the folder (it is
    # served too); a truncated PNG whose header survived may be listed.
    good = {
        "20260101_000000_good_1.png",
        "20260105_000000_good_5.png",
        "20260102_000000_link_in_2.png",
    }
    assert good <= listed <= good | {"20260107_000000_truncated_7.png"}
    assert "secret" not in json.dumps(api("GET", "/api/outputs").json())
    # A listed link is not moved to the trash (from there a relative link leads elsewhere).
    body = error(api("DELETE", "/api/outputs/20260102_000000_link_in_2.png"), 409)
    assert "symbolic link" in body["error"]
    assert (folder / "20260102_000000_link_in_2.png").is_symlink()
    # The background pass, on its own, keeps the same view and never stalls on the FIFO.
    make_png(folder, "20260113_000000_late_13.png", job_id=13)
    wait_for(lambda: "20260113_000000_late_13.png" in api.daemon.store.output_stats(), 10)
    assert not set(api.daemon.store.output_stats()) & {
        "20260103_000000_link_out_3.png",
        "20260104_000000_fifo_4.png",
        "20260106_000000_dds_6.png",
        "20260108_000000_text_8.png",
        "linked-folder/20260109_000000_secret_9.png",
        "20260114_000000_dangling_14.png",
        "20260115_000000_loop_15.png",
        "20260116_000000_into_trash_16.png",
        "20260117_000000_link_to_fifo_17.png",
    }
    error(api("GET", "/api/outputs/20260116_000000_into_trash_16.png"), 404)


def test_an_image_the_daemon_writes_is_listed_at_once_with_the_ui_as_source(api: Api):
    ui = {"X-Imagineerd-Source": "ui"}
    job = api("POST", "/api/generate", json={"prompt": "from the page", "seed": 1}, headers=ui)
    assert job.status_code == 201
    admin = {"X-Imagineerd-Source": "admin"}
    other = api("POST", "/api/generate", json={"prompt": "a script", "seed": 2}, headers=admin)
    plain = api("POST", "/api/generate", json={"prompt": "plain", "seed": 3})
    for response in (job, other, plain):
        api.wait_job(response.json()["id"])
    assert api.daemon.job(job.json()["id"]).source == "ui"
    assert api.daemon.job(other.json()["id"]).source == "api"  # any other value: ignored
    assert api.daemon.job(plain.json()["id"]).source == "api"
    # The saver indexed each image as it wrote it, before its job was reported finished:
    # in the index before anything listed the folder.
    done = api("GET", f"/api/jobs/{job.json()['id']}").json()
    assert done["output_file"] in api.daemon.store.output_stats()
    listing = api("GET", "/api/outputs", params={"source": "ui"}).json()["outputs"]
    assert [o["filename"] for o in listing] == [done["output_file"]]
    assert listing[0]["prompt"] == "from the page" and listing[0]["favourite"] is False
    assert len(names(api("GET", "/api/outputs", params={"source": "api"}))) == 2


# -- favourites ----------------------------------------------------------------------------------
def test_a_favourite_is_marked_listed_and_unmarked(api: Api):
    folder = api.daemon.outputs_dir
    make_png(folder, "20260101_000000_a_1.png")
    name = "20260102_000000_b_2.png"
    make_png(folder, name, job_id=2)
    # Copied in a moment ago: marking it indexes it first.
    marked = api("PATCH", f"/api/outputs/{name}", json={"favourite": True})
    assert marked.status_code == 200, marked.text
    assert marked.json()["filename"] == name and marked.json()["favourite"] is True
    assert names(api("GET", "/api/outputs", params={"favourite": "true"})) == [name]
    assert names(api("GET", "/api/outputs", params={"favourite": "false"})) == [
        "20260101_000000_a_1.png"
    ]
    entry = api("GET", "/api/outputs").json()["outputs"][0]
    assert entry["filename"] == name and entry["favourite"] is True
    assert (
        api("PATCH", f"/api/outputs/{name}", json={"favourite": False}).json()["favourite"] is False
    )
    assert names(api("GET", "/api/outputs", params={"favourite": "true"})) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"favourite": "yes"}, "favourite"),
        ({"favourite": 1}, "favourite"),
        ({}, "favourite"),
        ({"favourite": True, "stars": 5}, "stars"),
        ([True], None),
    ],
)
def test_a_bad_favourite_body_is_a_400(api: Api, body, field):
    make_png(api.daemon.outputs_dir, "20260101_000000_a_1.png")
    error(api("PATCH", "/api/outputs/20260101_000000_a_1.png", json=body), 400, field)


def test_marking_no_image_is_a_404(api: Api):
    for name in ("nope.png", "..%2Fconfig.yaml", ".trash/x.png", "a.txt"):
        error(api("PATCH", f"/api/outputs/{name}", json={"favourite": True}), 404)


# -- the trash -----------------------------------------------------------------------------------
def test_a_deleted_image_goes_to_the_trash_and_restore_brings_it_back(api: Api):
    folder = api.daemon.outputs_dir
    name = "20260101_000000_fox_1.png"
    data = make_png(folder, name).read_bytes()
    make_png(folder, "20260102_000000_owl_2.png", job_id=2)
    api("PATCH", f"/api/outputs/{name}", json={"favourite": True})
    before = time.time()
    deleted = api("DELETE", f"/api/outputs/{name}")
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["trashed"] == [name]
    purge_after = datetime.fromisoformat(body["purge_after"]).timestamp()
    assert before + 7 * DAY - 5 < purge_after < time.time() + 7 * DAY + 5
    # Gone from the listing and the image route; renamed, not deleted.
    assert names(api("GET", "/api/outputs")) == ["20260102_000000_owl_2.png"]
    error(api("GET", f"/api/outputs/{name}"), 404)
    assert not (folder / name).exists() and (folder / TRASH / name).read_bytes() == data
    trash = api("GET", "/api/trash").json()["trashed"]
    assert [t["filename"] for t in trash] == [name] and trash[0]["purge_after"] == body[
        "purge_after"
    ]
    error(api("DELETE", f"/api/outputs/{name}"), 404)  # not there any more
    restored = api("POST", "/api/outputs/restore", json={"files": [name]})
    assert restored.json() == {"restored": [name], "missing": [], "conflicts": [], "failed": []}
    assert (folder / name).read_bytes() == data and not (folder / TRASH / name).exists()
    listed = api("GET", "/api/outputs").json()["outputs"]
    assert [(o["filename"], o["favourite"]) for o in listed] == [
        ("20260102_000000_owl_2.png", False),
        (name, True),  # the favourite mark came back with it
    ]
    assert api("GET", "/api/trash").json() == {"trashed": []}
    assert api("GET", f"/api/outputs/{name}").content == data


def test_deleting_and_restoring_many_at_once(api: Api):
    folder = api.daemon.outputs_dir
    files = [f"20260101_00000{i}_img_{i}.png" for i in range(4)]
    for i, name in enumerate(files[:3]):
        make_png(folder, name, job_id=i)
    make_png(folder, "deep/er/" + files[3], job_id=3)
    files[3] = "deep/er/" + files[3]
    asked = [files[0], "nope.png", files[3], files[0], "../config.yaml", files[1]]
    response = api("POST", "/api/outputs/delete", json={"files": asked})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["trashed"] == [files[0], files[3], files[1]]
    assert body["missing"] == ["nope.png", "../config.yaml"] and body["purge_after"]
    assert names(api("GET", "/api/outputs")) == [files[2]]
    assert (folder / TRASH / "deep" / "er" / files[3].rsplit("/", 1)[1]).is_file()
    assert api("POST", "/api/outputs/delete", json={"files": ["nope.png"]}).json() == {
        "trashed": [],
        "missing": ["nope.png"],
        "failed": [],
        "purge_after": None,
    }
    back = api("POST", "/api/outputs/restore", json={"files": [files[3], files[2], files[0]]})
    assert back.json() == {
        "restored": [files[3], files[0]],
        "missing": [files[2]],
        "conflicts": [],
        "failed": [],
    }
    assert set(names(api("GET", "/api/outputs"))) == {files[0], files[2], files[3]}
    assert [t["filename"] for t in api("GET", "/api/trash").json()["trashed"]] == [files[1]]


def test_a_name_taken_again_is_a_conflict_and_the_trash_keeps_both(api: Api):
    folder = api.daemon.outputs_dir
    name = "20260101_000000_twice_1.png"
    make_png(folder, name, prompt="first")
    api("DELETE", f"/api/outputs/{name}")
    make_png(folder, name, prompt="second")  # the same name again (copied in by hand)
    api.daemon.gallery_index.reconcile()
    # Restoring would overwrite the new file: refused, the old one stays in the trash.
    refused = api("POST", "/api/outputs/restore", json={"files": [name]}).json()
    assert refused == {"restored": [], "missing": [], "conflicts": [name], "failed": []}
    assert "second" in json.dumps(api("GET", "/api/outputs").json())
    assert (folder / TRASH / name).is_file()
    # Deleted as well: a suffix keeps both in the trash; the last trashed comes back first.
    assert api("DELETE", f"/api/outputs/{name}").status_code == 200
    assert (folder / TRASH / "20260101_000000_twice_1-1.png").is_file()
    assert [t["filename"] for t in api("GET", "/api/trash").json()["trashed"]] == [name, name]
    assert api("POST", "/api/outputs/restore", json={"files": [name]}).json()["restored"] == [name]
    assert api("GET", "/api/outputs").json()["outputs"][0]["prompt"] == "second"
    assert not (folder / TRASH / "20260101_000000_twice_1-1.png").exists()
    assert (folder / TRASH / name).is_file()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "files"),
        ({"files": []}, "files"),
        ({"files": "a.png"}, "files"),
        ({"files": ["a.png", 3]}, "files"),
        ({"files": [f"{i}.png" for i in range(501)]}, "files"),
        ({"files": ["a.png"], "all": True}, "all"),
    ],
)
@pytest.mark.parametrize("route", ["delete", "restore", "zip"])
def test_a_bad_list_of_files_is_a_400(api: Api, route, body, field):
    error(api("POST", f"/api/outputs/{route}", json=body), 400, field)


def test_what_stays_in_the_trash_past_trash_days_is_purged(start_api):
    api: Api = start_api(workers=False, gallery={"trash_days": 7})
    index = api.daemon.gallery_index
    folder = api.daemon.outputs_dir
    for i in range(3):
        make_png(folder, f"sub/20260101_00000{i}_old_{i}.png", job_id=i)
    files = [f"sub/20260101_00000{i}_old_{i}.png" for i in range(3)]
    api("POST", "/api/outputs/delete", json={"files": files[:2]})
    index.run_pass()
    assert len(api("GET", "/api/trash").json()["trashed"]) == 2  # not due yet
    api("POST", "/api/outputs/restore", json={"files": [files[1]]})
    real = index.clock
    index.clock = lambda: real() + 7 * DAY + 60  # a week and a minute later
    try:
        index.run_pass()
    finally:
        index.clock = real
    assert api("GET", "/api/trash").json() == {"trashed": []}
    assert not (folder / TRASH / "sub").exists()  # its emptied folder went with it
    assert set(names(api("GET", "/api/outputs"))) == {files[1], files[2]}
    assert api("POST", "/api/outputs/restore", json={"files": [files[0]]}).json()["missing"] == [
        files[0]
    ]


def test_with_trash_days_0_the_background_pass_purges_at_once(start_api):
    api: Api = start_api(workers=False, gallery={"trash_days": 0, "rescan_seconds": 1})
    name = "20260101_000000_gone_1.png"
    make_png(api.daemon.outputs_dir, name)
    assert api("DELETE", f"/api/outputs/{name}").status_code == 200
    wait_for(lambda: api("GET", "/api/trash").json() == {"trashed": []}, 10)
    assert not (api.daemon.outputs_dir / TRASH / name).exists()
    assert names(api("GET", "/api/outputs")) == []


def test_a_file_left_in_the_trash_without_its_row_is_adopted_and_purged(start_api):
    """A crash between the rename and the store's commit leaves a file in the trash that no
    row names: the next pass lists it there, and it is purged in its time."""
    api: Api = start_api(workers=False, gallery={"trash_days": 1})
    folder = api.daemon.outputs_dir
    make_png(folder / TRASH, "20260101_000000_orphan_1.png")
    index = api.daemon.gallery_index
    index.run_pass()
    (orphan,) = api("GET", "/api/trash").json()["trashed"]
    assert orphan["filename"] == "20260101_000000_orphan_1.png"
    real = index.clock
    index.clock = lambda: real() + 2 * DAY
    try:
        index.run_pass()
    finally:
        index.clock = real
    assert not (folder / TRASH / "20260101_000000_orphan_1.png").exists()
    assert api("GET", "/api/trash").json() == {"trashed": []}


def test_a_trash_folder_that_is_a_link_is_never_written_through(api: Api, tmp_path: Path):
    folder = api.daemon.outputs_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / TRASH).symlink_to(elsewhere, target_is_directory=True)
    make_png(folder, "20260101_000000_kept_1.png")
    error(api("DELETE", "/api/outputs/20260101_000000_kept_1.png"), 409)
    assert (folder / "20260101_000000_kept_1.png").is_file() and list(elsewhere.iterdir()) == []
    bulk = api("POST", "/api/outputs/delete", json={"files": ["20260101_000000_kept_1.png"]})
    (failed,) = bulk.json()["failed"]
    assert failed["status"] == 409 and "not a plain folder" in failed["error"]
    assert (folder / "20260101_000000_kept_1.png").is_file() and list(elsewhere.iterdir()) == []


# -- zip -----------------------------------------------------------------------------------------
def test_images_come_as_one_zip_stored_under_their_names(api: Api):
    folder = api.daemon.outputs_dir
    files = ["20260101_000000_a_1.png", "sub/20260102_000000_b_2.png"]
    for i, name in enumerate(files):
        make_png(folder, name, job_id=i)
    response = api("POST", "/api/outputs/zip", json={"files": files + [files[0]]})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="imagineerd-images.zip"'
    )
    assert int(response.headers["Content-Length"]) == len(response.content)
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.namelist() == files
    for info in archive.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        assert archive.read(info) == (folder / info.filename).read_bytes()
    assert archive.testzip() is None
    # Built in an unnamed temporary file: nothing is left behind.
    assert list((api.daemon.state_dir / "tmp").iterdir()) == []
    missing = error(
        api("POST", "/api/outputs/zip", json={"files": [files[0], "nope.png"]}), 404, "files"
    )
    assert "nope.png" in missing["error"]
    (folder / "20260103_000000_dds_3.png").write_bytes(DDS)
    error(api("POST", "/api/outputs/zip", json={"files": ["20260103_000000_dds_3.png"]}), 404)


# -- routes and guards ---------------------------------------------------------------------------
def test_the_literal_routes_come_before_image_names(api: Api):
    """delete, restore and zip are the bulk operations, whatever the order of the routes; an
    image in a folder of one of those names is still an image."""
    folder = api.daemon.outputs_dir
    make_png(folder, "delete/20260101_000000_in_delete_1.png")
    make_png(folder, "zip/20260102_000000_in_zip_2.png", job_id=2)
    api.daemon.gallery_index.reconcile()
    bulk = api("POST", "/api/outputs/delete", json={"files": ["nope.png"]})
    assert set(bulk.json()) == {"trashed", "missing", "failed", "purge_after"}
    assert set(api("POST", "/api/outputs/restore", json={"files": ["x.png"]}).json()) == {
        "restored",
        "missing",
        "conflicts",
        "failed",
    }
    for method in ("GET", "DELETE", "PATCH"):
        for route in ("delete", "restore", "zip"):
            error(api(method, f"/api/outputs/{route}", json={"favourite": True}), 405)
    image = api("GET", "/api/outputs/delete/20260101_000000_in_delete_1.png")
    assert image.status_code == 200 and image.content[:8] == outputs.PNG_SIGNATURE
    zipped = api("GET", "/api/outputs/zip/20260102_000000_in_zip_2.png")
    assert zipped.status_code == 200 and zipped.headers["Content-Type"] == "image/png"
    assert api("DELETE", "/api/outputs/delete/20260101_000000_in_delete_1.png").json()[
        "trashed"
    ] == ["delete/20260101_000000_in_delete_1.png"]
    assert (folder / TRASH / "delete" / "20260101_000000_in_delete_1.png").is_file()


def test_the_new_routes_are_guarded_as_the_others(start_api):
    api: Api = start_api(workers=False, server={"auth_token": "s3cret"})
    make_png(api.daemon.outputs_dir, "20260101_000000_a_1.png")
    name = "20260101_000000_a_1.png"
    routes = [
        ("GET", "/api/outputs", None),
        ("GET", "/api/trash", None),
        ("PATCH", f"/api/outputs/{name}", {"favourite": True}),
        ("DELETE", f"/api/outputs/{name}", None),
        ("POST", "/api/outputs/delete", {"files": [name]}),
        ("POST", "/api/outputs/restore", {"files": [name]}),
        ("POST", "/api/outputs/zip", {"files": [name]}),
    ]
    for method, path, body in routes:
        error(api(method, path, json=body), 401)
    good = {"Authorization": "Bearer s3cret"}
    for method, path, body in routes[2:]:
        # A page of another site may not change anything, token or not (as every write).
        other = {**good, "Origin": "http://evil.example"}
        error(api(method, path, json=body, headers=other), 403)
    # Writes say JSON (a bare DELETE excepted, as for jobs).
    error(api("POST", "/api/outputs/delete", data="files=a.png", headers=good), 415)
    error(api("PATCH", f"/api/outputs/{name}", data="favourite=1", headers=good), 415)
    assert api("GET", "/api/outputs", params={"token": "s3cret"}).status_code == 200
    zipped = api("POST", "/api/outputs/zip", json={"files": [name]}, headers=good)
    assert zipped.status_code == 200
    assert api("DELETE", f"/api/outputs/{name}", headers=good).status_code == 200
    assert len(api("GET", "/api/trash", headers=good).json()["trashed"]) == 1


def test_the_gallery_settings_are_read_only_over_the_api(api: Api):
    body = error(api("PATCH", "/api/config", json={"gallery": {"trash_days": 0}}), 403)
    assert body["field"] == "gallery.trash_days" and "gone for good" in body["error"]
    config = api("GET", "/api/config").json()
    assert config["gallery"] == {"trash_days": 7.0, "rescan_seconds": 600.0}
    assert api("PUT", "/api/config", json=config).status_code == 200  # unchanged: fine


# -- what a pass must never drop ----------------------------------------------------------------
def index_of(folder: Path, store: Store, node: str | None = None, **options) -> GalleryIndex:
    folder.mkdir(parents=True, exist_ok=True)
    return GalleryIndex(Gallery(folder, folder.parent / "thumbs"), store, node=node, **options)


def favourites(store: Store) -> list[str]:
    return sorted(r.path for r in store.list_outputs(OutputQuery(favourite=True), limit=100))


def scandir_failing(monkeypatch, failing: Callable[[str], OSError | None]) -> None:
    """``os.scandir`` raising what ``failing(path)`` gives (``None``: the real listing)."""
    real = os.scandir

    def scandir(path):
        exc = failing(os.fspath(path))
        if exc is not None:
            raise exc
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_pass_or_listing_stopped_half_way_drops_nothing_it_did_not_reach(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch
):
    folder = tmp_path / "outputs"
    files = [f"{d}/20260101_00000{i}_{d}_{i}.png" for i, d in enumerate("abc")] + ["top.png"]
    for i, name in enumerate(files):
        make_png(folder, name, job_id=i)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    for name in files:
        sqlite_store.set_favourite(name, True)
    real, calls, walking = os.scandir, [], [index]

    def scandir(path):
        calls.append(path)
        if len(calls) == 2:  # the daemon stops while the walk is in its second folder
            walking[0]._stopping.set()
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    index.reconcile()
    assert favourites(sqlite_store) == sorted(files)
    # A listing on a node just started (nothing read yet: it walks the whole folder), cut
    # short the same way.
    calls.clear()
    fresh = walking[0] = index_of(folder, sqlite_store)
    fresh.refresh()
    assert fresh._stopping.is_set() and len(calls) >= 2
    assert favourites(sqlite_store) == sorted(files)


def test_nodes_with_their_own_folders_keep_each_others_rows(store: Store, tmp_path: Path):
    """Two nodes of one queue, each with an outputs folder of its own: neither sees the
    other's images, and neither drops them; each drops its own once their file is gone."""
    one = index_of(tmp_path / "gpu-1" / "outputs", store, node="gpu-1")
    two = index_of(tmp_path / "gpu-2" / "outputs", store, node="gpu-2")
    a, b = "20260301_000000_on_one_1.png", "20260301_000001_on_two_2.png"
    one.write(one.root, lambda: make_png(one.root, a))
    two.write(two.root, lambda: make_png(two.root, b, job_id=2))
    store.set_favourite(a, True)
    store.set_favourite(b, True)
    for _ in range(2):
        two.reconcile()
        one.reconcile()
    assert favourites(store) == [a, b]
    assert {p: row.node for p, row in store.output_stats().items()} == {a: "gpu-1", b: "gpu-2"}
    third = "20260301_000002_third_3.png"
    make_png(one.root, third, job_id=3)
    one.reconcile()
    (one.root / a).unlink()
    two.reconcile()
    assert favourites(store) == [a, b]
    one.reconcile()
    assert favourites(store) == [b] and set(store.output_stats()) == {b, third}
    # The trash, and its purge, are each node's too: one node's purge leaves the other's
    # trashed row (its file is in the other node's folder) to that node.
    assert two.trash([b])[0] == [b]
    one.trash_days = 0
    one.reconcile()
    one.purge()
    assert [r.filename for r in store.trashed_outputs(limit=10)] == [b]
    assert (two.root / TRASH / b).is_file()


def test_in_a_shared_folder_a_row_of_a_node_gone_quiet_is_taken_over(store: Store, tmp_path):
    """With one folder for all, a row stays its node's while that node beats (no churn);
    one of a node gone quiet (or renamed) is taken over by a node that sees its file, which
    then drops it when the file goes."""
    folder = tmp_path / "outputs"
    live, old = "20260301_000000_live_1.png", "20260301_000001_old_2.png"
    make_png(folder, live)
    make_png(folder, old, job_id=2)
    index_of(folder, store, node="gpu-live").reconcile()
    store.heartbeat("gpu-live", {})
    store.put_outputs([replace(store.find_outputs([old])[old], node="gpu-renamed")])
    store.set_favourite(old, True)
    stays = "20260301_000002_stays_3.png"
    make_png(folder, stays, job_id=3)
    mine = index_of(folder, store, node="gpu-new")
    mine.reconcile()
    nodes = {p: row.node for p, row in store.output_stats().items()}
    assert nodes == {live: "gpu-live", old: "gpu-new", stays: "gpu-new"}
    assert favourites(store) == [old]  # taken over with its mark
    (folder / old).unlink()
    (folder / live).unlink()
    mine.reconcile()
    # The live node's row is the live node's to drop.
    assert set(store.output_stats()) == {live, stays}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.ESTALE])
def test_a_folder_that_cannot_be_read_keeps_its_rows(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch, code
):
    folder = tmp_path / "outputs"
    make_png(folder, "sub/deeper/20260101_000000_in_sub_1.png")
    make_png(folder, "20260102_000000_top_2.png", job_id=2)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    sqlite_store.set_favourite("sub/deeper/20260101_000000_in_sub_1.png", True)
    broken = {"on": True}
    scandir_failing(
        monkeypatch,
        lambda path: (
            OSError(code, os.strerror(code), path)
            if broken["on"] and path.endswith("/sub")
            else None
        ),
    )
    index.reconcile()
    index._next_refresh = 0.0
    index.refresh()
    assert favourites(sqlite_store) == ["sub/deeper/20260101_000000_in_sub_1.png"]
    broken["on"] = False
    index.reconcile()
    assert favourites(sqlite_store) == ["sub/deeper/20260101_000000_in_sub_1.png"]
    # Gone for real (the folder removed): dropped.
    (folder / "sub" / "deeper" / "20260101_000000_in_sub_1.png").unlink()
    os.rmdir(folder / "sub" / "deeper")
    os.rmdir(folder / "sub")
    index.reconcile()
    assert set(sqlite_store.output_stats()) == {"20260102_000000_top_2.png"}


def test_a_pass_where_the_outputs_folder_changed_file_system_drops_nothing(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch
):
    """A share unmounted under a daemon leaves the mount point (another file system) with
    what the daemon wrote there since: the pass that first sees it drops nothing."""
    from imagineerd import gallery_index

    folder = tmp_path / "outputs"
    kept = "20260101_000000_on_the_share_1.png"
    make_png(folder, kept)
    make_png(folder, "20260102_000000_also_2.png", job_id=2)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    sqlite_store.set_favourite(kept, True)
    (folder / kept).unlink()
    real = gallery_index._device
    monkeypatch.setattr(gallery_index, "_device", lambda root: real(root) + 1)
    index.reconcile()
    index._next_refresh = 0.0
    index.refresh()
    assert favourites(sqlite_store) == [kept]
    index.reconcile()  # the same file system as at the last pass: believed
    assert favourites(sqlite_store) == []


def test_an_empty_outputs_folder_is_believed_by_a_later_pass_not_by_a_listing(
    sqlite_store: SQLiteStore, tmp_path: Path
):
    folder = tmp_path / "outputs"
    make_png(folder, "20260101_000000_a_1.png")
    make_png(folder, "sub/20260102_000000_b_2.png", job_id=2)
    now = [1_000_000.0]
    index = index_of(folder, sqlite_store, clock=lambda: now[0])
    index.reconcile()
    sqlite_store.set_favourite("20260101_000000_a_1.png", True)
    away = tmp_path / "away"
    folder.rename(away)
    folder.mkdir()  # the empty mount point
    index.reconcile()
    now[0] += 1.0
    index.reconcile()  # a catch-up pass a second later
    assert len(sqlite_store.output_stats()) == 2
    now[0] += EMPTY_CONFIRM_SECONDS
    for _ in range(3):  # the page polls the gallery: a listing never confirms
        index._next_refresh = 0.0
        index.list(OutputQuery(), limit=10)
    assert len(sqlite_store.output_stats()) == 2
    folder.rmdir()
    away.rename(folder)  # mounted again
    index.reconcile()
    assert favourites(sqlite_store) == ["20260101_000000_a_1.png"]


@pytest.mark.parametrize("how", ["missing", "link", "unreadable", "empty"])
def test_a_trash_that_is_away_keeps_its_rows_and_when_they_were_trashed(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch, how
):
    folder = tmp_path / "outputs"
    make_png(folder, "20260101_000000_a_1.png")
    make_png(folder, "20260102_000000_b_2.png", job_id=2)
    now = [1_000_000.0]
    index = index_of(folder, sqlite_store, clock=lambda: now[0])
    index.reconcile()
    sqlite_store.set_favourite("20260101_000000_a_1.png", True)
    assert index.trash(["20260101_000000_a_1.png"])[0] == ["20260101_000000_a_1.png"]
    trash = folder / TRASH
    away = tmp_path / "trash-away"
    if how == "missing":
        trash.rename(away)
    elif how == "link":
        trash.rename(away)
        (tmp_path / "elsewhere").mkdir()
        trash.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    elif how == "unreadable":
        scandir_failing(
            monkeypatch,
            lambda path: (
                PermissionError(errno.EACCES, "denied", path) if path.endswith(TRASH) else None
            ),
        )
    else:  # an empty trash, as a fresh mount would show it
        trash.rename(away)
        trash.mkdir()
    now[0] += 60.0
    index.reconcile()
    index.reconcile()
    (row,) = sqlite_store.trashed_outputs(limit=10)
    assert (row.path, row.filename, row.trashed_at, row.favourite) == (
        ".trash/20260101_000000_a_1.png",
        "20260101_000000_a_1.png",
        1_000_000.0,
        True,
    )
    monkeypatch.undo()
    if how != "unreadable":
        if trash.is_symlink():
            trash.unlink()
        elif trash.exists():
            trash.rmdir()
        away.rename(trash)
    index.reconcile()
    (row,) = sqlite_store.trashed_outputs(limit=10)
    assert row.trashed_at == 1_000_000.0
    restored, _, _ = index.restore(["20260101_000000_a_1.png"])
    assert restored == ["20260101_000000_a_1.png"] and favourites(sqlite_store) == restored


def test_the_purge_never_deletes_an_image_restored_and_deleted_again(
    sqlite_store: SQLiteStore, tmp_path: Path
):
    folder = tmp_path / "outputs"
    name = "20260101_000000_undo_1.png"
    make_png(folder, name)
    now = [1000.0]
    index = index_of(folder, sqlite_store, clock=lambda: now[0], trash_days=1)
    index.reconcile()
    index.trash([name])  # trashed at t=1000
    now[0] += 2 * DAY  # due
    real = sqlite_store.trashed_outputs

    def due_then_undone(**query):
        rows = real(**query)
        if rows and not getattr(due_then_undone, "done", False):
            # After the purge read what is due: the image is restored (undo), and deleted
            # again, to the same trash path.
            due_then_undone.done = True
            assert index.restore([name])[0] == [name] and index.trash([name])[0] == [name]
        return rows

    sqlite_store.trashed_outputs = due_then_undone
    try:
        assert index.purge() == 0
    finally:
        sqlite_store.trashed_outputs = real
    assert (folder / TRASH / name).is_file()
    assert [r.trashed_at for r in sqlite_store.trashed_outputs(limit=10)] == [now[0]]
    assert index.restore([name])[0] == [name]


@pytest.mark.parametrize(
    "path",
    [
        ".trash/../20260101_000000_victim_1.png",
        ".trash/sub/../../20260101_000000_victim_1.png",
        ".trash",
        ".trash/",
        "20260101_000000_victim_1.png",
        ".trash//20260101_000000_victim_1.png",
        ".trash/./../20260101_000000_victim_1.png",
    ],
)
def test_the_purge_deletes_only_inside_the_trash(
    sqlite_store: SQLiteStore, tmp_path: Path, path: str
):
    folder = tmp_path / "outputs"
    victim = make_png(folder, "20260101_000000_victim_1.png")
    make_png(folder / TRASH, "sub/x.png")
    index = index_of(folder, sqlite_store, trash_days=0)
    sqlite_store.put_outputs([record(path, filename="victim.png", trashed_at=1.0)])
    index.purge()
    assert victim.is_file()
    with pytest.raises(OSError):
        index._delete_from_trash(path)
    assert victim.is_file()


def test_deleting_a_longest_name_twice_cuts_the_trash_name_to_fit(api: Api):
    folder = api.daemon.outputs_dir
    name = "x" * 251 + ".png"
    for _ in range(3):
        make_png(folder, name)
        api.daemon.gallery_index.reconcile()
        deleted = api("DELETE", f"/api/outputs/{name}")
        assert deleted.status_code == 200, deleted.text
    in_trash = sorted(p.name for p in (folder / TRASH).iterdir())
    assert in_trash == sorted([name, "x" * 249 + "-1.png", "x" * 249 + "-2.png"])
    assert all(len(n.encode()) <= 255 for n in in_trash)
    back = api("POST", "/api/outputs/restore", json={"files": [name]}).json()
    assert back["restored"] == [name] and (folder / name).is_file()


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        (errno.EXDEV, 409, "different file systems"),
        (errno.EACCES, 409, "permission denied"),
        (errno.EROFS, 409, "read-only"),
        (errno.ENAMETOOLONG, 409, "too long"),
        (errno.ENOSPC, 503, "no space left"),
        (errno.EIO, 503, "try again"),
    ],
)
def test_a_move_the_file_system_refuses_is_a_clear_error_and_nothing_moves(
    api: Api, monkeypatch, code, status, words
):
    from imagineerd import gallery_index

    folder, index = api.daemon.outputs_dir, api.daemon.gallery_index
    name, other = "sub/20260101_000000_a_1.png", "20260102_000000_b_2.png"
    make_png(folder, name)
    make_png(folder, other, job_id=2)
    index.reconcile()
    assert api("PATCH", f"/api/outputs/{name}", json={"favourite": True}).status_code == 200
    real = gallery_index._rename_noreplace

    def refusing(source, target):
        if "a_1" in str(source):
            raise OSError(code, os.strerror(code), str(source))
        return real(source, target)

    monkeypatch.setattr(gallery_index, "_rename_noreplace", refusing)
    body = error(api("DELETE", f"/api/outputs/{name}"), status)
    assert name in body["error"] and words in body["error"], body
    assert (folder / name).is_file() and not (folder / TRASH / "sub").exists()
    bulk = api("POST", "/api/outputs/delete", json={"files": [name, other]})
    assert bulk.status_code == 200, bulk.text
    (failed,) = bulk.json()["failed"]
    assert bulk.json()["trashed"] == [other] and bulk.json()["missing"] == []
    assert failed["filename"] == name and failed["status"] == status
    assert words in failed["error"]
    listed = api("GET", "/api/outputs").json()["outputs"]
    assert [(o["filename"], o["favourite"]) for o in listed] == [(name, True)]
    # Back out of the trash (to a folder that must be made again): refused the same way,
    # and the images stay in the trash.
    deep = "deep/20260103_000000_c_3.png"
    make_png(folder, deep, job_id=3)
    index.reconcile()
    assert index.trash([deep])[0] == [deep]
    os.rmdir(folder / "deep")

    def refusing_all(source, target):
        raise OSError(code, os.strerror(code), str(source))

    monkeypatch.setattr(gallery_index, "_rename_noreplace", refusing_all)
    back = api("POST", "/api/outputs/restore", json={"files": [other, deep]})
    assert back.status_code == 200, back.text
    assert back.json()["restored"] == [] and back.json()["conflicts"] == []
    assert [(f["filename"], f["status"]) for f in back.json()["failed"]] == [
        (other, status),
        (deep, status),
    ]
    assert all(words in f["error"] for f in back.json()["failed"])
    assert not (folder / "deep").exists()  # the folder made for it went again
    assert len(api("GET", "/api/trash").json()["trashed"]) == 2


def test_names_no_store_can_hold_are_missing_not_errors(store: Store, tmp_path: Path):
    index = index_of(tmp_path / "outputs", store)
    odd = ["\ud800.png", "a\x00.png", "x" * 5000 + ".png"]
    assert index.trash(odd)[:2] == ([], odd)
    assert index.restore(odd) == ([], odd, [])


def test_a_trash_folder_that_cannot_be_made_is_a_clear_error(api: Api, monkeypatch):
    folder = api.daemon.outputs_dir
    name = "sub/20260101_000000_a_1.png"
    make_png(folder, name)
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if TRASH in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    body = error(api("DELETE", f"/api/outputs/{name}"), 409)
    assert name in body["error"] and "permission denied" in body["error"]
    assert (folder / name).is_file() and names(api("GET", "/api/outputs")) == [name]


def test_restoring_keeps_the_favourite_when_the_trashed_row_went_meanwhile(
    store: Store, tmp_path: Path
):
    """In a shared folder another node's pass may drop or rewrite the trashed row between
    this node's look-up and its move: the image still comes back a favourite."""
    folder = tmp_path / "outputs"
    name = "20260101_000000_fav_1.png"
    make_png(folder, name)
    index = index_of(folder, store)
    index.reconcile()
    store.set_favourite(name, True)
    index.trash([name])
    real = store.find_outputs

    def then_dropped(*args, **kwargs):
        found = real(*args, **kwargs)
        store.drop_outputs([f".trash/{name}"])
        return found

    store.find_outputs = then_dropped
    try:
        assert index.restore([name])[0] == [name]
    finally:
        store.find_outputs = real
    assert favourites(store) == [name]


def test_an_image_written_through_a_linked_folder_is_not_indexed(
    sqlite_store: SQLiteStore, tmp_path: Path
):
    folder = tmp_path / "outputs"
    folder.mkdir()
    (tmp_path / "bigdisk").mkdir()
    (folder / "archive").symlink_to(tmp_path / "bigdisk", target_is_directory=True)
    index = index_of(folder, sqlite_store)
    index.write(folder / "archive", lambda: make_png(folder / "archive", "20260101_x_1.png"))
    index.write(folder / ".hidden", lambda: make_png(folder / ".hidden", "20260101_y_2.png"))
    index.write(folder, lambda: make_png(folder, "20260101_z_3.png"))
    assert set(sqlite_store.output_stats()) == {"20260101_z_3.png"}


def test_a_listing_and_a_delete_do_not_wait_for_the_walk_of_a_slow_share(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch
):
    folder = tmp_path / "outputs"
    for i in range(3):
        make_png(folder, f"d{i}/20260101_00000{i}_x_{i}.png", job_id=i)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    inside, release = threading.Event(), threading.Event()
    real = os.scandir

    def slow(path):
        if threading.current_thread().name == "slow-pass":
            inside.set()
            release.wait(20)
        return real(path)

    monkeypatch.setattr(os, "scandir", slow)
    walker = threading.Thread(target=index.reconcile, name="slow-pass")
    walker.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        index._next_refresh = 0.0
        assert len(in_thread(lambda: index.list(OutputQuery(), limit=5), timeout=5)) == 3
        assert in_thread(lambda: index.trash(["d0/20260101_000000_x_0.png"]), timeout=5)[0]
        assert time.monotonic() - started < 5
    finally:
        release.set()
        walker.join(20)
    assert set(sqlite_store.output_stats()) == {
        ".trash/d0/20260101_000000_x_0.png",
        "d1/20260101_000001_x_1.png",
        "d2/20260101_000002_x_2.png",
    }


def test_a_listing_within_the_second_looks_at_no_folder(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch
):
    from imagineerd import gallery_index

    folder = tmp_path / "outputs"
    for i in range(5):
        make_png(folder, f"d{i}/20260101_00000{i}_x_{i}.png", job_id=i)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    looked: list[str] = []
    real = gallery_index._mtime
    monkeypatch.setattr(gallery_index, "_mtime", lambda root, d: looked.append(d) or real(root, d))
    index.list(OutputQuery(), limit=10)
    assert looked  # the first looks at each folder read so far
    looked.clear()
    for _ in range(5):
        index.list(OutputQuery(), limit=10)
    assert looked == []


def test_a_zip_holds_each_image_once_by_its_normal_name(api: Api):
    folder = api.daemon.outputs_dir
    make_png(folder, "sub/20260101_000000_a_1.png")
    api.daemon.gallery_index.reconcile()
    asked = ["sub/20260101_000000_a_1.png", "sub\\20260101_000000_a_1.png"]
    response = api("POST", "/api/outputs/zip", json={"files": asked})
    assert response.status_code == 200, response.text
    assert zipfile.ZipFile(io.BytesIO(response.content)).namelist() == [
        "sub/20260101_000000_a_1.png"
    ]


def test_a_zip_too_large_is_a_413_naming_the_limit_and_what_to_leave_out(api: Api, monkeypatch):
    from imagineerd import gallery_index

    folder = api.daemon.outputs_dir
    files = [f"20260101_00000{i}_z_{i}.png" for i in range(3)]
    sizes = [make_png(folder, name, job_id=i).stat().st_size for i, name in enumerate(files)]
    monkeypatch.setattr(gallery_index, "MAX_ZIP_BYTES", sum(sizes) - 1)
    body = error(api("POST", "/api/outputs/zip", json={"files": files}), 413, "files")
    assert f"{sum(sizes) - 1:,} bytes" in body["error"], body
    assert "leave out at least 1 of them" in body["error"], body
    monkeypatch.setattr(gallery_index, "MAX_ZIP_BYTES", sum(sizes))
    assert api("POST", "/api/outputs/zip", json={"files": files}).status_code == 200


def test_at_most_two_zips_are_built_at_once(api: Api):
    make_png(api.daemon.outputs_dir, "20260101_000000_a_1.png")
    index = api.daemon.gallery_index
    assert index._zips.acquire(blocking=False) and index._zips.acquire(blocking=False)
    try:
        body = error(
            api("POST", "/api/outputs/zip", json={"files": ["20260101_000000_a_1.png"]}), 503
        )
        assert "busy" in body["error"] and "try again" in body["error"]
    finally:
        index._zips.release()
        index._zips.release()
    assert (
        api("POST", "/api/outputs/zip", json={"files": ["20260101_000000_a_1.png"]}).status_code
        == 200
    )


def test_an_image_deleted_and_restored_while_a_pass_walks_keeps_its_row(
    sqlite_store: SQLiteStore, tmp_path: Path, monkeypatch
):
    """The walk runs without the lock: an image in the trash while its folder was listed,
    and back by the time the pass compares, is not taken for gone."""
    folder = tmp_path / "outputs"
    name = "20260101_000000_undo_1.png"
    make_png(folder, name)
    make_png(folder, "20260102_000000_other_2.png", job_id=2)
    index = index_of(folder, sqlite_store)
    index.reconcile()
    sqlite_store.set_favourite(name, True)
    read, trashed, listed, restored = (threading.Event() for _ in range(4))
    real_stats, real_scandir = sqlite_store.output_stats, os.scandir

    def stats():
        found = real_stats()
        if threading.current_thread().name == "pass":
            read.set()
            assert trashed.wait(10)
        return found

    def scandir(path):
        entries = list(real_scandir(path))
        if threading.current_thread().name == "pass" and os.fspath(path) == str(folder):
            listed.set()
            assert restored.wait(10)
        return contextlib.nullcontext(iter(entries))

    monkeypatch.setattr(sqlite_store, "output_stats", stats)
    monkeypatch.setattr(os, "scandir", scandir)
    walker = threading.Thread(target=lambda: index.reconcile(), name="pass")
    walker.start()
    try:
        assert read.wait(10)
        assert index.trash([name])[0] == [name]
        trashed.set()
        assert listed.wait(10)
        assert index.restore([name])[0] == [name]
    finally:
        trashed.set()
        restored.set()
        walker.join(20)
    assert favourites(sqlite_store) == [name]
