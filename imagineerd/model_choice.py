"""The model files a job uses: its ``model``, LoRAs and VAE checked against the models folder
when it is submitted, and named by hash in its PNG when it is saved.

Names are checked at submit, so a typo is a 400 that names the field and the closest names,
never a job that fails minutes later; a LoRA or VAE made for another architecture than the
job's model is refused the same way (when both architectures are known).
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import lru_cache
from typing import Any

from .errors import ValidationError
from .jobs import JobSpec
from .model_scan import ModelFile
from .models import ModelLibrary
from .prompt_syntax import extract_networks

ARCH_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}


def label(name: str) -> str:
    """A name as PNG metadata shows it: the file's stem, never a path."""
    last = name.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt"):
        if last.lower().endswith(suffix):
            return last[: -len(suffix)]
    return last


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return "; closest: " + ", ".join(close)
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f"; available: {shown}"
    return "; the models folder has none (see GET /api/models)"


@lru_cache(maxsize=16)
def _default_arch(path: str) -> str:
    from .backends.diffusers_backend import detect_arch

    return detect_arch(path) if path else "unknown"


class ModelChoice:
    """Resolves and checks the model files of jobs against one ``ModelLibrary``.

    ``default`` is ``model.name`` as config.yaml says it; ``default_path`` what it stands for
    (a local path or a hub id) and is used to tell its architecture."""

    def __init__(self, library: ModelLibrary, default: str, default_path: str) -> None:
        self.library = library
        self.default = default
        self.default_path = default_path

    def is_default(self, name: str) -> bool:
        """Whether a job's ``model`` means the default: empty, ``model.name`` itself, or its
        stem (as a pasted record says it) when no listed checkpoint has that name."""
        if name in ("", self.default):
            return True
        return name == label(self.default) and (
            self.library.find("checkpoints", name, rescan=False) is None
        )

    def check(self, spec: JobSpec) -> JobSpec:
        """``spec`` with ``model`` resolved (the default written out, so the stored job says
        which model made it); ``ValidationError`` naming the field otherwise."""
        model, arch = self._model(spec.model)
        for name, _weight in spec.loras:
            self._other("loras", name, "loras", arch, model)
        for name, _weight in extract_networks(spec.prompt)[1]:
            self._other("loras", name, "prompt", arch, model)
        if spec.vae != "default":
            self._other("vaes", spec.vae, "vae", arch, model)
        return dataclasses.replace(spec, model=model)

    def _model(self, name: str) -> tuple[str, str]:
        if self.is_default(name):
            found = self.library.find("checkpoints", self.default, rescan=False)
            return self.default, found.arch if found else _default_arch(self.default_path)
        found = self.library.find("checkpoints", name)
        if found is None:
            names = self.library.names("checkpoints")
            raise ValidationError(
                f"model: no checkpoint named {name!r}{_closest(name, names)}", field="model"
            )
        return found.name, found.arch

    def _other(self, category: str, name: str, field: str, arch: str, model: str) -> ModelFile:
        kind = {"loras": "LoRA", "vaes": "VAE"}[category]
        found = self.library.find(category, name)
        if found is None:
            names = self.library.names(category)
            raise ValidationError(
                f"{field}: no {kind} named {name!r}{_closest(name, names)}", field=field
            )
        if "unknown" not in (found.arch, arch) and found.arch != arch:
            raise ValidationError(
                f"{field}: the {kind} {name!r} is for {ARCH_NAMES.get(found.arch, found.arch)} "
                f"and the model {label(model)!r} is {ARCH_NAMES.get(arch, arch)}; choose one "
                f"made for {ARCH_NAMES.get(arch, arch)}",
                field=field,
            )
        return found

    # -- PNG metadata ----------------------------------------------------------------------
    def infotext_fields(self, spec: JobSpec, embeddings: list[str]) -> dict[str, Any]:
        """What A1111 writes about the files a job used, in its words and order: ``Model
        hash`` (10 hex digits of the SHA-256), ``VAE hash``, ``VAE``, ``TI hashes`` (12 digits)
        and ``Lora hashes`` (12 digits of A1111's LoRA hash, which Civitai matches: the
        tensor data's SHA-256). A file that is gone or unreadable is left out."""
        fields: dict[str, Any] = {}
        digest = self._sha(self._checkpoint(spec))
        if digest:
            fields["Model hash"] = digest[:10]
        fields["Model"] = label(spec.model or self.default)
        if spec.vae != "default":
            vae = self.library.find("vaes", spec.vae, rescan=False)
            digest = self._sha(vae)
            if digest:
                fields["VAE hash"] = digest[:10]
            fields["VAE"] = (
                label(spec.vae) + ".safetensors" if vae is None else vae.path.rsplit("/", 1)[-1]
            )
        ti = [(name, self._sha(self._embedding(name))) for name in embeddings]
        if ti:
            fields["TI hashes"] = ", ".join(f"{n}: {d[:12]}" for n, d in ti if d)
        loras = [
            (name, self._sha(self.library.find("loras", name, rescan=False), lora=True))
            for name, _ in spec.active_loras()
        ]
        if loras:
            fields["Lora hashes"] = ", ".join(f"{label(n)}: {d[:12]}" for n, d in loras if d)
        return {key: value for key, value in fields.items() if value}

    def hashes(self, spec: JobSpec, embeddings: list[str]) -> dict[str, Any]:
        """The same as full SHA-256s for the ``imagineerd`` chunk (record only)."""
        result: dict[str, Any] = {}
        if digest := self._sha(self._checkpoint(spec)):
            result["model"] = digest
        loras = {
            name: self._sha(self.library.find("loras", name, rescan=False))
            for name, _ in spec.active_loras()
        }
        if any(loras.values()):
            result["loras"] = {k: v for k, v in loras.items() if v}
        if spec.vae != "default" and (
            digest := self._sha(self.library.find("vaes", spec.vae, rescan=False))
        ):
            result["vae"] = digest
        ti = {name: self._sha(self._embedding(name)) for name in embeddings}
        if any(ti.values()):
            result["embeddings"] = {k: v for k, v in ti.items() if v}
        return result

    def _checkpoint(self, spec: JobSpec) -> ModelFile | None:
        name = self.default if self.is_default(spec.model) else spec.model
        return self.library.find("checkpoints", name, rescan=False)

    def record_name(self, spec: JobSpec) -> str:
        """``model`` as the ``imagineerd`` chunk records it: the name a job may send back,
        never an absolute path (the default model's stem stands for it)."""
        name = spec.model or self.default
        return label(name) if name.startswith("/") else name

    def _embedding(self, word: str) -> ModelFile | None:
        return next(
            (m for m in self.library.files("embeddings") if m.name.rsplit("/", 1)[-1] == word),
            None,
        )

    def _sha(self, item: ModelFile | None, *, lora: bool = False) -> str | None:
        """The file's SHA-256 (for a LoRA in ``Lora hashes``: A1111's LoRA hash)."""
        if item is None:
            return None
        try:
            return self.library.lora_hash(item) if lora else self.library.sha256(item)
        except Exception:  # gone or unreadable since it was used: the PNG goes without it
            return None
