"""Prompts to text-encoder conditioning the way AUTOMATIC1111 computes it.

diffusers' own prompt encoding cuts prompts at 77 tokens and knows no emphasis; people's
prompts are written for A1111, so we encode them as A1111 does and hand the pipeline the
finished ``prompt_embeds``:

- ``<lora:...>`` tags are removed from the text (``prompt_syntax.extract_networks``);
- the text is split into weighted pieces and 75-token chunks (``prompt_syntax``), each chunk
  encoded on its own as start token + 75 tokens + end token, and the chunks concatenated, so
  a long prompt is never cut;
- a textual-inversion embedding named in the prompt replaces its placeholder tokens' input
  vectors (a hook on the encoder's token embedding, as A1111's does);
- each token's output is multiplied by its weight and the chunk rescaled to its original
  mean, so ``(red:1.4)`` strengthens ``red`` without changing the overall scale;
- SD1.5 takes the last layer (or, with clip skip N, the N-th from the end, followed by the
  final layer norm); SD2 its penultimate one; SDXL both encoders' penultimate layers side by
  side and the pooled output of the second for the first chunk. As A1111 does by default,
  SD2 and SDXL ignore clip skip.

The positive and negative conditioning of one image are padded to the same length with the
encoding of the empty prompt (A1111 pads them so with its ``pad_cond_uncond`` option; the
pipeline needs them of one length). The rescaling is per image and chunk, so an
image does not depend on what else is in its batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..prompt_syntax import Chunk, chunk_prompt, embedding_names, extract_networks
from . import to_device

#: Embedding name -> its vectors for each text encoder (``[n, width]`` tensors, in order).
EmbeddingVectors = Mapping[str, Sequence[Any]]


@dataclass
class Encoded:
    """One image's conditioning: ``[1, 77 * chunks, width]`` embeddings (and SDXL's pooled
    ``[1, width]``), positive and negative, plus the embeddings the prompt used."""

    prompt_embeds: Any
    negative_embeds: Any
    pooled: Any = None
    negative_pooled: Any = None
    embeddings_used: tuple[str, ...] = ()


class PromptEncoder:
    """Encodes prompts with one pipeline's tokenizer(s) and text encoder(s)."""

    def __init__(self, pipe: Any, arch: str) -> None:
        import torch

        self._torch = torch
        self.arch = arch
        self.tokenizer = pipe.tokenizer
        encoders = [pipe.text_encoder]
        tokenizers = [pipe.tokenizer]
        if arch == "sdxl":
            encoders.append(pipe.text_encoder_2)
            tokenizers.append(pipe.tokenizer_2)
        self.encoders = encoders
        self.start_id = self.tokenizer.bos_token_id
        self.end_id = self.tokenizer.eos_token_id
        # Each encoder pads with its own tokenizer's pad token after the end token.
        self.pad_ids = [
            t.pad_token_id if t.pad_token_id is not None else self.end_id for t in tokenizers
        ]
        comma = self.tokenizer.convert_tokens_to_ids(",</w>")
        self.comma_id = comma if comma != self.tokenizer.unk_token_id else None
        self._hooked: list[tuple[int, int, Any]] = []  # (row, offset, vectors) for one call
        self._empty: dict[int, Any] = {}

    # -- tokens --------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, truncation=False).input_ids

    def name_ids(self, name: str) -> tuple[int, ...]:
        return tuple(self.tokenize([name])[0])

    def chunks(
        self, text: str, embeddings: Mapping[tuple[int, ...], tuple[str, int]] | None = None
    ) -> list[Chunk]:
        """The chunks of one prompt (its ``<lora:...>`` tags removed)."""
        text, _ = extract_networks(text)
        chunks, _count = chunk_prompt(
            text,
            self.tokenize,
            end_id=self.end_id,
            comma_id=self.comma_id,
            embeddings=embeddings or {},
        )
        return chunks

    # -- encoding ------------------------------------------------------------------------
    def encode(
        self,
        prompt: str,
        negative: str,
        *,
        clip_skip: int = 1,
        embeddings: EmbeddingVectors | None = None,
        device: Any = None,
    ) -> Encoded:
        with self._torch.inference_mode():
            return self._encode(prompt, negative, clip_skip, embeddings or {}, device)

    def _encode(
        self, prompt: str, negative: str, clip_skip: int, embeddings: EmbeddingVectors, device: Any
    ) -> Encoded:
        index = {
            self.name_ids(name): (name, int(vectors[0].shape[0]))
            for name, vectors in embeddings.items()
        }
        pos_chunks = self.chunks(prompt, index)
        neg_chunks = self.chunks(negative, index)
        used = tuple(dict.fromkeys(embedding_names(pos_chunks) + embedding_names(neg_chunks)))
        pos, pos_pooled = self._encode_chunks(pos_chunks, clip_skip, embeddings, device)
        neg, neg_pooled = self._encode_chunks(neg_chunks, clip_skip, embeddings, device)
        # Equal lengths for classifier-free guidance: pad with the empty prompt's chunk.
        length = max(pos.shape[1], neg.shape[1])
        pos = self._pad(pos, length, clip_skip, device)
        neg = self._pad(neg, length, clip_skip, device)
        return Encoded(pos, neg, pos_pooled, neg_pooled, used)

    def _pad(self, embeds: Any, length: int, clip_skip: int, device: Any) -> Any:
        missing = (length - embeds.shape[1]) // 77
        if missing <= 0:
            return embeds
        if clip_skip not in self._empty:
            self._empty[clip_skip] = self._encode_chunks(self.chunks(""), clip_skip, {}, device)[0]
        empty = self._empty[clip_skip].to(embeds.device, embeds.dtype)
        return self._torch.cat([embeds, empty.repeat(1, missing, 1)], dim=1)

    def _encode_chunks(
        self, chunks: list[Chunk], clip_skip: int, embeddings: EmbeddingVectors, device: Any
    ) -> tuple[Any, Any]:
        torch = self._torch
        per_encoder = []
        pooled = None
        for which, encoder in enumerate(self.encoders):
            rows = [[self.start_id, *chunk.tokens, self.end_id] for chunk in chunks]
            pad = self.pad_ids[which]
            if pad != self.end_id:  # after the first end token, this encoder's own padding
                for row in rows:
                    first = row.index(self.end_id)
                    row[first + 1 :] = [pad] * (len(row) - first - 1)
            # Without a wait for the GPU: the next batch is encoded while one decodes.
            ids = to_device(torch.tensor(rows), device or encoder.device)
            fixes = [
                (row, offset + 1, embeddings[name][which])
                for row, chunk in enumerate(chunks)
                for offset, name in chunk.embeddings
            ]
            with self._vectors(encoder, fixes):
                out = encoder(ids, output_hidden_states=True)
            z = self._layer(encoder, out, clip_skip)
            weights = torch.tensor([[1.0, *chunk.weights, 1.0] for chunk in chunks], dtype=z.dtype)
            if not bool((weights == 1.0).all()):  # looked at on the host: no wait for the GPU
                z = _emphasise(z, to_device(weights, z.device))
            per_encoder.append(z.reshape(1, -1, z.shape[-1]))
            if which == 1:
                pooled = out.text_embeds[:1]  # the first chunk's, as A1111 takes it
        return torch.cat(per_encoder, dim=-1), pooled

    def forget(self) -> None:
        """Drop cached encodings (the weights of the text encoders changed)."""
        self._empty.clear()

    def _layer(self, encoder: Any, out: Any, clip_skip: int) -> Any:
        if self.arch == "sdxl":
            return out.hidden_states[-2]
        # SD2's OpenCLIP encoder is already cut at its penultimate layer and A1111 applies no
        # clip skip to it; SD1.5's CLIP takes it.
        if clip_skip <= 1 or self.arch == "sd2":
            return out.last_hidden_state
        hidden = out.hidden_states[-min(clip_skip, len(out.hidden_states))]
        return _final_layer_norm(encoder)(hidden)

    @contextlib.contextmanager
    def _vectors(self, encoder: Any, fixes: list[tuple[int, int, Any]]) -> Iterator[None]:
        """Put the embeddings' vectors in place of their placeholder tokens' inputs."""
        if not fixes:
            yield
            return

        def hook(module: Any, inputs: Any, output: Any) -> Any:
            output = output.clone()
            for row, offset, vectors in fixes:
                vectors = vectors.to(output.device, output.dtype)
                output[row, offset : offset + vectors.shape[0]] = vectors
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _emphasise(z: Any, weights: Any) -> Any:
    """A1111's emphasis: scale each token's output, then restore the chunk's mean."""
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.unsqueeze(-1)
    return z * (original / z.mean(dim=(1, 2), keepdim=True))


def _final_layer_norm(encoder: Any) -> Callable[[Any], Any]:
    model = getattr(encoder, "text_model", encoder)
    return model.final_layer_norm
