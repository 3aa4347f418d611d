"""Loading a Stable Diffusion pipeline from what a user has: a diffusers folder, one
checkpoint file (``.safetensors``, or ``.ckpt`` with weights only), or a hub repo id; and a
VAE from one file.

Single files load offline: the configuration comes from ``model_configs`` (shipped for real
models, written for our tiny test models) and the tokenizers from ``clip_tokenizer``. A
``.ckpt`` is a pickle, which can run code when it is loaded: it is read with
``weights_only=True`` and refused when it holds anything but tensors and plain data.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..model_arch import checkpoint_arch, diffusers_arch, read_safetensors_header, tensor_shapes
from . import model_configs
from .clip_tokenizer import PAD_SD, PAD_SDXL_2, clip_tokenizer

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "If this machine cannot reach huggingface.co: put a .safetensors checkpoint into the "
    "models folder's checkpoints/ and set model.name in config.yaml to its name (or choose "
    "it per job), or download the model on a machine that can (`imagineerd pull REPO_ID`) "
    "and copy it over."
)

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "encoder.conv_in.weight"


def _refused(path: Path) -> BackendError:
    return BackendError(
        f"{path.name} was refused: it holds Python code besides its weights (a pickled "
        ".ckpt can run any program when it is loaded); use a .safetensors version of this "
        "model"
    )


def file_shapes(path: Path) -> dict[str, list[int] | None]:
    """Tensor names and shapes of a checkpoint file without reading its weights (a
    ``.ckpt`` is memory-mapped, with ``weights_only`` so no code in it runs)."""
    if path.suffix.lower() == ".safetensors":
        return tensor_shapes(read_safetensors_header(str(path)))[0]
    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("it holds no tensors by name")
    return {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def checkpoint_kind(path: Path) -> tuple[str, bool]:
    """``(arch, tiny)`` of a single-file checkpoint, from its tensor names and shapes."""
    shapes = file_shapes(path)
    arch = checkpoint_arch(shapes, {})
    if arch == "unknown":
        raise ValueError(
            "its tensors are not those of an SD1.5, SD2.x or SDXL checkpoint (a LoRA, VAE or "
            "embedding belongs in its own folder)"
        )
    width = shapes.get(UNET_IN)
    tiny = bool(width) and width[0] != model_configs.REAL_UNET_WIDTH
    return arch, tiny


def load_pipeline(
    name: str,
    *,
    arch_setting: str,
    dtype: Any,
    cache_dir: str | None,
    state_dir: str,
) -> tuple[Any, str]:
    """``(pipeline, arch)`` for a folder, a file or a hub repo id."""
    path = Path(name)
    try:
        if path.is_file():
            return _single_file(path, arch_setting, dtype, state_dir)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise BackendError(
                    f"model folder {path} has no model_index.json; a checkpoint is a diffusers "
                    "folder, a .safetensors/.ckpt file or a Hugging Face repo id"
                )
            arch = _arch(arch_setting, diffusers_arch(str(path)), name)
            return _pipeline_class(arch).from_pretrained(str(path), **_kwargs(arch, dtype)), arch
        if name.startswith(("/", ".", "~")) or name.endswith((".safetensors", ".ckpt")):
            raise BackendError(
                f"model file or folder {name} does not exist; fix model.name in config.yaml"
            )
        arch = _arch(arch_setting, "unknown", name)
        pipe = _pipeline_class(arch).from_pretrained(
            name, cache_dir=cache_dir or None, **_kwargs(arch, dtype)
        )
        return pipe, arch
    except BackendError:
        raise
    except Exception as exc:  # diffusers/hub/torch raise many types (OSError, HTTP, ...)
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        hint = "" if path.exists() else f" {OFFLINE_HINT}"
        shown = path.name if path.exists() else name
        raise BackendError(f"could not load model {shown!r}: {reason}.{hint}") from exc


def _arch(setting: str, found: str, name: str) -> str:
    if setting != "auto":
        return setting
    if found == "unknown":
        found = "sdxl" if "xl" in name.lower() else "sd15"  # a hub id: guessed by its name
    return found


def _pipeline_class(arch: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def _kwargs(arch: str, dtype: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if arch != "sdxl":
        # Like A1111 and ComfyUI, we do not run the NSFW safety checker.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def _single_file(path: Path, arch_setting: str, dtype: Any, state_dir: str) -> tuple[Any, str]:
    try:
        arch, tiny = checkpoint_kind(path)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(
            f"{path.name} is not a checkpoint that can be loaded: {exc} (is the file complete?)"
        ) from exc
    if arch_setting != "auto" and arch_setting != arch:
        log.warning("%s holds an %s model; model.arch says %s", path.name, arch, arch_setting)
    folder = model_configs.config_folder(arch, tiny=tiny, state_dir=state_dir)
    kwargs = _kwargs(arch, dtype)
    if arch == "sdxl":
        kwargs.update(tokenizer=clip_tokenizer(PAD_SD), tokenizer_2=clip_tokenizer(PAD_SDXL_2))
    else:  # SD2's OpenCLIP tokenizer pads with "!" (id 0), SD1.5's with its end token
        kwargs["tokenizer"] = clip_tokenizer(PAD_SDXL_2 if arch == "sd2" else PAD_SD)
    log.info("loading %s checkpoint %s (config %s)", arch, path.name, folder.name)
    try:
        pipe = _pipeline_class(arch).from_single_file(
            str(path), config=str(folder), local_files_only=True, **kwargs
        )
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(
            f"{path.name} could not be loaded: {reason} (the file may be damaged or truncated)"
        ) from exc
    return pipe, arch


def load_vae(path: Path, *, arch: str, dtype: Any, state_dir: str) -> Any:
    """An ``AutoencoderKL`` from one VAE file (original layout, with or without the
    ``first_stage_model.`` prefix of a whole checkpoint)."""
    from diffusers import AutoencoderKL

    try:
        shapes = file_shapes(path)
        width = shapes.get(VAE_IN) or shapes.get("first_stage_model." + VAE_IN)
        if not width:
            raise ValueError("it holds no VAE encoder")
        tiny = width[0] != 128  # the real SD VAEs start with 128 channels
        folder = model_configs.config_folder(
            "sd15" if arch == "sd2" else arch, tiny=tiny, state_dir=state_dir
        )
        return AutoencoderKL.from_single_file(
            str(path), config=str(folder), subfolder="vae", local_files_only=True, dtype=dtype
        )
    except BackendError:
        raise
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    except Exception as exc:
        raise BackendError(f"the VAE {path.name} could not be loaded: {exc}") from exc
