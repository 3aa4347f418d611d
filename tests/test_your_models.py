"""Your own models end to end: single-file checkpoints, LoRAs, embeddings and VAEs from a
models folder, chosen per job, with A1111 prompt syntax, and their hashes in the PNGs.

Everything is real: tiny random-weight files in the community's formats (``model_files`` in
conftest.py), loaded by diffusers' single-file loader with the shipped configs, real
inference on the CPU, a real daemon behind a real HTTP server. Images are compared pixel by
pixel; "differs" means a mean difference of more than one level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagineerd import outputs
from imagineerd.backends import test_files
from imagineerd.backends.loading import checkpoint_kind, load_pipeline
from imagineerd.backends.testmodel import build_test_pipeline
from imagineerd.errors import BackendError
from imagineerd.model_scan import scan

from .conftest import Api, wait_for, write_config
from .test_http import assert_error


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def addnet(path: Path) -> str:
    """A1111's LoRA hash: the SHA-256 of a .safetensors file after its header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def pixels(path: Path) -> np.ndarray:
    with outputs.open_png(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 1.0


@pytest.fixture
def models_api(start_api, model_files: Path) -> Api:
    return start_api(paths={"models": str(model_files)}, model={"name": "alpha"})


def generate(api: Api, **job) -> tuple[dict, np.ndarray, dict]:
    """Run one job through the API: its record, its pixels and its PNG metadata."""
    job.setdefault("prompt", "a red fox")
    job.setdefault("seed", 5)
    response = api("POST", "/api/generate", json=job)
    assert response.status_code == 201, response.text
    body = api.wait_job(response.json()["id"])
    assert body["status"] == "completed", body
    path = api.daemon.config.base_dir / body["output_path"]
    return body, pixels(path), outputs.read_metadata(path)


def params(meta: dict) -> dict:
    return outputs.parse_infotext(meta["parameters"])


# -- the files themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_checkpoint_file_loads_back_every_tensor_unchanged(tmp_path, arch, suffix):
    """make-test-model writes the original single-file layout; diffusers' single-file loader
    with our shipped-offline configuration reads back exactly the pipeline that was built."""
    path = test_files.make_test_checkpoint(tmp_path / f"model{suffix}", arch=arch, seed=3)
    assert checkpoint_kind(path) == (arch, True)
    built = build_test_pipeline(arch, seed=3, real_tokenizer=True)
    pipe, found = load_pipeline(
        str(path), arch_setting="auto", dtype=torch.float32, cache_dir=None, state_dir=str(tmp_path)
    )
    assert found == arch
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for part in parts:
        want, got = getattr(built, part).state_dict(), getattr(pipe, part).state_dict()
        names = {k for k in want if not k.endswith("position_ids")}
        assert names == {k for k in got if not k.endswith("position_ids")}, part
        for name in names:
            assert torch.equal(want[name], got[name]), f"{part}: {name}"


def test_a_ckpt_holding_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, path)
    with pytest.raises(BackendError, match="evil.ckpt was refused: it holds Python code"):
        load_pipeline(
            str(path), arch_setting="auto", dtype=torch.float32, cache_dir=None, state_dir="."
        )
    assert not marker.exists()


def test_the_listing_tells_each_files_architecture(model_files):
    _, found = scan(model_files)
    archs = {(cat, m.name): m.arch for cat, items in found.items() for m in items}
    assert archs == {
        ("checkpoints", "alpha"): "sd15",
        ("checkpoints", "beta"): "sd15",
        ("checkpoints", "xl/gamma"): "sdxl",
        ("loras", "detail"): "sd15",
        ("loras", "xl-style"): "sdxl",
        ("embeddings", "shiny"): "sd15",
        ("embeddings", "glossy"): "sdxl",
        ("vaes", "soft"): "sd15",
        ("vaes", "xl-vae"): "sdxl",
    }


# -- jobs across models ---------------------------------------------------------------------
def test_two_checkpoints_a_lora_and_their_hashes_in_the_png(models_api, model_files):
    alpha, alpha_px, _ = generate(models_api)
    assert alpha["model"] == "alpha"  # the default, written out in the stored job
    beta, beta_px, beta_meta = generate(models_api, model="beta")
    assert differ(alpha_px, beta_px)
    info = params(beta_meta)
    checkpoint = model_files / "checkpoints" / "beta.safetensors"
    assert info["Model"] == "beta" and info["Model hash"] == sha256(checkpoint)[:10]
    assert info["Schedule type"] == "Uniform" and info["RNG"] == "CPU"

    _, tag_px, tag_meta = generate(models_api, model="beta", prompt="a red <lora:detail:0.8> fox")
    _, field_px, field_meta = generate(
        models_api, model="beta", loras=[{"name": "detail", "weight": 0.8}]
    )
    assert np.array_equal(tag_px, field_px) and differ(tag_px, beta_px)
    lora = addnet(model_files / "loras" / "detail.safetensors")[:12]
    assert params(tag_meta)["Lora hashes"] == params(field_meta)["Lora hashes"] == f"detail: {lora}"
    record = tag_meta["imagineerd"]
    assert record["prompt"] == "a red <lora:detail:0.8> fox"  # the tag stays in the record
    assert "a red <lora:detail:0.8> fox" in tag_meta["parameters"]
    assert str(model_files) not in json.dumps(record)  # no absolute paths in the chunk
    assert record["hashes"]["loras"]["detail"] == sha256(
        model_files / "loras" / "detail.safetensors"
    )

    _, weak_px, _ = generate(models_api, model="beta", loras=["detail:0.3"])
    assert differ(weak_px, field_px)


def test_sdxl_checkpoint_with_its_lora_vae_and_embedding(models_api, model_files):
    plain, plain_px, _ = generate(models_api, model="xl/gamma", prompt="a glossy fox")
    assert plain["model"] == "xl/gamma"
    _, styled_px, meta = generate(
        models_api, model="xl/gamma", prompt="a glossy fox", loras=["xl-style"], vae="xl-vae"
    )
    assert differ(plain_px, styled_px)
    info = params(meta)
    assert info["Model"] == "gamma" and info["VAE"] == "xl-vae.safetensors"
    assert info["VAE hash"] == sha256(model_files / "vae" / "xl-vae.safetensors")[:10]
    glossy = sha256(model_files / "embeddings" / "glossy.safetensors")[:12]
    assert info["TI hashes"] == f"glossy: {glossy}"


def test_emphasis_breaks_and_long_prompts_condition_as_a1111_does(models_api):
    _, plain, _ = generate(models_api, prompt="red fox")
    _, same, _ = generate(models_api, prompt="(red:1.0) fox")
    _, strong, _ = generate(models_api, prompt="(red:1.4) fox")
    assert np.array_equal(plain, same) and differ(plain, strong)
    words = ["cat", "dog", "fox", "owl", "sun"] * 20  # one CLIP token each: 100 tokens
    _, first_75, _ = generate(models_api, prompt=" ".join(words[:75]))
    _, all_100, _ = generate(models_api, prompt=" ".join(words))
    assert differ(first_75, all_100)  # the tokens past 75 are encoded, never cut
    _, broken, _ = generate(models_api, prompt="red BREAK fox")
    assert differ(plain, broken)


def test_clip_skip_vae_and_embeddings_change_the_image(
    models_api, model_files, start_api, tmp_path
):
    _, base, _ = generate(models_api, prompt="a shiny fox")
    _, skipped, skip_meta = generate(models_api, prompt="a shiny fox", clip_skip=2)
    assert differ(base, skipped) and params(skip_meta)["Clip skip"] == "2"
    _, soft, soft_meta = generate(models_api, prompt="a shiny fox", vae="soft")
    assert differ(base, soft) and params(soft_meta)["VAE"] == "soft.safetensors"
    shiny = sha256(model_files / "embeddings" / "shiny.safetensors")[:12]
    assert params(soft_meta)["TI hashes"] == f"shiny: {shiny}"
    # The same prompt where the folder has no such embedding: "shiny" is a plain word.
    bare = tmp_path / "bare"
    shutil.copytree(model_files, bare, copy_function=os.link)
    (bare / "embeddings" / "shiny.safetensors").unlink()
    # A daemon of its own (state and outputs apart), so no other worker takes its job.
    own = {"models": str(bare), "state": "state2", "outputs": "outputs2"}
    other = start_api(paths=own, model={"name": "alpha"})
    _, without, meta = generate(other, prompt="a shiny fox")
    assert differ(base, without) and "TI hashes" not in params(meta)


def test_a_pasted_imagineerd_chunk_runs_the_same_image_again(models_api):
    _, first, meta = generate(
        models_api, model="beta", loras=["detail:0.5"], clip_skip=2, vae="soft", seed=77
    )
    again = models_api("POST", "/api/generate", json=meta["imagineerd"])
    assert again.status_code == 201, again.text
    body = models_api.wait_job(again.json()["id"])
    assert body["status"] == "completed"
    assert np.array_equal(first, pixels(models_api.daemon.config.base_dir / body["output_path"]))


def test_jobs_batch_only_with_jobs_that_share_their_weights():
    from imagineerd.backends import BackendBase
    from imagineerd.jobs import JobSpec

    base = JobSpec("a fox", "", 1, 2, 64, 64, 7.0, "euler", "alpha", (("detail", 0.8),), 1, "soft")
    key = BackendBase().batch_key
    same = dataclasses.replace(base, prompt="an owl", seed=9)
    assert key(same) == key(base)
    tag = dataclasses.replace(base, prompt="an <lora:detail:0.8> owl", loras=())
    assert key(tag) == key(base)  # the same LoRA at the same weight, written as a tag
    for change in (
        {"model": "beta"},
        {"loras": (("detail", 0.5),)},
        {"loras": ()},
        {"vae": "default"},
        {"clip_skip": 2},
    ):
        assert key(dataclasses.replace(base, **change)) != key(base), change


def test_names_that_are_not_listed_rescan_the_folder_at_most_every_few_seconds(models_api):
    library = models_api.daemon.models
    scans: list[float] = []
    real = library.refresh
    library.refresh = lambda: (scans.append(1), real())[1]
    library._scanned_at = float("-inf")  # as if the last scan were long ago
    for _ in range(20):
        response = models_api("POST", "/api/generate", json={"prompt": "x", "model": "nope"})
        assert_error(response, 400)
    assert 1 <= len(scans) <= 2  # the first miss (and perhaps the watcher's pass), not twenty


def test_a_relative_model_name_in_config_is_the_default(start_api, tiny_model, tmp_path):
    """model.name as the Quick start writes it: a folder relative to config.yaml."""
    shutil.copytree(tiny_model, tmp_path / "local" / "tiny")
    api = start_api(model={"name": "local/tiny"})
    body, _, _ = generate(api)
    assert body["model"] == "local/tiny"
    assert api.daemon.workers[0].state()["models"]["loaded"] == [str(tmp_path / "local" / "tiny")]


def test_a_listed_checkpoint_wins_over_a_default_of_the_same_stem(start_api, model_files):
    """The default is a hub repo that cannot be fetched here and whose last part is the name
    of a listed checkpoint (what `imagineerd pull` writes): the listed one runs."""
    api = start_api(paths={"models": str(model_files)}, model={"name": "nobody/alpha"})
    body, _, meta = generate(api, model="alpha")
    alpha = sha256(model_files / "checkpoints" / "alpha.safetensors")[:10]
    assert body["model"] == "alpha" and params(meta)["Model hash"] == alpha
    health = api("GET", "/api/health").json()["backend"]
    assert health["state"] == "error" and "nobody/alpha" in health["error"]  # the banner's case


def test_the_empty_prompt_padding_follows_the_loras_in_use(start_api, model_files):
    """A long prompt is padded with the empty prompt's encoding, which LoRAs on the text
    encoder change: a job gives the same image whatever ran before it."""
    long_prompt = " ".join(["cat", "dog", "fox"] * 30)
    first = start_api(paths={"models": str(model_files)}, model={"name": "alpha"})
    generate(first, prompt=long_prompt)  # caches the padding without the LoRA
    _, after, _ = generate(first, prompt=long_prompt, loras=["detail"])
    own = {"models": str(model_files), "state": "state2", "outputs": "outputs2"}
    fresh = start_api(paths=own, model={"name": "alpha"})  # its own queue: no shared worker
    _, alone, _ = generate(fresh, prompt=long_prompt, loras=["detail"])
    assert np.array_equal(after, alone)


# -- the LRU of models ----------------------------------------------------------------------
def test_on_a_gpu_a_model_coming_back_from_memory_keeps_the_other_in_memory():
    """The LRU's bookkeeping with a GPU's two places (device and CPU memory). No GPU is here,
    so the pipelines are stand-ins that only record where they are moved."""
    from imagineerd.backends.diffusers_backend import DiffusersBackend

    class Pipe:
        def to(self, device):
            moves.append(device)

    class Model:
        def __init__(self):
            self.pipe, self.device, self.name = Pipe(), "cuda", "m"

        # Compiled graphs hold the weights' addresses: the model's compiling stops first.
        def pause_fast_path(self):
            moves.append("pause")

        def close(self):
            moves.append("close")

    moves: list[str] = []
    backend = DiffusersBackend.__new__(DiffusersBackend)
    backend.device, backend.max_loaded, backend.cpu_cache = "cuda", 1, 1
    backend._lock = __import__("threading").Lock()
    backend._models = {"a": Model(), "b": Model()}
    backend._models["b"].device = "cpu"  # a on the GPU, b waiting in memory
    backend._make_room(keep="b")  # b comes back: a goes to memory, nothing is dropped
    assert set(backend._models) == {"a", "b"} and backend._models["a"].device == "cpu"
    assert moves == ["pause", "cpu"]


@pytest.mark.parametrize(("cpu_cache", "disk_loads"), [(1, 2), (0, 4)])
def test_a_queue_alternating_two_models_keeps_its_order_and_reloads_only_without_a_cache(
    start_api, model_files, cpu_cache, disk_loads
):
    api = start_api(
        workers=False,
        paths={"models": str(model_files)},
        model={"name": "alpha", "cpu_cache": cpu_cache},
    )
    with api.daemon.events.subscribe() as events:
        ids = [api.daemon.submit({"prompt": "x", "model": m}).id for m in ("alpha", "beta") * 2]
        api.daemon.start()  # the worker starts now: it loads the default, then the queue
        for job_id in ids:
            wait_for(lambda job_id=job_id: api.daemon.job(job_id).finished, 120)
        seen = []
        while (event := events.get(timeout=0.2)) is not None:
            seen.append(event)
    jobs = [api.daemon.job(i) for i in ids]
    assert [j.status for j in jobs] == ["completed"] * 4
    started = [j.started_at for j in jobs]
    assert started == sorted(started)  # FIFO: a switch never reorders the queue
    loads = [e.data for e in seen if e.type == "model.loading" and e.data["from"] == "disk"]
    assert len(loads) == disk_loads
    assert sum(e.type == "model.ready" for e in seen) == len(loads)
    # On a CPU the cache allowance keeps both in memory; without it only the last stays.
    loaded = {c["name"] for c in api("GET", "/api/models").json()["checkpoints"] if c["loaded"]}
    assert loaded == ({"alpha", "beta"} if cpu_cache else {"beta"})
    health = api("GET", "/api/health").json()
    assert sorted(health["workers"][0]["models"]["loaded"]) == sorted(api.daemon.loaded_models())


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"model": "alpah"}, "model", "closest: alpha"),
        ({"model": "xl/gamma", "loras": ["detail"]}, "loras", "is for SD1.5"),
        ({"loras": [{"name": "detial", "weight": 1}]}, "loras", "closest: detail"),
        ({"prompt": "a <lora:nope:1> fox"}, "prompt", "no LoRA named 'nope'"),
        ({"vae": "xl-vae"}, "vae", "is for SDXL"),
        ({"prompt": "a <hypernet:x:1> fox"}, "prompt", "not supported"),
        ({"prompt": "a (fox:1.2.3)"}, "prompt", "prompt"),
        ({"loras": [{"name": "detail", "weight": 11}]}, "loras", "from -10 to 10"),
        ({"clip_skip": 13}, "clip_skip", "1 to 12"),
        ({"prompt": "a [cat:dog:0.5]"}, "prompt", "prompt editing"),
        ({"negative_prompt": "[blurry|sharp]"}, "negative_prompt", "prompt editing"),
    ],
)
def test_bad_model_choices_are_400_naming_the_field(models_api, job, field, words):
    job = {"prompt": "a fox", **job}
    response = models_api("POST", "/api/generate", json=job)
    body = assert_error(response, 400)
    assert words in body["error"] and field in body["error"], body
    assert models_api.daemon.store.counts()["queued"] == 0


def test_a_damaged_checkpoint_fails_its_jobs_by_name_and_the_daemon_serves_on(
    start_api, model_files, tmp_path
):
    folder = tmp_path / "models"
    shutil.copytree(model_files, folder, copy_function=os.link)
    good = (model_files / "checkpoints" / "beta.safetensors").read_bytes()
    (folder / "checkpoints" / "broken.safetensors").write_bytes(good[: len(good) // 2])
    api = start_api(paths={"models": str(folder)}, model={"name": "alpha"})
    response = api("POST", "/api/generate", json={"prompt": "x", "model": "broken"})
    failed = api.wait_job(response.json()["id"])
    assert failed["status"] == "failed" and "broken.safetensors" in failed["error"], failed
    body, _, _ = generate(api, model="beta")
    assert body["status"] == "completed"
    assert api("GET", "/api/health").json()["status"] == "ok"


# -- the other frontends --------------------------------------------------------------------
OFFLINE = """
import socket, sys

def refuse(*args, **kwargs):
    raise OSError("network used")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from imagineerd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def a1111_folder(model_files: Path, root: Path) -> Path:
    """``model_files`` laid out as an AUTOMATIC1111 webui folder (hard links)."""
    for source, target in (
        ("checkpoints", "models/Stable-diffusion"),
        ("loras", "models/Lora"),
        ("embeddings", "embeddings"),
        ("vae", "models/VAE"),
    ):
        shutil.copytree(model_files / source, root / target, copy_function=os.link)
    return root


def test_an_a1111_folder_works_from_the_command_line_with_no_network(tmp_path, model_files):
    """Every socket refused, no HF_HUB_OFFLINE: nothing in loading a checkpoint, a LoRA, an
    embedding and a VAE from an A1111 webui folder may reach for the network."""
    webui = a1111_folder(model_files, tmp_path / "stable-diffusion-webui")
    config = write_config(tmp_path, "alpha", paths={"models": str(webui)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE, "generate", "a shiny fox", "--config", str(config)]
        + ["--model", "beta", "--lora", "detail:0.7", "--vae", "soft", "--seed", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    meta = outputs.read_metadata(tmp_path / result.stdout.strip())
    assert meta["imagineerd"]["model"] == "beta"
    assert meta["imagineerd"]["loras"] == [{"name": "detail", "weight": 0.7}]
    info = params(meta)
    assert info["Lora hashes"].startswith("detail: ") and info["TI hashes"].startswith("shiny: ")
    assert info["VAE"] == "soft.safetensors"


def test_an_inbox_file_chooses_models_and_loras(make_config, model_files):
    from imagineerd.daemon import Daemon
    from imagineerd.inbox import Inbox

    config = make_config(
        paths={"models": str(model_files)},
        model={"name": "alpha"},
        inbox={"enabled": True, "settle_seconds": 0.3, "rescan_seconds": 1.0},
        presets={"portrait": {"model": "beta", "loras": ["detail:0.5"]}},
    )
    daemon = Daemon(config)
    daemon.start()
    box = Inbox(daemon, config)
    box.start()
    try:
        text = (
            "defaults: {model: beta, seed: 4}\n"
            "jobs:\n"
            "  - a fox <lora:detail:0.6>\n"
            "  - {prompt: an owl, model: xl/gamma, loras: [xl-style]}\n"
        )
        (box.root / "two.yaml").write_text(text)
        receipt = box.root / "done" / "two.result.yaml"
        wait_for(receipt.exists, 30)
        jobs = [wait_for(lambda i=i: daemon.job(i).finished and daemon.job(i), 120) for i in (1, 2)]
        assert [j.status for j in jobs] == ["completed", "completed"], [j.error for j in jobs]
        assert [j.spec.model for j in jobs] == ["beta", "xl/gamma"]
        assert jobs[1].spec.loras == (("xl-style", 1.0),)
        # A preset chooses them too, under the file's own values.
        (box.root / "portrait").mkdir()
        (box.root / "portrait" / "p.txt").write_text("a cat\n")
        wait_for((box.root / "done" / "p.result.yaml").exists, 30)
        job = wait_for(lambda: daemon.job(3).finished and daemon.job(3), 120)
        assert job.status == "completed", job.error
        assert (job.spec.model, job.spec.loras) == ("beta", (("detail", 0.5),))
        # A typo goes to failed/ with a note that names the field and the closest names.
        (box.root / "typo.yaml").write_text("prompt: x\nmodel: bta\n")
        note = box.root / "failed" / "typo.error.txt"
        wait_for(note.exists, 30)
        assert "closest: beta" in note.read_text()
    finally:
        box.stop()
        daemon.stop()
