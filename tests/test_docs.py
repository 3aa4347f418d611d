"""The docs say what the code does: bounds written in the README come from the one table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imagineerd import jobs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def readme_row(name: str) -> str:
    for line in README.splitlines():
        if line.startswith("| ") and re.search(rf"`{name}`", line.split("|")[1]):
            return line
    raise AssertionError(f"the README's job table has no row for {name}")


@pytest.mark.parametrize("name", jobs.PARAMETERS)
def test_the_readme_job_table_states_each_bound_of_the_parameter_table(name):
    param, row = jobs.PARAMS[name], readme_row(name)
    if param.kind in ("int", "float"):
        assert f"{number(param.lo)}–{number(param.hi)}" in row, row
        if param.multiple_of > 1:
            assert f"divisible by {param.multiple_of}" in row, row
    elif param.kind in ("text", "name", "url"):
        assert str(param.max_length) in row, row
    elif param.kind == "image":
        assert all(name in row for name in ("PNG", "JPEG", "WebP")), row
    elif param.kind == "option":
        assert all(f"`{choice}`" in row for choice in param.choices), row
    elif param.kind == "hires":
        limits = param.limits()
        assert f"{number(limits['scale']['min'])}–{number(limits['scale']['max'])}" in row, row
        assert all(f"`{choice}`" in row for choice in limits["upscaler"]["choices"]), row
    elif param.kind == "loras":
        limits = param.limits()
        assert f"up to {limits['max_items']}" in row, row
        assert f"{number(limits['min'])}–{number(limits['max'])}" in row, row
    else:
        assert all(f"`{choice}`" in row for choice in param.limits()["choices"]), row
    assert ("required" in row) == param.required
    assert (f"`generation.{name}" in row or "generation.width/height" in row) == (param.has_default)


def test_the_inbox_error_note_states_the_bounds_of_the_table():
    summary = jobs.bounds_summary()
    for name, param in jobs.PARAMS.items():
        if param.kind in ("int", "float"):
            assert f"{name} {number(param.lo)}-{number(param.hi)}" in summary
