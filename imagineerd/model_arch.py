"""A model file's architecture, read without loading its weights.

The JSON header of a ``.safetensors`` file lists every tensor's name and shape: that tells
SD1.5, SD2.x and SDXL apart (the text encoders present, the width of cross-attention), for
checkpoints, LoRAs (kohya's key names) and embeddings alike. The header is bounded and
parsed by hand (a documented, simple format: an 8-byte length, then JSON), so a broken or
hostile file costs a few reads and reads as ``unknown``. A diffusers folder names its
pipeline in ``model_index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from .safefile import open_regular, read_regular_file

#: Real headers are a few MB at most; a bigger one is a broken or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

CROSS_ATTENTION_ARCH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def read_safetensors_header(path: str, expect: os.stat_result | None = None) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8 bytes little-endian length, then JSON. Parsed
    by hand (the format is that simple) so that nothing maps or reads the weights and the
    size is bounded before anything is read. Raises ``ValueError``/``OSError`` if malformed."""
    with open_regular(path) as handle:
        st = os.fstat(handle.fileno())
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise ValueError("the file was replaced while it was being listed")
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, st.st_size - 8):
            raise ValueError(f"header length {length} is impossible")
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("truncated header")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def tensor_shapes(header: dict[str, Any]) -> tuple[dict[str, list[int] | None], dict[str, str]]:
    shapes: dict[str, list[int] | None] = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        shape = value.get("shape") if isinstance(value, dict) else None
        ok = isinstance(shape, list) and all(isinstance(n, int) for n in shape)
        shapes[key] = shape if ok else None
    meta = header.get("__metadata__")
    metadata = (
        {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
    )
    return shapes, metadata


def _arch_from_metadata(metadata: dict[str, str]) -> str:
    """kohya's ``ss_base_model_version`` or the SAI model spec's architecture, if present."""
    text = metadata.get("modelspec.architecture", "") + metadata.get("ss_base_model_version", "")
    text = text.lower()
    if "xl" in text:
        return "sdxl"
    if "v2" in text or "sd_2" in text:
        return "sd2"
    if "v1" in text:
        return "sd15"
    return "unknown"


def checkpoint_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if any(
        k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb"))
        for k in shapes
    ):
        return "sdxl"
    width = shapes.get(SD15_KEY)
    if width and len(width) == 2 and width[1] in CROSS_ATTENTION_ARCH:
        return CROSS_ATTENTION_ARCH[width[1]]
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP ViT-H text encoder
    return _arch_from_metadata(metadata)


def lora_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        return "sdxl"
    for key, shape in shapes.items():
        # The down projection of a cross-attention key takes the text encoder's width.
        cross_key = "attn2" in key and "to_k" in key and ("down" in key or "lora_A" in key)
        if cross_key and shape and len(shape) == 2 and shape[1] in CROSS_ATTENTION_ARCH:
            return CROSS_ATTENTION_ARCH[shape[1]]
    return _arch_from_metadata(metadata)


def embedding_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if "clip_g" in shapes:
        return "sdxl"
    shape = shapes.get("emb_params")
    if shape and len(shape) == 2 and shape[1] in (768, 1024):
        return CROSS_ATTENTION_ARCH[shape[1]]
    return _arch_from_metadata(metadata)


ARCH_FROM_HEADER = {
    "checkpoints": checkpoint_arch,
    "loras": lora_arch,
    "embeddings": embedding_arch,
    # An SD1.5 and an SDXL VAE have the same tensors: only metadata can tell them apart.
    "vaes": lambda shapes, metadata: _arch_from_metadata(metadata),
}


def diffusers_arch(folder: str) -> str:
    """From model_index.json's pipeline class, and for SD1 vs SD2 the UNet's text width."""
    index = json.loads(read_regular_file(os.path.join(folder, "model_index.json"), 1 << 20))
    pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
    if not isinstance(pipeline, str) or not pipeline.startswith("StableDiffusion"):
        return "unknown"
    if "XL" in pipeline:
        return "sdxl"
    try:
        unet = json.loads(read_regular_file(os.path.join(folder, "unet", "config.json"), 1 << 20))
        width = unet.get("cross_attention_dim") if isinstance(unet, dict) else None
    except (OSError, ValueError):
        width = None
    return "sd2" if width == 1024 else "sd15"
