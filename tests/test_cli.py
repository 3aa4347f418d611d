"""The real ``imagineerd`` command in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from imagineerd import __version__, outputs
from imagineerd import config as config_mod
from imagineerd.cli import security_warnings

from .conftest import wait_for, write_config


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "imagineerd", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"imagineerd {__version__}"


def test_generate_prints_the_output_path(tmp_path: Path, tiny_model: Path):
    config = write_config(tmp_path, tiny_model)
    result = run(
        "generate",
        "a boat, at sea",
        "--seed",
        "9",
        "--steps",
        "3",
        "--scheduler",
        "DDIM",
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / result.stdout.strip()
    info = outputs.parse_infotext(outputs.read_metadata(path)["parameters"])
    assert (info["Seed"], info["Steps"], info["Sampler"]) == ("9", "3", "DDIM")


def test_generate_rejects_bad_values_naming_the_field(tmp_path: Path, tiny_model: Path):
    config = write_config(tmp_path, tiny_model)
    result = run("generate", "x", "--width", "100", "--config", str(config))
    assert result.returncode == 2
    assert "width must be divisible by 8" in result.stderr
    assert not list((tmp_path / "outputs").glob("*.png"))


def test_bad_config_refuses_to_start(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  port: many\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "server.port must be a whole number" in result.stderr


def test_make_test_model_writes_a_loadable_folder(tmp_path: Path):
    result = run("make-test-model", str(tmp_path / "m"), "--arch", "sdxl")
    assert result.returncode == 0, result.stderr
    assert "tiny sdxl test model" in result.stdout
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "text_encoder_2" / "model.safetensors").is_file()


def test_full_size_architectures_have_the_real_parameter_counts():
    """Counted on the meta device: no memory, no weights, but the real module tree."""
    import torch
    from diffusers import UNet2DConditionModel

    from imagineerd.backends.testmodel import unet_config

    counts = {}
    for arch in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(arch, full_size=True))
        counts[arch] = sum(p.numel() for p in unet.parameters())
    assert 855e6 < counts["sd15"] < 865e6  # SD1.5 UNet: 859.5M
    assert 2.55e9 < counts["sdxl"] < 2.58e9  # SDXL UNet: 2.567B


def test_a_port_in_use_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path, tiny_model: Path):
    config = write_config(tmp_path, tiny_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--config", str(config), "--port", str(port))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert f"port {port} is already in use" in errors[0] and "--port" in errors[0]


def test_token_prints_a_token_the_config_accepts(tmp_path: Path):
    first, second = run("token"), run("token")
    assert first.returncode == 0
    token = first.stdout.splitlines()[0]
    assert len(token) >= 40 and token != second.stdout.splitlines()[0]
    line = next(x for x in first.stdout.splitlines() if "auth_token:" in x)
    (tmp_path / "config.yaml").write_text("server:\n" + line + "\n")
    assert config_mod.load(tmp_path / "config.yaml")["server"]["auth_token"] == token


def test_serving_on_the_network_without_a_token_warns_at_start(tmp_path: Path, tiny_model):
    config = write_config(tmp_path, tiny_model, server={"host": "0.0.0.0"})
    log = tmp_path / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("IMAGINEERD_AUTH_TOKEN", None)
    with log.open("wb") as out:  # a file, not a pipe: nothing can fill up and block
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagineerd", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_for(lambda: "serving" in log.read_text(), 120, 0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    text = log.read_text()
    assert "WARNING" in text and "without a token" in text and "imagineerd token" in text
    assert security_warnings("127.0.0.1", "") == [] and security_warnings("::1", "") == []
    assert security_warnings("0.0.0.0", "s3cret") == []


def test_a_token_from_the_environment_obeys_the_token_rules(tmp_path: Path, tiny_model: Path):
    config = write_config(tmp_path, tiny_model)
    env = dict(os.environ, HF_HUB_OFFLINE="1", IMAGINEERD_AUTH_TOKEN="my token")
    result = subprocess.run(
        [sys.executable, "-m", "imagineerd", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "IMAGINEERD_AUTH_TOKEN may hold only printable ASCII" in result.stderr


def test_serve_against_an_unreachable_database_says_so_and_exits(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("queue:\n  database: postgresql://u:hidden@127.0.0.1:1/q\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "cannot reach the job database at 127.0.0.1:1/q" in result.stderr
    assert "queue.database" in result.stderr and "hidden" not in result.stderr
