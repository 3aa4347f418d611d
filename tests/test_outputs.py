from __future__ import annotations

import json
import stat
from datetime import datetime
from pathlib import Path

from PIL import Image

from imagineerd import outputs

from .conftest import record_fsyncs


def test_names_are_dated_slugged_and_unique_per_job():
    when = datetime(2025, 10, 13, 14, 39, 30)
    name = outputs.output_name(7, "A beautiful Landscape!", when)
    assert name == "20251013_143930_a_beautiful_landscape_7.png"
    assert outputs.output_name(8, "A beautiful Landscape!", when).lower() != name.lower()
    assert outputs.slugify("Ünïcödé ☃ / ../etc") == "unicode_etc"
    assert outputs.slugify("☃☃") == "image"
    assert len(outputs.slugify("word " * 100)) <= 48


def test_infotext_grammar_matches_a1111():
    params = {
        "Steps": 30,
        "Sampler": "Euler",
        "CFG scale": 7.5,
        "Seed": 42,
        "Size": "512x512",
        "Model": "stable-diffusion-v1-5",
    }
    text = outputs.infotext("a cat", "", params)
    assert text == (
        "a cat\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, "
        "Size: 512x512, Model: stable-diffusion-v1-5"
    )
    text = outputs.infotext("a, b", "ugly, blurry", dict(params, Model='my: "model", v2'))
    lines = text.split("\n")
    assert lines[1] == "Negative prompt: ugly, blurry"
    assert lines[2].endswith('Model: "my: \\"model\\", v2"')


def test_infotext_round_trips_through_the_a1111_parser():
    params = {
        "Steps": 4,
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": 7.0,
        "Seed": 1,
        "Size": "64x64",
        "Model": "a,b:c\nd",
    }
    text = outputs.infotext("multi\nline prompt", "neg", params)
    parsed = outputs.parse_infotext(text)
    assert parsed["prompt"] == "multi\nline prompt"
    assert parsed["negative_prompt"] == "neg"
    assert parsed["Sampler"] == "DPM++ 2M Karras" and parsed["Model"] == "a,b:c\nd"
    assert parsed["Steps"] == "4" and parsed["Size"] == "64x64"


def test_save_is_atomic_and_carries_both_chunks(tmp_path: Path):
    image = Image.new("RGB", (8, 8), "red")
    path = outputs.save_png(
        image,
        tmp_path,
        "x_1.png",
        {"parameters": "p\nSteps: 1", "imagineerd": json.dumps({"id": 1})},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["x_1.png"]
    meta = outputs.read_metadata(path)
    assert meta["parameters"] == "p\nSteps: 1" and meta["imagineerd"] == {"id": 1}
    assert outputs.find_output_for_job(tmp_path, 1) == path
    assert outputs.find_output_for_job(tmp_path, 11) is None


def test_partial_files_are_removed(tmp_path: Path):
    (tmp_path / f"{outputs.TEMP_PREFIX}abc.png.tmp").write_bytes(b"\x89PNG half")
    (tmp_path / "keep.png").write_bytes(b"x")
    removed = outputs.remove_partial_files(tmp_path)
    assert len(removed) == 1 and [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_unicode_prompt_survives_in_png_text(tmp_path: Path):
    prompt = "猫, ☃ café"
    text = outputs.infotext(prompt, "", {"Steps": 1, "Seed": 2, "Size": "8x8"})
    path = outputs.save_png(Image.new("RGB", (8, 8)), tmp_path, "u_1.png", {"parameters": text})
    assert outputs.parse_infotext(outputs.read_metadata(path)["parameters"])["prompt"] == prompt


def test_an_image_is_durable_after_a_power_cut_its_folder_is_fsynced(tmp_path: Path, monkeypatch):
    """The PNG's own fsync covers its bytes; the rename into place needs the folder's."""
    synced = record_fsyncs(monkeypatch)
    path = outputs.save_png(Image.new("RGB", (8, 8)), tmp_path, "x.png", {"parameters": "p"})
    folder = tmp_path.stat()
    assert [stat.S_ISDIR(s.st_mode) for s in synced] == [False, True]  # the file, then its folder
    assert (synced[1].st_dev, synced[1].st_ino) == (folder.st_dev, folder.st_ino)
    assert path.exists()
