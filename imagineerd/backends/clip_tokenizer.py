"""The real CLIP tokenizer, built offline from a vocabulary shipped inside this package.

Single-file checkpoints (one ``.safetensors`` or ``.ckpt``) hold the text encoders' weights
but no tokenizer, and diffusers would fetch one from the Hugging Face hub, which machines
without network cannot reach. SD1.5's tokenizer and both of SDXL's are the same OpenAI CLIP
byte-level BPE vocabulary (49408 ids); they differ only in the padding token: ``<|endoftext|>``
for SD1.5 and SDXL's first tokenizer, ``!`` (id 0) for SDXL's second (OpenCLIP ViT-bigG).

The vocabulary is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, unchanged, in ``clip/`` next
to this module with its MIT licence (``clip/LICENSE-CLIP``). That file lists BPE merges; the
token table is derived from it exactly as OpenAI's ``simple_tokenizer.py`` does: the 256
byte characters, the same with the word-end mark ``</w>``, one token per merge (the pair
joined, in merge order), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Text normalisation is ``transformers.CLIPTokenizer``'s (NFC, collapsed whitespace, lower
case), as with the tokenizer files published next to the SD models; OpenAI's reference also
runs ftfy and unescapes HTML entities, so the two can differ on mojibake or ``&amp;``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

VOCAB_FILE = Path(__file__).parent / "clip" / "bpe_simple_vocab_16e6.txt.gz"

MAX_LENGTH = 77  # CLIP's text context: start token, 75 tokens of text, end token
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_SD = EOS_TOKEN  # SD1.5, and SDXL's first tokenizer
PAD_SDXL_2 = "!"  # SDXL's second tokenizer (OpenCLIP ViT-bigG/14) pads with id 0

_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: the file holds more, CLIP uses these


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is the "#version" header.
    merges = tuple(_merge(line) for line in lines[1 : _N_MERGES + 1])
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(merges) != _N_MERGES:
        raise RuntimeError(f"{VOCAB_FILE} is not the CLIP vocabulary")
    return vocab, merges


def _merge(line: str) -> tuple[str, str]:
    first, second = line.split()
    return first, second


def clip_vocab() -> dict[str, int]:
    """Token -> id, 49408 entries (a new dict each call)."""
    return dict(_vocab_and_merges()[0])


def clip_merges() -> list[tuple[str, str]]:
    """The 48894 BPE merges in rank order."""
    return list(_vocab_and_merges()[1])


def clip_tokenizer(pad_token: str = PAD_SD) -> Any:
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary; nothing is downloaded.

    ``pad_token``: ``PAD_SD`` (``<|endoftext|>``) for SD1.5 and SDXL's ``tokenizer``,
    ``PAD_SDXL_2`` (``!``) for SDXL's ``tokenizer_2``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        pad_token=pad_token,
    )


def save_clip_tokenizer(directory: str | Path, pad_token: str = PAD_SD) -> Path:
    """Write the tokenizer in Hugging Face's folder format (for ``from_pretrained``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip_tokenizer(pad_token).save_pretrained(directory)
    return directory
