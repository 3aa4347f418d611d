from __future__ import annotations

import random

import pytest

from imagineerd import config as config_mod
from imagineerd.errors import ValidationError
from imagineerd.jobs import SEED_MAX, validate

DEFAULTS = config_mod.DEFAULTS["generation"]


def ok(**fields):
    return validate({"prompt": "a cat", **fields}, DEFAULTS)


def bad(data, field):
    with pytest.raises(ValidationError) as info:
        validate(data, DEFAULTS)
    assert info.value.field == field, info.value.message
    assert field in info.value.message
    return info.value.message


def test_defaults_fill_omitted_values_and_seed_is_drawn_and_kept():
    spec = validate({"prompt": "  a cat  "}, DEFAULTS, rng=random.Random(7))
    assert spec.prompt == "a cat"
    assert (spec.steps, spec.width, spec.height) == (30, 512, 512)
    assert spec.guidance_scale == 7.5 and spec.scheduler == "euler"
    assert spec.seed == random.Random(7).randint(0, SEED_MAX)


@pytest.mark.parametrize(
    ("field", "inside", "outside"),
    [
        ("seed", [0, SEED_MAX], [-1, SEED_MAX + 1]),
        ("steps", [1, 150], [0, 151]),
        ("width", [64, 2048, 520], [56, 2056, 516]),
        ("height", [64, 2048], [63, 2049, 0]),
        ("guidance_scale", [0, 30, 7.5, 0.0], [-0.1, 30.01, float("nan"), float("inf")]),
    ],
)
def test_bounds_inclusive_and_one_past_each_rejected(field, inside, outside):
    for value in inside:
        assert getattr(ok(**{field: value}), field) == value
    for value in outside:
        bad({"prompt": "x", field: value}, field)


def test_prompt_rules():
    assert ok(prompt="x" * 2000).prompt == "x" * 2000
    assert ok(prompt="  " + "y" * 2000 + "\n").prompt == "y" * 2000  # trimmed first
    bad({"prompt": "x" * 2001}, "prompt")
    bad({"prompt": "   "}, "prompt")
    bad({}, "prompt")
    bad({"prompt": None}, "prompt")
    bad({"prompt": 12}, "prompt")
    bad({"prompt": "nul\x00byte"}, "prompt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", True),
        ("seed", False),
        ("width", "512"),
        ("guidance_scale", "7.5"),
        ("steps", 2.5),
        ("negative_prompt", 3),
        ("scheduler", "warp-drive"),
        ("steps", [30]),
    ],
)
def test_wrong_types_name_the_field(field, value):
    message = bad({"prompt": "x", field: value}, field)
    assert repr(value)[:10] in message or "must" in message


def test_unknown_field_and_non_object():
    message = bad({"prompt": "x", "sample": "Euler"}, "sample")
    assert "allowed fields" in message
    with pytest.raises(ValidationError, match="must be an object"):
        validate(["a cat"], DEFAULTS)


def test_integral_float_and_nulls_and_scheduler_labels():
    spec = ok(steps=20.0, negative_prompt=None, seed=None, scheduler="DPM++ 2M Karras")
    assert spec.steps == 20 and isinstance(spec.steps, int)
    assert spec.negative_prompt == "" and 0 <= spec.seed <= SEED_MAX
    assert spec.scheduler == "dpmpp_2m_karras" and spec.sampler_label == "DPM++ 2M Karras"


def test_width_message_suggests_nearest_valid_values():
    message = bad({"prompt": "x", "width": 516}, "width")
    assert "512" in message and "520" in message
