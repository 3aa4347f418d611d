"""Tiny random-weight model *files* as the community shares them, for tests without weights.

``make-test-model PATH.safetensors`` writes a checkpoint in the original single-file layout
(``ldm_layout``); ``make-test-lora`` a LoRA in kohya's format (what Civitai LoRAs are);
``make-test-embedding`` a textual-inversion embedding in A1111's format; ``make-test-vae`` a
VAE as a single file. Each carries the metadata real files of its kind carry, so the models
listing tells their architecture the way it tells a real file's. The tiny architectures are
``testmodel``'s, with the real CLIP tokenizer's vocabulary (a single file has no tokenizer of
its own and the loader uses the real one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import ldm_layout
from .testmodel import ARCHS, build_test_pipeline, text_config, vae_config

#: kohya's ``ss_base_model_version`` and the SAI model spec's architecture, per arch.
KOHYA_BASE = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
SPEC_ARCH = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}


def _check(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def _save(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    elif path.suffix.lower() in (".ckpt", ".pt"):
        # The pickled layout of the original releases: weights under "state_dict".
        torch.save({"state_dict": tensors}, str(path))
    else:
        raise ValueError(f"{path.name}: the file name must end in .safetensors or .ckpt")
    return path


def make_test_checkpoint(path: str | Path, *, arch: str = "sd15", seed: int = 0) -> Path:
    """A tiny SD1.5/SDXL checkpoint in the original key layout, as one file."""
    _check(arch)
    pipe = build_test_pipeline(arch, seed=seed, real_tokenizer=True)
    return _save(ldm_layout.pipeline_to_ldm(pipe, arch), Path(path))


def _linear_modules(module: Any, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    import torch

    return [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names
    ]


def make_test_lora(
    path: str | Path, *, arch: str = "sd15", seed: int = 0, rank: int = 4, scale: float = 0.5
) -> Path:
    """A LoRA in kohya's format: ``lora_unet_*`` / ``lora_te*_*`` modules, each with
    ``lora_down``, ``lora_up`` and ``alpha``. The UNet's names are diffusers' module paths
    for SD1.5 and the original (SGM) block names for SDXL, as kohya's scripts write them.
    ``scale`` sizes the random weights so the LoRA visibly changes an image."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .testmodel import unet_config

    _check(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch, False))
        encoders = [CLIPTextModel(CLIPTextConfig(**text_config(False, real_tokenizer=True)))]
        if arch == "sdxl":
            encoders.append(
                CLIPTextModel(CLIPTextConfig(**text_config(False, big_g=True, real_tokenizer=True)))
            )
    tensors: dict[str, Any] = {}

    def add(name: str, layer: Any) -> None:
        down = torch.randn(rank, layer.in_features, generator=generator) * scale
        up = torch.randn(layer.out_features, rank, generator=generator) * scale
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))

    per, up_attention = (
        unet.config.layers_per_block,
        ["CrossAttn" in kind for kind in unet.config.up_block_types],
    )
    for name, layer in _linear_modules(unet, ("to_q", "to_k", "to_v", "0")):
        if ".attn" not in name:
            continue
        if arch == "sdxl":
            name = ldm_layout._unet_key(name + ".weight", per, up_attention)[: -len(".weight")]
        add("lora_unet_" + name.replace(".", "_"), layer)
    prefixes = ["lora_te"] if arch == "sd15" else ["lora_te1", "lora_te2"]
    for prefix, encoder in zip(prefixes, encoders, strict=True):
        for name, layer in _linear_modules(encoder, ("q_proj", "k_proj", "v_proj", "out_proj")):
            name = name if name.startswith("text_model.") else f"text_model.{name}"
            add(f"{prefix}_" + name.replace(".", "_"), layer)
    metadata = {"ss_base_model_version": KOHYA_BASE[arch], "ss_network_dim": str(rank)}
    return _save(tensors, Path(path), metadata)


def make_test_embedding(
    path: str | Path, *, arch: str = "sd15", seed: int = 0, vectors: int = 2
) -> Path:
    """A textual-inversion embedding as A1111 saves it: ``emb_params`` (SD1.5), or
    ``clip_l`` and ``clip_g`` (SDXL), ``vectors`` rows each."""
    import torch

    _check(arch)
    generator = torch.Generator().manual_seed(seed)
    width = text_config(False)["hidden_size"]
    if arch == "sd15":
        tensors = {"emb_params": torch.randn(vectors, width, generator=generator)}
    else:
        big_g = text_config(False, big_g=True)["hidden_size"]
        tensors = {
            "clip_l": torch.randn(vectors, width, generator=generator),
            "clip_g": torch.randn(vectors, big_g, generator=generator),
        }
    metadata = {"modelspec.architecture": f"{SPEC_ARCH[arch]}/textual-inversion"}
    return _save(tensors, Path(path), metadata)


def make_test_vae(path: str | Path, *, arch: str = "sd15", seed: int = 1) -> Path:
    """A VAE on its own, in the original names without a prefix (as VAE files are shared)."""
    import torch
    from diffusers import AutoencoderKL

    _check(arch)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(arch, False))
    tensors = ldm_layout.vae_to_ldm(vae.state_dict(), dict(vae.config))
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    metadata = {"modelspec.architecture": f"{SPEC_ARCH[arch]}/vae"}
    return _save(tensors, Path(path), metadata)
