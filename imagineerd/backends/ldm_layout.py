"""diffusers' tensor names back to the original Stable Diffusion (LDM / SGM) layout.

Community checkpoints are single files in the layout of the code that trained the models
(``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``), not diffusers' folders.
``make-test-model PATH.safetensors`` writes its tiny random model in that layout, so the
loader that reads real checkpoints (diffusers' ``from_single_file``) is the code under test.
diffusers ships only the other direction, so this one is written here; a test proves that the
round trip gives back every tensor unchanged.

The mapping follows the structure of the two UNets: each of diffusers' down blocks holds
``layers_per_block`` resnets (and attentions) and one downsampler, which the original numbers
consecutively as ``input_blocks``; up blocks hold one layer more, numbered as
``output_blocks``; the VAE decoder's blocks run in the opposite order.
"""

from __future__ import annotations

import re
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: SD1.5's text encoder (transformers' CLIPTextModel, under its own names).
SD_TEXT_PREFIX = "cond_stage_model.transformer."
#: SDXL's two text encoders: CLIP ViT-L as in SD1.5, OpenCLIP ViT-bigG in OpenCLIP's names.
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _rename(rest: str, table: dict[str, str]) -> str:
    """``rest`` with its leading module name renamed by ``table`` (unchanged if not there)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original names (no prefix)."""
    per = config["layers_per_block"]
    has_attention = [
        "CrossAttn" in kind for kind in config["up_block_types"]
    ]  # which up blocks carry attentions (their upsampler sits one index further)
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        out[_unet_key(key, per, has_attention)] = tensor
    return out


def _unet_key(key: str, per: int, up_attention: list[bool]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = match.groups()
        index = int(block) * (per + 1) + int(layer) + 1
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block, rest = match.groups()
        return f"input_blocks.{(int(block) + 1) * (per + 1)}.0.op.{rest}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = match.groups()
        if kind == "resnets":
            return f"middle_block.{2 * int(layer)}.{_rename(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = match.groups()
        index = int(block) * (per + 1) + int(layer)
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block, rest = match.groups()
        index = int(block) * (per + 1) + per
        slot = 2 if up_attention[int(block)] else 1
        return f"output_blocks.{index}.{slot}.conv.{rest}"
    raise ValueError(f"no original name for the UNet tensor {key!r}")


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict in the original names (no prefix)."""
    blocks = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        new = _vae_key(key, blocks)
        if ".mid.attn_1." in new and new.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[new] = tensor
    return out


def _vae_key(key: str, blocks: int) -> str:
    part, _, rest = key.partition(".")  # encoder / decoder / quant_conv / post_quant_conv
    if part not in ("encoder", "decoder"):
        return key
    if match := re.match(r"(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        block, layer, tail = match.groups()
        block_id = int(block) if part == "encoder" else blocks - 1 - int(block)
        side = "down" if part == "encoder" else "up"
        return f"{part}.{side}.{block_id}.block.{layer}.{_resnet_vae(tail)}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        block, tail = match.groups()
        return f"{part}.down.{block}.downsample.{tail}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        block, tail = match.groups()
        return f"{part}.up.{blocks - 1 - int(block)}.upsample.{tail}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        layer, tail = match.groups()
        return f"{part}.mid.block_{int(layer) + 1}.{_resnet_vae(tail)}"
    if match := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.mid.attn_1.{_rename(match.group(1), _VAE_ATTENTION)}"
    return f"{part}.{_rename(rest, _VAE_TOP)}"


def _resnet_vae(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def clip_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """transformers' CLIPTextModel tensors as checkpoints carry them (``text_model.`` first;
    recent transformers leave it out of the model's own names)."""
    return {
        (key if key.startswith("text_model.") else f"text_model.{key}"): tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")
    }


def open_clip_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """transformers' CLIPTextModelWithProjection in OpenCLIP's names: fused q/k/v
    projections, ``resblocks``, a transposed text projection."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    out: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif match := re.match(r"encoder\.layers\.(\d+)\.(.+)", key):
            layer, rest = int(match.group(1)), match.group(2)
            layers.setdefault(layer, {})[rest] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for the text encoder tensor {key!r}")
    import torch

    for layer, parts in layers.items():
        base = f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[base + f"attn.in_proj_{kind}"] = torch.cat(
                [parts[f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[base + f"attn.out_proj.{kind}"] = parts[f"self_attn.out_proj.{kind}"]
            out[base + f"ln_1.{kind}"] = parts[f"layer_norm1.{kind}"]
            out[base + f"ln_2.{kind}"] = parts[f"layer_norm2.{kind}"]
            out[base + f"mlp.c_fc.{kind}"] = parts[f"mlp.fc1.{kind}"]
            out[base + f"mlp.c_proj.{kind}"] = parts[f"mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe: Any, arch: str) -> dict[str, Any]:
    """A whole SD1.5 or SDXL pipeline as one checkpoint's tensors."""
    state: dict[str, Any] = {}

    def add(prefix: str, tensors: dict[str, Any]) -> None:
        state.update({prefix + key: value for key, value in tensors.items()})

    add(UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    add(VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if arch == "sdxl":
        add(SDXL_TEXT_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
        add(SDXL_TEXT2_PREFIX, open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    else:
        add(SD_TEXT_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
    return {key: value.contiguous() for key, value in state.items()}
