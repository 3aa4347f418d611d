"""Textual-inversion embeddings: the files A1111 and Civitai share, read for one model.

A1111 uses an embedding wherever its file name appears in a prompt. Its file holds one or
more vectors per text encoder: ``emb_params`` (SD1.5, SD2; also ``string_to_param["*"]`` in
the older ``.pt`` layout) or ``clip_l`` and ``clip_g`` (SDXL). An embedding whose width does not
match the model's text encoders was made for another architecture and is not used, as in
A1111. Only names that occur in a prompt are read, so a folder of thousands costs nothing;
the vectors are cached by path, size and modification time.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Vector sets kept in memory (each a few KB).
MAX_CACHED = 256


def read_embedding(path: Path) -> dict[str, Any]:
    """The tensors of an embedding file, by A1111's key names; never runs code."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data: Any = load_file(str(path))
    else:
        import torch

        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError("it holds Python code besides its vectors; refused") from exc
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = data["string_to_param"]
        data = {"emb_params": next(iter(params.values()))} if params else {}
    if not isinstance(data, dict):
        raise ValueError("it holds no named vectors")
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


def vectors_for(tensors: dict[str, Any], widths: list[int]) -> list[Any] | None:
    """One ``[n, width]`` tensor per text encoder, or None when the file is for another
    architecture."""
    if len(widths) == 2:
        chosen = [tensors.get("clip_l"), tensors.get("clip_g")]
    else:
        chosen = [tensors.get("emb_params", tensors.get("clip_l"))]
    result = []
    for tensor, width in zip(chosen, widths, strict=True):
        if tensor is None:
            return None
        tensor = tensor.reshape(-1, tensor.shape[-1])
        if tensor.shape[-1] != width:
            return None
        result.append(tensor.float())
    if len({t.shape[0] for t in result}) != 1:
        return None
    return result


class EmbeddingCache:
    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, int, int, tuple[int, ...]], list[Any] | None] = (
            OrderedDict()
        )

    def for_model(self, model: Any, library: Any, text: str) -> dict[str, list[Any]]:
        """``{name: vectors}`` for the embeddings whose names appear in ``text`` (the
        chunker then places them exactly where their tokens are)."""
        if library is None or not text:
            return {}
        lowered = text.lower()
        widths = [int(e.get_input_embeddings().weight.shape[-1]) for e in model.encoder.encoders]
        found: dict[str, list[Any]] = {}
        for item in library.files("embeddings"):
            word = item.name.rsplit("/", 1)[-1]
            if word.lower() not in lowered or not re.search(
                rf"(?<![\w]){re.escape(word.lower())}(?![\w])", lowered
            ):
                continue
            vectors = self._load(item, widths)
            if vectors is not None:
                found[word] = vectors
        return found

    def _load(self, item: Any, widths: list[int]) -> list[Any] | None:
        key = (item.real, item.size or 0, item.mtime_ns, tuple(widths))
        if key not in self._cache:
            try:
                st = os.stat(item.real)
                if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
                    raise ValueError("it changed since it was listed")
                vectors = vectors_for(read_embedding(Path(item.real)), widths)
                if vectors is None:
                    log.info("embedding %s is for another architecture; not used", item.name)
            except Exception as exc:  # a broken file only loses its own embedding
                log.warning("embedding %s cannot be read: %s", item.name, exc)
                vectors = None
            self._cache[key] = vectors
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]
