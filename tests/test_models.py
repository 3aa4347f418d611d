"""Your own models: layouts, architecture from safetensors headers, hashes, hostile folders,
and /api/models. Real files in temp folders: tiny tensors whose names and shapes are those of
each architecture (the listing never looks at the weights)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from imagineerd import config as config_mod
from imagineerd.model_arch import SD15_KEY
from imagineerd.model_scan import find_checkpoint, scan
from imagineerd.models import ModelLibrary

from .conftest import wait_for
from .test_http import assert_error

SD15 = {
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768],
    SD15_KEY: [320, 768],
}
SD2 = {"cond_stage_model.model.ln_final.weight": [1024], SD15_KEY: [320, 1024]}
SDXL = {
    "conditioner.embedders.1.model.ln_final.weight": [1280],
    "model.diffusion_model.label_emb.0.0.weight": [4, 4],
}
LORA_SD15 = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 768],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [
        4,
        768,
    ],
}
LORA_SDXL = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 768],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 2048],
}
LORA_SDXL_UNET_ONLY = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 2048],
}
EMBEDDING_SD15 = {"emb_params": [2, 768]}
EMBEDDING_SDXL = {"clip_l": [2, 768], "clip_g": [2, 1280]}
VAE = {"encoder.conv_in.weight": [4, 3, 1, 1]}


def st(path: Path, tensors: dict[str, list[int]], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(shape, np.float16) for k, shape in tensors.items()}, path, metadata)
    return path


def listed(root: Path) -> dict[str, dict[str, str]]:
    """``{category: {name: arch}}`` of a scan."""
    _, found = scan(root)
    return {category: {m.name: m.arch for m in items} for category, items in found.items()}


# -- layouts --------------------------------------------------------------------------------


def test_our_own_layout_lists_every_kind_with_subfolders_in_names(tmp_path: Path):
    root = tmp_path / "models"
    st(root / "checkpoints" / "dreamshaper.safetensors", SD15)
    st(root / "checkpoints" / "sdxl" / "juggernaut.safetensors", SDXL)
    (root / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x04 not a real pickle")
    (root / "checkpoints" / "readme.txt").write_text("not a model")
    st(root / "loras" / "styles" / "ink.safetensors", LORA_SD15)
    st(root / "embeddings" / "easynegative.safetensors", EMBEDDING_SD15)
    (root / "embeddings" / "bad-hands.pt").write_bytes(b"pickle")
    st(
        root / "vae" / "sdxl_vae.safetensors",
        VAE,
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"},
    )
    layout, found = scan(root)
    assert layout == "own"
    assert [(m.name, m.format, m.arch) for m in found["checkpoints"]] == [
        ("dreamshaper", "safetensors", "sd15"),
        ("old", "ckpt", "unknown"),
        ("sdxl/juggernaut", "safetensors", "sdxl"),
    ]
    assert listed(root)["loras"] == {"styles/ink": "sd15"}
    assert listed(root)["embeddings"] == {"bad-hands": "unknown", "easynegative": "sd15"}
    assert listed(root)["vaes"] == {"sdxl_vae": "sdxl"}


def build_a1111(webui: Path) -> None:
    st(webui / "models" / "Stable-diffusion" / "sdxl" / "juggernaut.safetensors", SDXL)
    st(webui / "models" / "Lora" / "ink.safetensors", LORA_SDXL)
    st(webui / "embeddings" / "negative.safetensors", EMBEDDING_SDXL)
    st(webui / "models" / "VAE" / "vae-ft-mse.safetensors", VAE)
    (webui / "outputs" / "txt2img-images").mkdir(parents=True)


def build_comfyui(comfy: Path) -> None:
    st(comfy / "models" / "checkpoints" / "sdxl" / "juggernaut.safetensors", SDXL)
    st(comfy / "models" / "loras" / "ink.safetensors", LORA_SDXL)
    st(comfy / "models" / "embeddings" / "negative.safetensors", EMBEDDING_SDXL)
    st(comfy / "models" / "vae" / "vae-ft-mse.safetensors", VAE)


@pytest.mark.parametrize(
    ("build", "point_at", "layout"),
    [
        (build_a1111, "", "a1111"),
        (build_a1111, "models", "a1111-models"),
        (build_comfyui, "", "comfyui"),
        (build_comfyui, "models", "own"),  # ComfyUI's models/ folder is our own layout
    ],
)
def test_a1111_and_comfyui_folders_are_read_as_they_are(tmp_path, build, point_at, layout):
    build(tmp_path / "app")
    root = tmp_path / "app" / point_at
    assert scan(root)[0] == layout
    assert listed(root) == {
        "checkpoints": {"sdxl/juggernaut": "sdxl"},
        "loras": {"ink": "sdxl"},
        "embeddings": {"negative": "sdxl"},
        "vaes": {"vae-ft-mse": "unknown"},  # an SDXL VAE has the tensors of an SD1.5 one
    }


# -- architecture ---------------------------------------------------------------------------


def test_architecture_comes_from_tensor_names_and_shapes(tmp_path: Path, tiny_model: Path):
    root = tmp_path / "models"
    st(root / "checkpoints" / "a.safetensors", SD15)
    st(root / "checkpoints" / "b.safetensors", SDXL)
    st(root / "checkpoints" / "c.safetensors", SD2)
    st(root / "loras" / "a.safetensors", LORA_SD15)
    st(root / "loras" / "b.safetensors", LORA_SDXL)
    st(root / "loras" / "c.safetensors", LORA_SDXL_UNET_ONLY)
    st(root / "loras" / "d.safetensors", {"x": [1]}, {"ss_base_model_version": "sdxl_base_v1-0"})
    st(root / "embeddings" / "a.safetensors", EMBEDDING_SD15)
    st(root / "embeddings" / "b.safetensors", EMBEDDING_SDXL)
    shutil.copytree(tiny_model, root / "checkpoints" / "diffusers" / "tiny")
    xl = root / "checkpoints" / "diffusers" / "xl"
    xl.mkdir(parents=True)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    found = listed(root)
    assert found["checkpoints"] == {
        "a": "sd15",
        "b": "sdxl",
        "c": "sd2",
        "diffusers/tiny": "sd15",
        "diffusers/xl": "sdxl",
    }
    assert found["loras"] == {"a": "sd15", "b": "sdxl", "c": "sdxl", "d": "sdxl"}
    assert found["embeddings"] == {"a": "sd15", "b": "sdxl"}
    tiny = next(m for m in scan(root)[1]["checkpoints"] if m.name == "diffusers/tiny")
    assert tiny.format == "diffusers" and tiny.size and tiny.size > 0


def test_broken_safetensors_files_are_listed_as_unknown(tmp_path: Path):
    folder = tmp_path / "models" / "checkpoints"
    good = st(folder / "good.safetensors", SD15).read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[:40])
    (folder / "garbage.safetensors").write_bytes(os.urandom(4096))
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "huge-header.safetensors").write_bytes((2**63).to_bytes(8, "little") + b"{}")
    body = b"[" * 100_000
    (folder / "deep.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    body = b'["a list"]'
    (folder / "list.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    body = json.dumps({SD15_KEY: {"shape": "320x768"}, "__metadata__": [1]}).encode()
    (folder / "odd-shape.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    assert listed(tmp_path / "models")["checkpoints"] == {
        "good": "sd15",
        "truncated": "unknown",
        "garbage": "unknown",
        "empty": "unknown",
        "huge-header": "unknown",
        "deep": "unknown",
        "list": "unknown",
        "odd-shape": "unknown",
    }


def test_same_name_in_two_formats_keeps_both_and_names_resolve(tmp_path: Path):
    folder = tmp_path / "models" / "checkpoints"
    st(folder / "x.safetensors", SD15)
    (folder / "x.ckpt").write_bytes(b"pickle")
    assert set(listed(tmp_path / "models")["checkpoints"]) == {"x", "x.ckpt"}
    assert find_checkpoint(tmp_path / "models", "x") == folder / "x.safetensors"
    assert find_checkpoint(tmp_path / "models", "x.ckpt") == folder / "x.ckpt"
    for bad in ("../x", "/etc/passwd", "", "nothing", "..\\x"):
        assert find_checkpoint(tmp_path / "models", bad) is None


# -- a hostile folder -----------------------------------------------------------------------


def test_links_out_fifos_loops_and_depth_are_contained(tmp_path: Path):
    root = tmp_path / "models"
    folder = root / "checkpoints"
    st(folder / "real.safetensors", SD15)
    outside = st(tmp_path / "secret" / "outside.safetensors", SD15)
    (folder / "link-out.safetensors").symlink_to(outside)
    (folder / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    (folder / "link-in.safetensors").symlink_to(folder / "real.safetensors")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "dangling.safetensors").symlink_to(tmp_path / "gone")
    os.mkfifo(folder / "pipe.safetensors")
    (root / "loras").mkdir()
    os.mkfifo(root / "loras" / "p.safetensors")
    deep = folder
    for level in range(10):
        deep = deep / f"d{level}"
        st(deep / f"at{level + 1}.safetensors", SD15)
    result: dict = {}
    # A FIFO opened for reading blocks forever: the scan must finish regardless.
    thread = threading.Thread(target=lambda: result.update(found=listed(root)), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the scan blocked"
    names = set(result["found"]["checkpoints"])
    assert {"real", "link-in"} <= names
    assert not any("link-out" in n or "outside" in n or "pipe" in n for n in names)
    assert not any(n.startswith(("loop/", "dangling")) for n in names)
    assert "d0/d1/d2/d3/d4/d5/d6/d7/at8" in names  # eight levels of subfolders
    assert not any(n.endswith("at9") for n in names)
    assert result["found"]["loras"] == {}


def test_a_category_folder_linked_out_of_the_models_folder_is_not_read(tmp_path: Path):
    st(tmp_path / "elsewhere" / "x.safetensors", LORA_SD15)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "loras").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert listed(tmp_path / "models")["loras"] == {}
    # The models folder itself may be a link: everything inside it is then fine.
    st(tmp_path / "disk" / "loras" / "y.safetensors", LORA_SD15)
    (tmp_path / "linked-models").symlink_to(tmp_path / "disk", target_is_directory=True)
    assert listed(tmp_path / "linked-models")["loras"] == {"y": "sd15"}


# -- hashes ---------------------------------------------------------------------------------


def test_hashes_are_the_a1111_short_hash_computed_once_and_cached(tmp_path: Path):
    root, state = tmp_path / "models", tmp_path / "state"
    ckpt = st(root / "checkpoints" / "a.safetensors", SD15)
    lora = st(root / "loras" / "b.safetensors", LORA_SD15)
    library = ModelLibrary(root, state, loaded=str(ckpt))
    library.start()
    try:
        first = library.listing()
        assert first["checkpoints"][0]["loaded"] is True
        done = wait_for(
            lambda: (
                all(e["hash"] for c in ("checkpoints", "loras") for e in library.listing()[c])
                and library.listing()
            )
        )
        for path, entry in ((ckpt, done["checkpoints"][0]), (lora, done["loras"][0])):
            assert entry["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        assert library.hashes_computed == 2
        cache = state / "model-hashes.json"
        written = cache.stat().st_mtime_ns
        library.refresh()
        # What decides "computed once": after a rescan nothing is waiting to be hashed.
        assert library._pending() == []
        library._hash_wake.set()
        assert library.refresh()["loras"][0]["hash"] == done["loras"][0]["hash"]
        assert library.hashes_computed == 2 and cache.stat().st_mtime_ns == written
    finally:
        library.stop()
    # A new run reads the cache: the hashes are there before anything is hashed.
    again = ModelLibrary(root, state)
    assert again.listing()["loras"][0]["hash"] == done["loras"][0]["hash"]
    assert again.hashes_computed == 0
    # A changed file is hashed again; until then its hash is unknown.
    st(lora, LORA_SDXL)
    assert again.refresh()["loras"][0]["hash"] is None
    again.start()
    try:
        wait_for(lambda: again.listing()["loras"][0]["hash"])
        assert (
            again.listing()["loras"][0]["hash"]
            == hashlib.sha256(lora.read_bytes()).hexdigest()[:10]
        )
        assert again.hashes_computed == 1
    finally:
        again.stop()


def test_a_file_swapped_for_a_link_after_it_was_listed_is_never_hashed(tmp_path: Path):
    lora = st(tmp_path / "models" / "loras" / "a.safetensors", LORA_SD15)
    secret = st(tmp_path / "secret.safetensors", LORA_SDXL)
    library = ModelLibrary(tmp_path / "models", tmp_path / "state")
    (item,) = scan(tmp_path / "models")[1]["loras"]
    library.refresh()
    lora.unlink()
    lora.symlink_to(secret)
    with pytest.raises(ValueError, match="replaced"):
        library._hash(library._files["loras"][0])
    assert library.hashes_computed == 0 and item.real == str(lora)
    assert library.refresh()["loras"] == []  # and the next scan drops it


def test_a_damaged_hash_cache_is_ignored(tmp_path: Path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "model-hashes.json").write_text("{not json")
    st(tmp_path / "models" / "loras" / "a.safetensors", LORA_SD15)
    library = ModelLibrary(tmp_path / "models", tmp_path / "state")
    assert library.listing()["loras"][0]["hash"] is None


def test_the_watcher_picks_up_a_new_file_without_a_refresh(tmp_path: Path):
    root = tmp_path / "models"
    st(root / "loras" / "a.safetensors", LORA_SD15)
    library = ModelLibrary(root, tmp_path / "state", debounce=0.2)
    library.start()
    try:
        wait_for(lambda: library._observer is not None, 10)
        st(root / "loras" / "new" / "b.safetensors", LORA_SDXL)
        wait_for(lambda: len(library._files["loras"]) == 2, 10)
        assert [e["name"] for e in library.listing()["loras"]] == ["a", "new/b"]
        # A category folder made after start is watched too.
        st(root / "checkpoints" / "c.safetensors", SDXL)
        wait_for(lambda: library._files["checkpoints"], 10)
    finally:
        library.stop()


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        ("{models: outputs/models}", "published"),
        ("{models: outputs}", "published"),
        ("{models: inbox/models}", "overlap"),
        ("{models: inbox}", "overlap"),
        ("{inbox: models/drop}", "overlap"),
        ("{models: /}", "root of the filesystem"),
    ],
)
def test_a_models_folder_that_overlaps_badly_is_refused(tmp_path: Path, paths: str, words: str):
    (tmp_path / "config.yaml").write_text(f"paths: {paths}\n")
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(tmp_path / "config.yaml")
    assert info.value.field == "paths.models" and words in info.value.message


def test_a_listed_checkpoint_name_resolves_to_its_file(tmp_path: Path):
    build_a1111(tmp_path / "webui")
    (tmp_path / "config.yaml").write_text(
        "paths: {models: webui, outputs: webui/outputs}\nmodel: {name: sdxl/juggernaut}\n"
    )
    config = config_mod.load(tmp_path / "config.yaml")
    expected = (
        tmp_path / "webui" / "models" / "Stable-diffusion" / "sdxl" / "juggernaut.safetensors"
    )
    assert config.model_settings()["name"] == str(expected)


# -- HTTP -----------------------------------------------------------------------------------


def test_the_api_lists_models_and_refresh_finds_a_new_one(start_api, tmp_path: Path, tiny_model):
    st(tmp_path / "models" / "checkpoints" / "sdxl" / "juggernaut.safetensors", SDXL)
    api = start_api(workers=False)
    body = api("GET", "/api/models").json()
    assert set(body) == {"layout", "checkpoints", "loras", "embeddings", "vaes", "default"}
    assert body["default"] == str(tiny_model)
    entry = body["checkpoints"][0]
    assert entry["name"] == "sdxl/juggernaut" and entry["arch"] == "sdxl"
    assert entry["format"] == "safetensors" and entry["loaded"] is False
    assert (
        entry["size_bytes"]
        == (tmp_path / "models/checkpoints/sdxl/juggernaut.safetensors").stat().st_size
    )
    st(tmp_path / "models" / "loras" / "ink.safetensors", LORA_SD15)
    refreshed = api("POST", "/api/models/refresh", json={})
    assert refreshed.status_code == 200
    assert [e["name"] for e in refreshed.json()["loras"]] == ["ink"]
    # The watcher sees the next one without a refresh.
    st(tmp_path / "models" / "vae" / "v.safetensors", VAE)
    wait_for(lambda: api("GET", "/api/models").json()["vaes"], 15)
    # A state change needs the JSON content type (same-site rule), in the one error shape.
    plain = api("POST", "/api/models/refresh", data="x", headers={"Content-Type": "text/plain"})
    assert_error(plain, 415)
    assert_error(api("DELETE", "/api/models"), 405)


def test_the_api_needs_the_token_for_models(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret"})
    assert api("GET", "/api/models").status_code == 401
    assert api("POST", "/api/models/refresh", json={}).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert api("GET", "/api/models", headers=good).status_code == 200
