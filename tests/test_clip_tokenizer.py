"""The CLIP tokenizer built from the vocabulary shipped in the package gives the real CLIP ids."""

from __future__ import annotations

import configparser
import hashlib
import os
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path

import pytest

from imagineerd.backends import clip_tokenizer as ct

ROOT = Path(__file__).resolve().parent.parent

# Expected ids come from OpenAI CLIP's reference tokenizer as shipped in the open_clip_torch
# 3.3.0 wheel (open_clip/tokenizer.py, SimpleTokenizer().encode(text) between its start and
# end ids), run once by hand; the first is also the well-known SD prompt example.
REFERENCE = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "An astronaut riding a horse on Mars, highly detailed, 8k": [
        49406, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 5302, 12609, 267, 279, 330, 49407,
    ],
    "portrait of a woman, (masterpiece:1.2), soft lighting, don't blur": [
        49406, 5352, 539, 320, 2308, 267, 263, 12066, 281, 272, 269, 273, 2361, 3773, 5799,
        267, 847, 713, 27976, 49407,
    ],
    "Café crème brûlée, 日本語 🐱": [
        49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 39121, 44353, 34002,
        508, 22979, 49407,
    ],
}  # fmt: skip

# 30 x "a red apple" is 119 text tokens; the same reference's 77-id row keeps the first 75
# and ends with the end token.
LONG_PROMPT = ", ".join(["a red apple"] * 30)
LONG_REFERENCE = [49406] + [320, 736, 3055, 267] * 18 + [320, 736, 3055] + [49407]


@pytest.fixture(scope="module")
def tokenizer():
    return ct.clip_tokenizer()


def test_vocabulary_file_is_openai_clip():
    digest = hashlib.sha256(ct.VOCAB_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (ct.VOCAB_FILE.parent / "LICENSE-CLIP").read_text().count("Copyright (c) 2021 OpenAI")


def test_vocabulary_layout():
    vocab = ct.clip_vocab()
    assert len(vocab) == 49408
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    assert vocab["in"] == 512  # first merge: "i n"
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert len(ct.clip_merges()) == 48894
    assert ct.clip_merges()[0] == ("i", "n")


@pytest.mark.parametrize("prompt", sorted(REFERENCE))
def test_real_clip_ids(tokenizer, prompt):
    assert tokenizer(prompt).input_ids == REFERENCE[prompt]


def test_padding_to_77_with_sd_pad(tokenizer):
    ids = tokenizer(
        "a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    assert tokenizer.model_max_length == 77
    assert ids == REFERENCE["a photo of a cat"] + [49407] * 70
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407


def test_sdxl_second_tokenizer_pads_with_bang():
    tok = ct.clip_tokenizer(pad_token=ct.PAD_SDXL_2)
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert tok.pad_token == "!"
    assert tok.pad_token_id == 0
    assert ids == REFERENCE["a photo of a cat"] + [0] * 70


def test_unknown_pad_token_is_refused():
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        ct.clip_tokenizer(pad_token="<pad>")


def test_long_prompt_truncates_like_clip(tokenizer):
    assert len(tokenizer(LONG_PROMPT).input_ids) == 121  # nothing cut without truncation
    ids = tokenizer(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids == LONG_REFERENCE


def test_saved_folder_loads_with_from_pretrained(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = ct.save_clip_tokenizer(tmp_path / "tokenizer_2", pad_token=ct.PAD_SDXL_2)
    for cls in (CLIPTokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(folder, local_files_only=True)
        assert loaded("a photo of a cat").input_ids == REFERENCE["a photo of a cat"]
        assert loaded.pad_token_id == 0
        assert loaded.model_max_length == 77


def test_works_offline_without_network(tmp_path):
    """A fresh process with an empty HF cache, HF_HUB_OFFLINE=1 and every socket refused."""
    code = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network used")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from imagineerd.backends.clip_tokenizer import clip_tokenizer

        print(clip_tokenizer()("a photo of a cat").input_ids)
        """
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(REFERENCE["a photo of a cat"])


def test_package_data_ships_the_vocabulary_and_licence():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = cfg["options.package_data"]["imagineerd.backends"].replace(",", " ").split()
    for name in ("bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP"):
        assert any(fnmatch(f"clip/{name}", pattern) for pattern in patterns), name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_test_model_with_the_real_tokenizer_runs(tmp_path, arch):
    """``make-test-model --real-tokenizer``: real ids reach text encoders sized for them."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from imagineerd.backends.testmodel import make_test_model

    folder = make_test_model(tmp_path / arch, arch=arch, real_tokenizer=True)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.tokenizer("a photo of a cat").input_ids == REFERENCE["a photo of a cat"]
    assert pipe.tokenizer.pad_token_id == 49407
    assert pipe.text_encoder.config.vocab_size == 49408
    if arch == "sdxl":
        assert pipe.tokenizer_2.pad_token_id == 0
        assert pipe.text_encoder_2.config.vocab_size == 49408
    image = pipe(
        "Café crème brûlée, 日本語 🐱", height=64, width=64, num_inference_steps=2, output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
