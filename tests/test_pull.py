"""``imagineerd pull`` against a fake Hugging Face hub.

huggingface.co cannot be reached from here, so a small ``http.server`` on 127.0.0.1 stands in
for it: it answers the requests huggingface_hub (the version in .venv) really makes, as read
from its code: ``GET /api/models/{repo}/revision/{rev}`` (repo info: ``sha`` and
``siblings``), ``GET /api/models/{repo}/tree/{rev}`` (the file list snapshot_download walks)
and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (with ``X-Repo-Commit``, ``ETag`` and
``Content-Length``), with the hub's ``X-Error-Code`` headers on errors. The command runs for
real in a subprocess with ``HF_ENDPOINT`` pointing at it, because huggingface_hub reads
``HF_ENDPOINT`` when it is imported. The repo it serves is a real tiny diffusers model
(``make_test_model``) dressed up like a real SD repo: fp16 variants, ``.bin`` pickles, Flax
and ONNX files, a safety checker and a single-file checkpoint beside the pipeline, all
garbage bytes, so loading the pulled folder proves that none of them was taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from imagineerd import cli
from imagineerd.model_scan import scan
from imagineerd.pull import PullError, _finish_pipeline, default_name, plan_pipeline

REPO = "test-org/tiny-sd15"
SHA = "0123456789abcdef0123456789abcdef01234567"


def safetensors_bytes(tensors: dict[str, list[float]]) -> bytes:
    """A valid little .safetensors file (F32 tensors), written by hand: no torch needed."""
    header, data = {}, b""
    for name, values in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [len(data)]}
        header[name]["data_offsets"].append(len(data) + len(raw))
        data += raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


class FakeHub:
    """The hub's model endpoints over a dict of repos: ``{repo_id: {path: bytes}}``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.forbidden_files: set[tuple[str, str]] = set()  # (repo, path): 403 on resolve
        self.understate_sizes = False  # siblings say 0 bytes, as if the hub's metadata lied
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass  # the test output stays readable

            def do_GET(self) -> None:
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self) -> set[str]:
        """The repo paths whose content was downloaded."""
        return {
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, path in self.requests
            if m == "GET" and "/resolve/" in path
        }

    @staticmethod
    def send(
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
        body: bool = True,
    ) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def error(self, handler: BaseHTTPRequestHandler, status: int, code: str, body: bool) -> None:
        message = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "Content-Type": "application/json", "X-Repo-Commit": SHA}
        self.send(handler, status, message, headers, body)

    def handle(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        if path.startswith("/api/models/"):
            owner, name, kind, rest = (path[len("/api/models/") :].split("/", 3) + [""] * 4)[:4]
            repo, rev = f"{owner}/{name}", rest.split("/")[0] or "main"  # no revision: main
            if repo not in self.repos:
                return self.error(handler, 404, "RepoNotFound", body)
            if rev not in ("main", SHA):
                return self.error(handler, 404, "RevisionNotFound", body)
            files = self.repos[repo]
            if kind in ("revision", ""):
                siblings = [
                    {
                        "rfilename": p,
                        "size": 0 if self.understate_sizes else len(data),
                        "blobId": hashlib.sha1(data).hexdigest(),
                    }
                    for p, data in sorted(files.items())
                ]
                info = {
                    "id": repo,
                    "sha": SHA,
                    "private": False,
                    "siblings": siblings,
                    "gated": "manual" if repo in self.gated else False,
                }
                return self.send(handler, 200, json.dumps(info).encode(), {}, body)
            if kind == "tree":
                folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
                tree = [
                    {"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders
                ]
                tree += [
                    {
                        "type": "file",
                        "path": p,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }
                    for p, data in sorted(files.items())
                ]
                return self.send(handler, 200, json.dumps(tree).encode(), {}, body)
            return self.error(handler, 404, "NotFound", body)
        parts = path.lstrip("/").split("/", 4)
        if len(parts) == 5 and parts[2] == "resolve":
            repo, rev, file_path = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
            if repo not in self.repos:
                return self.error(handler, 404, "RepoNotFound", body)
            if repo in self.gated:
                return self.error(handler, 401, "GatedRepo", body)
            if (repo, file_path) in self.forbidden_files:
                return self.send(handler, 403, b"forbidden", {"X-Repo-Commit": SHA}, body)
            if rev not in ("main", SHA):
                return self.error(handler, 404, "RevisionNotFound", body)
            if file_path not in self.repos[repo]:
                return self.error(handler, 404, "EntryNotFound", body)
            data = self.repos[repo][file_path]
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self.send(handler, 200, data, headers, body)
        return self.send(handler, 404, b"not found", {}, body)


def sd_repo(model: Path) -> dict[str, bytes]:
    """The tiny model's files laid out like stable-diffusion-v1-5/stable-diffusion-v1-5."""
    files = {
        p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()
    }
    index = json.loads(files["model_index.json"])
    # Real SD1.5 names a safety checker; the pull leaves it out and says so in the index.
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    files["model_index.json"] = json.dumps(index, indent=2).encode()
    # The VAE exists only as an fp16 variant: taken and renamed to the default names.
    files["vae/diffusion_pytorch_model.fp16.safetensors"] = files.pop(
        "vae/diffusion_pytorch_model.safetensors"
    )
    garbage = b"decoy, never to be downloaded " * 100
    for decoy in (
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.bin",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_flax_model.msgpack",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "vae/diffusion_pytorch_model.bin",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "safety_checker/pytorch_model.bin",
        "vae_decoder/config.json",
        "vae_decoder/model.onnx",
        "v1-5-pruned.ckpt",
        "v1-inference.yaml",
        "README.md",
        ".gitattributes",
    ):
        files[decoy] = garbage
    files["v1-5-pruned-emaonly.safetensors"] = safetensors_bytes({"x": [1.0, 2.0]})
    files["loras/detail.safetensors"] = safetensors_bytes({"lora_unet_down.alpha": [1.0]})
    return files


@pytest.fixture(scope="module")
def repo_files(tiny_model: Path) -> dict[str, bytes]:
    """The files of REPO, built once for the module."""
    return sd_repo(tiny_model)


@pytest.fixture
def hub(repo_files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A fake hub serving REPO, with its own request log; always shut down."""
    fake = FakeHub()
    fake.repos[REPO] = dict(repo_files)
    try:
        yield fake
    finally:
        fake.close()


def write_config(directory: Path, models: Path | None = None) -> Path:
    """A config.yaml whose paths.models is ``models`` (default: models/ beside it)."""
    path = directory / "config.yaml"
    paths = {"models": str(models or directory / "models")}
    path.write_text(yaml.safe_dump({"paths": paths, "inbox": {"enabled": False}}))
    return path


def pull(
    tmp_path: Path, *args: str, endpoint: str, models: Path | None = None, **env_vars: str
) -> subprocess.CompletedProcess:
    """``imagineerd pull ARGS`` in a subprocess talking to ``endpoint`` as its hub."""
    config = write_config(tmp_path, models)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),  # no token, no cache of the real user
        HF_HUB_OFFLINE="0",  # conftest sets it for the test process
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.update(env_vars)
    return subprocess.run(
        [sys.executable, "-m", "imagineerd.cli", "pull", *args, "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failed command's one ``imagineerd: error:`` line, last on stderr; nothing else
    there but huggingface_hub's progress bars (no traceback, no log lines)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("imagineerd: error: "), result.stderr
    assert all("%|" in line for line in lines[:-1]), result.stderr
    return lines[-1]


def nothing_left(models: Path) -> None:
    """No model listed, and no file or hidden download folder left under the models folder."""
    assert all(not entries for entries in scan(models)[1].values())
    if models.exists():
        assert [p for p in models.rglob("*") if p.is_file() or p.name.startswith(".")] == []


def test_a_pipeline_is_pulled_listed_and_loads_and_decoys_stay_on_the_hub(
    tmp_path: Path, hub: FakeHub, tiny_model: Path
):
    result = pull(tmp_path, REPO, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / "checkpoints" / "tiny-sd15"
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    # The tiny model's own files, nothing more: huggingface_hub's .cache metadata removed too.
    expected = {p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file()}
    assert written == expected
    vae, vae_fp16 = (
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    )
    assert hub.gets() == expected - {vae} | {vae_fp16}  # and not one decoy
    assert os.listdir(folder.parent) == ["tiny-sd15"]  # no hidden download folder left
    # The weights are the model's own, byte for byte (the VAE's under its default name).
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (folder / name).read_bytes() == (tiny_model / name).read_bytes()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]

    layout, found = scan(tmp_path / "models")
    [entry] = found["checkpoints"]
    assert (layout, entry.name, entry.format, entry.arch) == (
        "own",
        "tiny-sd15",
        "diffusers",
        "sd15",
    )
    assert "'tiny-sd15' (diffusers, arch sd15)" in result.stdout
    assert "model.name: tiny-sd15" in result.stdout
    assert "left out safety_checker" in result.stdout
    assert "Fetching 10 files" in result.stderr  # huggingface_hub's own progress bars

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.unet is not None and pipe.vae is not None and pipe.safety_checker is None


def test_a_single_file_lands_in_checkpoints_and_into_puts_one_in_loras(
    tmp_path: Path, hub: FakeHub, repo_files: dict[str, bytes]
):
    result = pull(
        tmp_path,
        f"{REPO}/v1-5-pruned-emaonly.safetensors",
        endpoint=hub.url,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr  # bars off: respected
    target = tmp_path / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    assert target.read_bytes() == repo_files["v1-5-pruned-emaonly.safetensors"]
    assert os.listdir(target.parent) == [target.name]  # the hidden download folder is gone
    assert hub.gets() == {"v1-5-pruned-emaonly.safetensors"}
    assert "model.name: v1-5-pruned-emaonly" in result.stdout

    result = pull(tmp_path, f"{REPO}/loras/detail.safetensors", "--into", "loras", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "loras" / "detail.safetensors").is_file()
    found = scan(tmp_path / "models")[1]
    assert [m.name for m in found["checkpoints"]] == ["v1-5-pruned-emaonly"]
    assert [m.name for m in found["loras"]] == ["detail"]
    assert "in loras as 'detail'" in result.stdout


def test_an_a1111_folder_gets_the_pipeline_in_its_stable_diffusion_folder(
    tmp_path: Path, hub: FakeHub
):
    webui = tmp_path / "webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    result = pull(tmp_path, REPO, endpoint=hub.url, models=webui)
    assert result.returncode == 0, result.stderr
    assert (webui / "models" / "Stable-diffusion" / "tiny-sd15" / "model_index.json").is_file()
    assert [m.name for m in scan(webui)[1]["checkpoints"]] == ["tiny-sd15"]


def test_an_existing_model_is_never_replaced(tmp_path: Path, hub: FakeHub):
    existing = tmp_path / "models" / "checkpoints" / "tiny-sd15"
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("keep me")
    line = one_error_line(pull(tmp_path, REPO, endpoint=hub.url))
    assert f"{existing} already exists" in line
    assert (existing / "mine.txt").read_text() == "keep me"
    assert os.listdir(existing.parent) == ["tiny-sd15"]
    assert hub.requests == []  # refused before asking the hub anything


def test_an_unreachable_hub_is_one_line_that_says_what_to_do_instead(tmp_path: Path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    line = one_error_line(pull(tmp_path, REPO, endpoint=closed))
    assert f"cannot reach the Hugging Face hub at {closed}" in line
    assert f"copy its folder into {tmp_path / 'models' / 'checkpoints'}" in line
    nothing_left(tmp_path / "models")


def test_offline_mode_in_the_environment_is_named(tmp_path: Path, hub: FakeHub):
    line = one_error_line(pull(tmp_path, REPO, endpoint=hub.url, HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set" in line and hub.requests == []


def test_an_unknown_repo_a_gated_repo_and_a_missing_file_are_clear(tmp_path: Path, hub: FakeHub):
    line = one_error_line(pull(tmp_path, "test-org/no-such-model", endpoint=hub.url))
    assert "no model repo test-org/no-such-model" in line and "HF_TOKEN" in line

    hub.repos["test-org/gated"] = dict(hub.repos[REPO])
    hub.gated.add("test-org/gated")
    line = one_error_line(pull(tmp_path, "test-org/gated", endpoint=hub.url))
    assert "test-org/gated is gated" in line
    assert "hf auth login" in line and "HF_TOKEN" in line

    line = one_error_line(pull(tmp_path, f"{REPO}/nope.safetensors", endpoint=hub.url))
    assert f"{REPO} has no file 'nope.safetensors'" in line
    assert "v1-5-pruned-emaonly.safetensors" in line  # what it does have

    line = one_error_line(pull(tmp_path, REPO, "--revision", "v9", endpoint=hub.url))
    assert "has no revision 'v9'" in line
    nothing_left(tmp_path / "models")


def test_a_failure_half_way_leaves_nothing_behind(tmp_path: Path, hub: FakeHub):
    # The other files download (in parallel); the UNet's weights are refused.
    hub.forbidden_files.add((REPO, "unet/diffusion_pytorch_model.safetensors"))
    line = one_error_line(pull(tmp_path, REPO, endpoint=hub.url))
    assert "refused access" in line and "HTTP 403" in line
    assert hub.gets()  # the download had started
    nothing_left(tmp_path / "models")  # the hidden folder with the finished files too


def test_a_repo_without_model_index_points_at_its_single_files(tmp_path: Path, hub: FakeHub):
    hub.repos["test-org/single"] = {"model.safetensors": safetensors_bytes({"x": [0.0]})}
    line = one_error_line(pull(tmp_path, "test-org/single", endpoint=hub.url))
    assert "no model_index.json" in line
    assert "imagineerd pull test-org/single/model.safetensors" in line


def test_not_enough_space_is_refused_before_downloading(tmp_path: Path, hub: FakeHub, tmpfs):
    small = tmpfs("small", "1m")  # the model is about 5 MB
    line = one_error_line(pull(tmp_path, REPO, endpoint=hub.url, models=small))
    assert "not enough space" in line and str(small) in line
    nothing_left(small)


def test_a_disk_that_fills_up_during_the_download_is_one_line(tmp_path: Path, hub: FakeHub, tmpfs):
    hub.understate_sizes = True  # the space check passes; the disk fills while writing
    small = tmpfs("small", "2m")
    line = one_error_line(pull(tmp_path, REPO, endpoint=hub.url, models=small))
    assert "no space left" in line and str(small / "checkpoints") in line
    nothing_left(small)


@pytest.mark.parametrize(
    "source",
    ["not a repo", "owner", "a--b/c", "https://huggingface.co/a/b", "a/../b", "x-/y"],
)
def test_a_bad_repo_id_is_one_line_without_touching_the_network(
    tmp_path: Path, capsys, source: str
):
    config = write_config(tmp_path)
    assert cli.main(["pull", source, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagineerd: error: ") and "OWNER/REPO" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("source", "into", "message"),
    [
        ("a/b/unet/config.json", None, "not a file the models listing shows"),
        ("a/b/x.pt", None, "not a file the models listing shows in checkpoints"),
        ("a/b", "loras", "is for one file"),
    ],
)
def test_what_cannot_be_listed_is_refused(tmp_path: Path, capsys, source, into, message):
    argv = ["pull", source, "--config", str(write_config(tmp_path))]
    assert cli.main(argv + (["--into", into] if into else [])) == 2
    assert message in capsys.readouterr().err


# The choice of files, on the file lists of real repos (no network needed).

SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/flax_model.msgpack",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_flax_model.msgpack",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_flax_model.msgpack",
]

SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_sd15_gets_one_set_of_safetensors_and_no_safety_checker():
    plan = plan_pipeline("sd", SD15_FILES, SD15_INDEX)
    assert sorted(plan.downloads) == sorted(
        [
            "model_index.json",
            "feature_extractor/preprocessor_config.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )
    assert plan.renames == {} and plan.skipped == ["safety_checker"] and plan.pickles == []


def test_a_sharded_fp16_only_component_is_renamed_to_the_default_names():
    files = [
        "model_index.json",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors.index.fp16.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/openvino_model.bin",
        "unet/openvino_model.xml",
        "unet/model.onnx",
    ]
    index = {
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "image_encoder": [None, None],
    }
    plan = plan_pipeline("xl", files, index)
    te2 = "text_encoder_2"
    assert plan.renames == {
        f"{te2}/model.safetensors.index.fp16.json": f"{te2}/model.safetensors.index.json",
        f"{te2}/model.fp16-00001-of-00002.safetensors": f"{te2}/model-00001-of-00002.safetensors",
        f"{te2}/model.fp16-00002-of-00002.safetensors": f"{te2}/model-00002-of-00002.safetensors",
    }
    # No safetensors for the UNet: its .bin is the only thing diffusers could load.
    assert "unet/diffusion_pytorch_model.bin" in plan.downloads
    assert "unet/openvino_model.bin" not in plan.downloads and plan.pickles == ["unet"]
    assert default_name("diffusion_pytorch_model.fp16.safetensors") == (
        "diffusion_pytorch_model.safetensors"
    )


def test_renamed_shards_are_what_the_renamed_index_names(tmp_path: Path):
    files = [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
    ]
    index = {"text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": ["a", "B"]}
    plan = plan_pipeline("r", files, index)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    weight_map = {"a": "model.fp16-00001-of-00002.safetensors"}
    weight_map["b"] = "model.fp16-00002-of-00002.safetensors"
    (tmp_path / files[2]).write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)

    _finish_pipeline(tmp_path, plan)
    folder = tmp_path / "text_encoder"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    renamed = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(renamed["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert json.loads((tmp_path / "model_index.json").read_text())["safety_checker"] == [
        None,
        None,
    ]
    assert not (tmp_path / ".cache").exists()


def test_a_sharded_default_set_is_taken_whole_and_its_fp16_shards_left():
    unet = [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    files = ["model_index.json"] + [f"unet/{name}" for name in unet]
    plan = plan_pipeline("r", files, {"unet": ["diffusers", "UNet2DConditionModel"]})
    assert sorted(plan.downloads) == sorted(
        ["model_index.json"] + [f"unet/{name}" for name in unet[:4]]
    )
    assert plan.renames == {}


def test_a_component_without_folder_or_weights_is_refused_before_downloading():
    with pytest.raises(PullError, match="no unet/ folder"):
        plan_pipeline("r", ["model_index.json"], {"unet": ["diffusers", "UNet2DConditionModel"]})
    files = ["model_index.json", "unet/config.json", "unet/diffusion_flax_model.msgpack"]
    with pytest.raises(PullError, match="no weights diffusers can load"):
        plan_pipeline("r", files, {"unet": ["diffusers", "UNet2DConditionModel"]})
