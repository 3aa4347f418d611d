"""The diffusers configurations a single-file checkpoint is loaded with, shipped offline.

A ``.safetensors`` checkpoint holds weights only. diffusers' ``from_single_file`` needs the
pipeline's configuration beside them (layer counts, widths, the noise schedule) and fetches it
from the Hugging Face hub unless it is given a local folder; machines without network cannot
fetch anything, so the folders for SD1.5, SD2.x (768-v) and SDXL ship in ``configs/`` next to
this module (a few KB each). They were written by :func:`write_config_folder` and checked
against the published models' configurations.

The tiny random-weight models of ``make-test-model`` have their own small architectures; their
folders are written on first use under the state folder from the same functions that build
those models, so tests load them through exactly the path real checkpoints take.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .testmodel import SCHEDULER_CONFIG, text_config, unet_config, vae_config

SHIPPED = Path(__file__).parent / "configs"

#: Architectures with a shipped folder (``sd2`` is SD 2.x 768-v: v-prediction).
ARCHS = ("sd15", "sd2", "sdxl")

#: The UNet's first convolution width tells a real model from our tiny test models.
REAL_UNET_WIDTH = 320


def config_folder(arch: str, *, tiny: bool, state_dir: str | Path) -> Path:
    """The folder to pass as ``from_single_file(config=...)``."""
    if not tiny:
        if arch not in ARCHS:
            raise ValueError(f"no configuration for architecture {arch!r}")
        return SHIPPED / arch
    folder = Path(state_dir) / "model-configs" / f"{arch}-tiny"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: two workers starting at once never see half a folder.
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        write_config_folder(temp, arch, full_size=False)
        try:
            os.rename(temp, folder)
        except OSError:  # another worker wrote it first
            shutil.rmtree(temp, ignore_errors=True)
    return folder


def _sd2_unet() -> dict[str, Any]:
    config = unet_config("sd15", True)
    config.update(
        sample_size=96,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    )
    return config


def _sd2_text() -> dict[str, Any]:
    # OpenCLIP ViT-H/14; SD2 takes the penultimate layer, so the last of 24 is left out.
    config = text_config(True)
    config.update(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        projection_dim=512,
        hidden_act="gelu",
    )
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_config_folder(folder: Path, arch: str, *, full_size: bool) -> None:
    """model_index.json and each component's configuration (no weights) for ``arch``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sdxl = arch == "sdxl"
    unet = _sd2_unet() if arch == "sd2" else unet_config("sdxl" if sdxl else "sd15", full_size)
    vae = vae_config("sdxl" if sdxl else "sd15", full_size)
    if arch == "sd2":
        vae["sample_size"] = 768
    # Built on the meta device (no memory for weights) so that the classes fill in every
    # default and the files read exactly as diffusers itself writes them.
    with torch.device("meta"):
        UNet2DConditionModel(**unet).save_config(folder / "unet")
        AutoencoderKL(**vae).save_config(folder / "vae")
    text = _sd2_text() if arch == "sd2" else text_config(full_size, real_tokenizer=True)
    _write_json(folder / "text_encoder" / "config.json", _clip_config(text, "CLIPTextModel"))
    # The published models' schedulers (PNDM/Euler) say this too; DDIM reads it, and its own
    # defaults (clip_sample=True) would give other images than the same seed elsewhere.
    scheduler = dict(
        SCHEDULER_CONFIG,
        _class_name="EulerDiscreteScheduler",
        clip_sample=False,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    if arch == "sd2":
        scheduler["prediction_type"] = "v_prediction"
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    if sdxl:
        big_g = text_config(full_size, big_g=True, real_tokenizer=True)
        _write_json(
            folder / "text_encoder_2" / "config.json",
            _clip_config(big_g, "CLIPTextModelWithProjection"),
        )
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    _write_json(folder / "model_index.json", index)


def _clip_config(values: dict[str, Any], architecture: str) -> dict[str, Any]:
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(**values)
    config.architectures = [architecture]
    return config.to_dict()


def text_width(folder: Path, component: str = "text_encoder") -> int:
    return int(json.loads((folder / component / "config.json").read_text())["hidden_size"])
