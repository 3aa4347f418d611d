"""Third-party plugins through a real entry point (a dist-info folder on sys.path)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pluggy
import pytest
from PIL import Image

from imagineerd import hookimpl
from imagineerd.daemon import Daemon
from imagineerd.errors import ConfigError
from imagineerd.jobs import COMPLETED
from imagineerd.plugins import get_plugin_manager

from .conftest import wait_finished

PLUGIN = """
from PIL import Image
from imagineerd import hookimpl
from imagineerd.backends import BackendBase

class SolidBackend(BackendBase):
    def __init__(self, settings):
        self.color = settings["name"]
        self.model_label = "solid-" + settings["name"]

    def generate(self, batch, on_step):
        for step in range(1, batch[0].steps + 1):
            on_step(step, batch[0].steps)
        return [Image.new("RGB", (r.width, r.height), self.color) for r in batch]

@hookimpl
def imagineerd_register_backends(registry):
    registry.add("solid", SolidBackend)
"""


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "solid_plugin.py").write_text(PLUGIN)
    dist = site / "imagineerd_solid-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: imagineerd-solid\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[imagineerd]\nsolid = solid_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_point_backend_is_found_and_used(installed_plugin, make_config):
    d = Daemon(make_config(model={"backend": "solid", "name": "red"}))
    assert d.registry.names() == ["diffusers", "solid"]
    d.start()
    try:
        done = wait_finished(d, d.submit({"prompt": "anything", "steps": 3}).id)
        assert done.status == COMPLETED
        with Image.open(d.config.base_dir / done.output_path) as image:
            assert image.getpixel((0, 0)) == (255, 0, 0)
        assert "Model: solid-red" in image.info["parameters"]
    finally:
        d.stop()


def test_unknown_backend_fails_at_start_listing_the_names(make_config):
    with pytest.raises(ConfigError) as info:
        Daemon(make_config(model={"backend": "dall-e"}))
    assert info.value.field == "model.backend"
    assert "'dall-e'" in info.value.message and "available: diffusers" in info.value.message


def test_misspelt_hook_fails_at_start_up():
    class Typo:
        @hookimpl
        def imagineerd_register_backend(self, registry):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError, match="imagineerd_register_backend"):
        get_plugin_manager([Typo()], entry_points=False)


def test_readme_plugin_example_runs(make_config, tmp_path):
    """The README's plugin example, extracted and run, so the docs cannot rot."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\nfrom imagineerd import hookimpl")
    code = readme[start + len("```python\n") : readme.index("```", start + 10)]
    namespace: dict = {}
    exec(compile(textwrap.dedent(code), "README.md", "exec"), namespace)
    plugin = type(
        "ReadmePlugin",
        (),
        {"imagineerd_register_backends": staticmethod(namespace["imagineerd_register_backends"])},
    )
    pm = get_plugin_manager([plugin], entry_points=False)
    d = Daemon(make_config(model={"backend": "solid"}), plugin_manager=pm)
    d.start()
    try:
        assert wait_finished(d, d.submit({"prompt": "readme"}).id).status == COMPLETED
    finally:
        d.stop()
