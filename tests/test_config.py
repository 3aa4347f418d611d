from __future__ import annotations

import difflib
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from imagineerd import config as config_mod
from imagineerd import config_file, fsutil
from imagineerd.errors import ConfigError, Conflict

from .conftest import record_fsyncs

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
#: config.yaml as the last release (b4dbb60) shipped it, and as that release's API saved it
#: after a few changes (token, port, CORS origin, model, generation defaults, presets, ...).
RELEASE_SHIPPED = DATA / "config-b4dbb60-shipped.yaml"
RELEASE_SAVED = DATA / "config-b4dbb60-saved-by-api.yaml"
#: config.yaml as the release before the gallery index (7dabdcc) shipped it: no gallery:.
RELEASE_7DABDCC = DATA / "config-7dabdcc-shipped.yaml"
#: config.yaml as the release before look-ahead (bb99e82) shipped it: no look_ahead.
RELEASE_BB99E82 = DATA / "config-bb99e82-shipped.yaml"


def load_text(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config_mod.load(path)


def test_shipped_config_is_valid_and_equals_the_defaults():
    config = config_mod.load(ROOT / "config.yaml")
    assert config.data == config_mod.DEFAULTS


def test_every_default_key_is_documented_in_shipped_config():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in config_mod.DEFAULTS.items():
        assert set(values) == set(shipped[section]), section


def test_paths_are_relative_to_the_config_file(tmp_path: Path):
    config = load_text(tmp_path, "paths: {outputs: out}\n")
    assert config.path_for("outputs") == tmp_path / "out"
    assert config.path_for("state") == tmp_path / "state"
    assert config.model_settings()["cache_dir"] == str(tmp_path / "state" / "models")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("server: {port: 70000}\n", "server.port", "0 to 65535"),
        ("server: {port: '5000'}\n", "server.port", "whole number"),
        ("server: {host: ''}\n", "server.host", "host name"),
        ("paths: {outputs: 3}\n", "paths.outputs", "text"),
        ("model: {arch: sd3}\n", "model.arch", "sd15, sd2, sdxl"),
        ("model: {device: tpu}\n", "model.device", "cuda:N"),
        ("model: {dtype: int8}\n", "model.dtype", "float16"),
        ("model: {name: ''}\n", "model.name", "empty"),
        ("generation: {steps: 0}\n", "generation.steps", "1 to 150"),
        ("generation: {width: 500}\n", "generation.width", "divisible by 8"),
        ("generation: {guidance_scale: 31}\n", "generation.guidance_scale", "0 to 30"),
        ("generation: {scheduler: fast}\n", "generation.scheduler", "euler"),
        ("generation: {negative_prompt: 5}\n", "generation.negative_prompt", "text"),
        ("generation: {seed: 5}\n", "generation.seed", "known keys"),
        ("inbox: {enabled: 'yes'}\n", "inbox.enabled", "true or false"),
        ("inbox: {settle_seconds: -1}\n", "inbox.settle_seconds", "number"),
        ("queue: {max_attempts: 0}\n", "queue.max_attempts", "1 to 100"),
        ("performance: {compile: 'yes'}\n", "performance.compile", "auto, true or false"),
        ("performance: {max_batch: 0}\n", "performance.max_batch", "auto or a whole number"),
        ("gallery: {trash_days: -1}\n", "gallery.trash_days", "0 to 3650"),
        ("gallery: {trash_days: 'a week'}\n", "gallery.trash_days", "number"),
        ("gallery: {rescan_seconds: 0.5}\n", "gallery.rescan_seconds", "0 (only at start)"),
        ("gallery: {rescan_seconds: true}\n", "gallery.rescan_seconds", "1 to 604800"),
        ("gallery: {trash: 7}\n", "gallery.trash", "known keys"),
        ("modle: {name: x}\n", "modle", "known sections"),
        ("server: [1, 2]\n", "server", "mapping"),
    ],
)
def test_every_invalid_key_names_the_key_and_the_problem(tmp_path, text, field, words):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.field == field
    assert field in info.value.message and words in info.value.message
    assert str(tmp_path / "config.yaml") in info.value.message


def test_bad_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_text(tmp_path, "server: {port: 5000\n")
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_text(tmp_path, "- a\n- b\n")


def test_save_is_atomic_and_keeps_comments(tmp_path: Path):
    original = "# my settings\ngeneration:\n  steps: 20  # fast\nserver:\n  port: 5001\n"
    config = load_text(tmp_path, original)
    config.data["generation"]["steps"] = 42
    config.data["generation"]["scheduler"] = "ddim"
    config_file.save(config)
    text = (tmp_path / "config.yaml").read_text()
    assert "# my settings" in text and "# fast" in text
    again = config_mod.load(tmp_path / "config.yaml")
    assert again["generation"]["steps"] == 42
    assert again["generation"]["scheduler"] == "ddim"
    assert again["server"]["port"] == 5001
    assert "guidance_scale" not in text  # defaults are not written out
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


# -- whole-config checks, at load time ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("paths: {inbox: outputs}\n", "paths.inbox", "same folder"),
        ("paths: {inbox: outputs/drop}\n", "paths.inbox", "inside paths.outputs"),
        ("paths: {outputs: inbox/images}\n", "paths.outputs", "inside paths.inbox"),
        ("paths: {state: outputs}\n", "paths.state", "published"),
        ("paths: {state: outputs/.state}\n", "paths.state", "published"),
        ("paths: {state: inbox/state}\n", "paths.state", "replace or delete"),
        ("paths: {outputs: /}\n", "paths.outputs", "root of the filesystem"),
        ("paths: {state: /}\n", "paths.state", "root of the filesystem"),
        ("paths: {inbox: /etc}\n", "paths.inbox", "system folder"),
        ("paths: {outputs: /usr}\n", "paths.outputs", "system folder"),
        ("paths: {outputs: /bin}\n", "paths.outputs", "system folder"),
        ("paths: {inbox: /proc/self}\n", "paths.inbox", "system folder"),
        ("paths: {outputs: .}\n", "paths.outputs", "token would be published"),
        ("paths: {inbox: ..}\n", "paths.inbox", "as a prompt file"),
        ("server: {host: '0.0.0.0; touch /tmp/x'}\n", "server.host", "host name"),
        ("server: {host: 'http://nas.local'}\n", "server.host", "host name"),
        ("server: {auth_token: 'two words'}\n", "server.auth_token", "no spaces"),
        ('server: {auth_token: "tab\\there"}\n', "server.auth_token", "control characters"),
        ("server: {auth_token: 'pässword'}\n", "server.auth_token", "accented"),
        ("server: {auth_token: 's3cret '}\n", "server.auth_token", "no spaces"),
        ('model: {name: "models/\\udcff"}\n', "model.name", "UTF-8"),
        ('server: {cors_origins: ["http://\\udcff"]}\n', "server.cors_origins", "UTF-8"),
        ('presets: {"\\udcff": {steps: 5}}\n', "presets", "UTF-8"),
        ('presets: {q: {negative_prompt: "\\udcff"}}\n', "presets.q.negative_prompt", "UTF-8"),
        ('generation: {negative_prompt: "\\udcff"}\n', "generation.negative_prompt", "UTF-8"),
        ('presets: {"a\\nb": {steps: 5}}\n', "presets.a\nb", "plain folder name"),
        ("presets: {q: {steps: [[[[[[[1]]]]]]]}}\n", "presets.q.steps", "nested"),
    ],
)
def test_a_config_that_breaks_something_is_refused_at_load(tmp_path, text, field, words):
    """A hand edit is caught at start, naming the file, the key and what to do instead."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.field == field
    assert words in info.value.message
    assert str(tmp_path / "config.yaml") in info.value.message


def test_an_overlap_hidden_behind_a_symlink_is_found(tmp_path: Path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "drop").symlink_to(tmp_path / "outputs")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "paths: {inbox: drop}\n")
    assert info.value.field == "paths.inbox" and "same folder" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        "",  # the shipped layout: outputs, inbox and state side by side
        "paths: {state: .}\n",  # the database beside config.yaml
        "paths: {outputs: /srv/share/images, inbox: /srv/share/drop, state: /var/lib/imagineerd}\n",
        "paths: {outputs: ../outputs, inbox: ../inbox}\n",
        "server: {host: '::', auth_token: 'Zq9-_.~+/=!x'}\n",
        "server: {host: nas.example.com}\n",
        "server: {host: '[::1]'}\n",
        "server: {host: 192.168.1.20}\n",
    ],
)
def test_sane_layouts_and_hosts_still_load(tmp_path: Path, text: str):
    config = load_text(tmp_path, text)
    assert config.path_for("outputs") != config.path_for("inbox")


def test_the_last_release_config_files_still_load_unchanged(tmp_path: Path):
    """Upgrades keep data: what the last release shipped and what its API saved both load,
    with every value the release read from them."""
    assert config_mod.load(RELEASE_SHIPPED).data == config_mod.DEFAULTS
    saved = config_mod.load(RELEASE_SAVED)
    assert saved["server"]["auth_token"] == "s3cret" and saved["server"]["port"] == 8080
    assert saved["server"]["cors_origins"] == ["http://nas.local:8080"]
    assert saved["generation"]["scheduler"] == "dpmpp_2m_karras"
    assert saved["generation"]["negative_prompt"] == "blurry, lowres"
    assert saved["presets"]["quick"] == {"steps": 12, "scheduler": "dpmpp_2m_karras"}
    assert saved["inbox"]["settle_seconds"] == 5.0 and saved["queue"]["max_attempts"] == 5
    # Keys that release did not have take their defaults.
    assert (saved["model"]["max_loaded"], saved["model"]["cpu_cache"]) == (1, 1)
    assert saved["generation"]["clip_skip"] == 1 and saved["inbox"]["orphan_seconds"] == 600
    assert saved["server"]["max_image_bytes"] == 32 << 20


@pytest.mark.parametrize(
    "fixture",
    [RELEASE_SHIPPED, RELEASE_SAVED, RELEASE_7DABDCC],
    ids=["b4dbb60", "saved", "7dabdcc"],
)
def test_a_config_from_before_the_gallery_index_loads_with_its_defaults(fixture: Path):
    """Neither release had a gallery: section; their files load with its defaults."""
    config = config_mod.load(fixture)
    assert config["gallery"] == {"trash_days": 7.0, "rescan_seconds": 600.0}
    if fixture != RELEASE_SAVED:
        assert config.data == config_mod.DEFAULTS


def test_a_gallery_setting_saved_into_the_last_release_config_adds_its_section(tmp_path: Path):
    path = tmp_path / "config.yaml"
    shutil.copy(RELEASE_7DABDCC, path)
    before = path.read_text()
    config_file.update_file(path, {"gallery": {"trash_days": 3}})
    after = path.read_text()
    assert after.startswith(before) and after[len(before) :] == "gallery:\n  trash_days: 3\n"
    assert config_mod.load(path)["gallery"] == {"trash_days": 3.0, "rescan_seconds": 600.0}


@pytest.mark.parametrize(
    "fixture", [RELEASE_SHIPPED, RELEASE_SAVED, RELEASE_7DABDCC, RELEASE_BB99E82]
)
def test_a_config_from_before_look_ahead_loads_with_its_default(fixture: Path):
    assert "look_ahead" not in fixture.read_text()
    config = config_mod.load(fixture)
    assert config["performance"]["look_ahead"] == "auto"
    if fixture != RELEASE_SAVED:
        assert config.data == config_mod.DEFAULTS


def test_look_ahead_saved_into_the_last_release_config_is_added_alone(tmp_path: Path):
    path = tmp_path / "config.yaml"
    shutil.copy(RELEASE_BB99E82, path)
    before = path.read_text().splitlines()
    config_file.update_file(path, {"performance": {"look_ahead": False}})
    after = path.read_text().splitlines()
    assert [line for line in after if line not in before] == ["  look_ahead: false"]
    assert all(line in after for line in before)
    assert config_mod.load(path)["performance"]["look_ahead"] is False


def test_a_new_key_saved_into_a_last_release_config_is_added_alone(tmp_path: Path):
    path = tmp_path / "config.yaml"
    shutil.copy(RELEASE_SAVED, path)
    before = path.read_text().splitlines()
    config_file.update_file(path, {"generation": {"clip_skip": 2}})
    after = path.read_text().splitlines()
    assert [line for line in after if line not in before] == ["  clip_skip: 2"]
    assert all(line in after for line in before)
    assert config_mod.load(path)["generation"]["clip_skip"] == 2


@pytest.mark.parametrize("fixture", [RELEASE_SHIPPED, RELEASE_SAVED], ids=["shipped", "saved"])
def test_saving_a_last_release_config_changes_only_what_was_asked(tmp_path: Path, fixture):
    path = tmp_path / "config.yaml"
    shutil.copy(fixture, path)
    before = path.read_text()
    config_file.update_file(path, {"generation": {"steps": 25}, "queue": {"max_attempts": 4}})
    after = path.read_text()
    changed = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert sorted(changed) == sorted(
        [
            f"-  steps: {config_mod.load(fixture)['generation']['steps']}",
            "+  steps: 25",
            f"-  max_attempts: {config_mod.load(fixture)['queue']['max_attempts']}",
            "+  max_attempts: 4",
        ]
    )
    again = config_mod.load(path).data
    expected = config_mod.load(fixture).data
    expected["generation"]["steps"], expected["queue"]["max_attempts"] = 25, 4
    assert again == expected


@pytest.mark.parametrize("text", ["yes", "on", "No", "1:30", "1_000", "null", "~", "#x", "a: b"])
def test_text_that_yaml_1_1_reads_otherwise_is_saved_so_it_reads_back(tmp_path: Path, text):
    """ruamel writes YAML 1.2, where ``yes`` is text; PyYAML (our loader) reads ``yes`` as
    true and ``1:30`` as 90. Saved text must load back as the same text."""
    path = tmp_path / "config.yaml"
    path.write_text("generation: {steps: 20}\n")
    config_file.update_file(
        path,
        {"generation": {"negative_prompt": text}, "presets": {text: {"negative_prompt": text}}},
    )
    config = config_mod.load(path)
    assert config["generation"]["negative_prompt"] == text
    assert config["presets"] == {text: {"negative_prompt": text}}


def test_update_file_keeps_hand_edits_and_refuses_a_file_broken_on_disk(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("# mine\nserver:\n  threads: 8  # hand edit\n")
    config_file.update_file(path, {"generation": {"steps": 9}})
    text = path.read_text()
    assert "threads: 8  # hand edit" in text and "# mine" in text and "steps: 9" in text
    path.write_text("paths: {inbox: outputs}\n")  # valid YAML, invalid config
    with pytest.raises(Conflict) as info:
        config_file.update_file(path, {"generation": {"steps": 10}})
    assert info.value.field == "paths.inbox" and "fix it there" in info.value.message
    assert path.read_text() == "paths: {inbox: outputs}\n"
    path.unlink()  # writing only the change would make a file of defaults, token included
    with pytest.raises(Conflict, match="gone from disk"):
        config_file.update_file(path, {"generation": {"steps": 10}})
    assert not path.exists()


# -- saving: durable, through symlinks ------------------------------------------------------


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path: Path, monkeypatch):
    calls = record_fsyncs(monkeypatch)
    target = tmp_path / "note.txt"
    fsutil.atomic_write_text(target, "hello")
    folder = tmp_path.stat()
    assert [stat.S_ISDIR(c.st_mode) for c in calls] == [False, True]  # file, then its folder
    assert (calls[1].st_dev, calls[1].st_ino) == (folder.st_dev, folder.st_ino)
    assert target.read_text() == "hello"


def test_saving_a_symlinked_config_writes_through_and_keeps_the_link(tmp_path, monkeypatch):
    real = tmp_path / "settings" / "config.yaml"
    real.parent.mkdir()
    real.write_text("# kept\ngeneration: {steps: 20}\n")
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    calls = record_fsyncs(monkeypatch)
    fsutil.atomic_write_text(link, "generation: {steps: 21}\n", follow_symlinks=True)
    assert link.is_symlink() and real.read_text() == "generation: {steps: 21}\n"
    folder = real.parent.stat()
    assert (calls[-1].st_dev, calls[-1].st_ino) == (folder.st_dev, folder.st_ino)
    assert sorted(p.name for p in real.parent.iterdir()) == ["config.yaml"]  # no temp file
    config = config_mod.load(link)
    config.data["generation"]["steps"] = 22
    config_file.save(config)
    config_file.update_file(link, {"generation": {"scheduler": "ddim"}})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert config_mod.load(link)["generation"]["steps"] == 22
    assert "scheduler: ddim" in real.read_text()


def test_atomic_write_replaces_a_planted_link_by_default(tmp_path: Path):
    """Inbox receipts live in a folder anyone on the share may write: a link planted where a
    receipt goes is replaced, never written through to its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    receipt = tmp_path / "job.result.yaml"
    receipt.symlink_to(victim)
    fsutil.atomic_write_text(receipt, "receipt")
    assert not receipt.is_symlink() and receipt.read_text() == "receipt"
    assert victim.read_text() == "precious"


def test_a_folder_fsync_that_fails_after_the_rename_is_not_an_error(tmp_path, monkeypatch):
    """The file is in place by then: the caller (the API) must not report a saved change as
    failed, so the folder's fsync failing (some network filesystems refuse it) is logged."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "config.yaml"
    target.write_text("generation: {steps: 20}\n")
    config_file.update_file(target, {"generation": {"steps": 21}})
    assert config_mod.load(target)["generation"]["steps"] == 21


def test_presets_take_model_and_image_settings(tmp_path: Path):
    text = (
        "presets:\n"
        "  soft: {model: beta, loras: ['detail:0.5'], strength: 0.4, mask_blur: 8,\n"
        "         inpaint_area: masked, hires: {scale: 1.5}}\n"
    )
    preset = load_text(tmp_path, text)["presets"]["soft"]
    assert preset["loras"] == [{"name": "detail", "weight": 0.5}]
    assert preset["hires"] == {
        "scale": 1.5,
        "steps": 0,
        "denoising_strength": 0.5,
        "upscaler": "latent",
    }
    assert (preset["strength"], preset["mask_blur"], preset["inpaint_area"]) == (0.4, 8, "masked")
    with pytest.raises(ConfigError, match="presets.soft.strength"):
        load_text(tmp_path, "presets: {soft: {strength: 2}}\n")
