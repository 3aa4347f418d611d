"""/api/config over a real server: what may change remotely, PUT vs PATCH, validation of the
whole result, authentication that cannot be weakened, and files from the last release."""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagineerd import config as config_mod
from imagineerd import config_remote

from .conftest import Api
from .test_config import RELEASE_SAVED, RELEASE_SHIPPED
from .test_models import SDXL, st

EDIT_ON_SERVER = "edit config.yaml on the server"


def assert_error(response, status: int, field: str | None = None) -> dict:
    """The one JSON error shape."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) <= {"error", "code", "status", "field"}
    assert body["status"] == status and body["error"] and body["code"]
    if field is not None:
        assert body["field"] == field, body
    return body


def raw_json(api: Api, method: str, path: str, text: str):
    """Send ``text`` as the body unchanged (to spell escapes requests would not send)."""
    return api(method, path, data=text.encode(), headers={"Content-Type": "application/json"})


@pytest.fixture
def serve(start_api) -> Callable[[Path], Api]:
    """A real daemon and server on an existing config file; host and port are overridden in
    memory only, as ``imagineerd serve --host --port`` does."""

    def start(path: Path) -> Api:
        config = config_mod.load(path)
        config.data["server"].update(host="127.0.0.1", port=0)
        return start_api(workers=False, config=config)

    return start


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


# -- what may change over the API ----------------------------------------------------------

PROBES = [  # what an outside probe sent, each answered 200 before
    ("paths", "outputs", "/"),
    ("paths", "inbox", "/etc"),
    ("paths", "outputs", "/usr/share"),
    ("paths", "inbox", "outputs"),
    ("paths", "state", "outputs/state"),
    ("model", "backend", "nonexistent"),
    ("server", "port", 22),
    ("server", "host", "0.0.0.0"),
    ("server", "auth_token", "attacker"),
    ("server", "cors_origins", ["*"]),
    ("server", "allowed_hosts", ["*"]),
    ("model", "cache_dir", "/etc"),
    ("model", "device", "cuda:0"),
    ("inbox", "enabled", True),
    ("inbox", "outputs_subfolder", True),
]


@pytest.mark.parametrize(("section", "key", "value"), PROBES)
def test_changing_a_read_only_key_is_403_and_writes_nothing(start_api, section, key, value):
    api = start_api(workers=False)
    before = api.daemon.config.path.read_bytes()
    config = api("GET", "/api/config").json()
    config[section][key] = value
    body = assert_error(api("PUT", "/api/config", json=config), 403, f"{section}.{key}")
    assert EDIT_ON_SERVER in body["error"] and body["code"] == "forbidden"
    body = assert_error(api("PATCH", "/api/config", json={section: {key: value}}), 403)
    assert body["field"] == f"{section}.{key}" and EDIT_ON_SERVER in body["error"]
    assert api.daemon.config.path.read_bytes() == before
    assert api("GET", "/api/config").json()["restart_required"] == []


def other_value(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, "x"] if isinstance(value, list) else {"x": 1}


def test_every_key_outside_the_allow_list_is_read_only(start_api):
    """Deny by default: every key of the schema that REMOTE_KEYS does not list is refused,
    whatever its section, so a key added later starts read-only."""
    api = start_api(workers=False)
    before = api.daemon.config.path.read_bytes()
    saved = api("GET", "/api/config").json()
    read_only = [
        (section, key)
        for section, keys in config_mod.DEFAULTS.items()
        for key in keys
        if key not in config_remote.REMOTE_KEYS.get(section, ())
    ]
    assert ("server", "auth_token") in read_only and ("queue", "max_attempts") not in read_only
    for section, key in [*read_only, ("model", "name")]:
        value = other_value(saved[section][key])
        response = api("PATCH", "/api/config", json={section: {key: value}})
        assert_error(response, 403, f"{section}.{key}")
        full = json.loads(json.dumps(saved))
        full[section][key] = value
        assert_error(api("PUT", "/api/config", json=full), 403, f"{section}.{key}")
    assert api.daemon.config.path.read_bytes() == before


def test_model_name_changes_only_to_an_available_model(start_api, monkeypatch):
    api = start_api(workers=False)
    current = api.daemon.saved_config["model"]["name"]
    body = assert_error(
        api("PATCH", "/api/config", json={"model": {"name": "/etc/shadow"}}), 403, "model.name"
    )
    assert current in body["error"] and EDIT_ON_SERVER in body["error"]
    same = api("PATCH", "/api/config", json={"model": {"name": current}})
    assert same.status_code == 200 and same.json()["restart_required"] == []
    # A checkpoint listed from paths.models is available by its name, and that name then
    # stands for its file (the backend loads files by path); a name beside it is not.
    models = api.daemon.config.path_for("models")
    mine = st(models / "checkpoints" / "sdxl" / "mine.safetensors", SDXL)
    assert_error(api("PATCH", "/api/config", json={"model": {"name": "sdxl/other"}}), 403)
    api("POST", "/api/models/refresh", json={})
    assert "sdxl/mine" in api.daemon.available_models()
    result = api("PATCH", "/api/config", json={"model": {"name": "sdxl/mine"}}).json()
    assert result["restart_required"] == ["model.name"]
    saved = config_mod.load(api.daemon.config.path)
    assert saved["model"]["name"] == "sdxl/mine"
    assert saved.model_settings()["name"] == str(mine)
    for outside in ("../config", "/etc/shadow", "sdxl/../../config"):
        assert_error(api("PATCH", "/api/config", json={"model": {"name": outside}}), 403)
    monkeypatch.setattr(api.daemon, "available_models", lambda: [current, "org/other-model"])
    result = api("PATCH", "/api/config", json={"model": {"name": "org/other-model"}}).json()
    assert result["restart_required"] == ["model.name"]
    saved = yaml.safe_load(api.daemon.config.path.read_text())
    assert saved["model"]["name"] == "org/other-model"
    assert api.daemon.config["model"]["name"] == current  # the running model until a restart


def test_the_api_cannot_remove_or_weaken_authentication(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret"})
    good = {"Authorization": "Bearer s3cret"}
    before = api.daemon.config.path.read_bytes()
    config = api("GET", "/api/config", headers=good).json()
    assert config["server"]["auth_token"] == "********"
    for token in ("", "other", " s3cret", None, 0):
        response = api("PATCH", "/api/config", json={"server": {"auth_token": token}}, headers=good)
        assert_error(response, 403, "server.auth_token")
        full = json.loads(json.dumps(config))
        full["server"]["auth_token"] = token
        assert_error(api("PUT", "/api/config", json=full, headers=good), 403, "server.auth_token")
    for key, value in (("cors_origins", ["*"]), ("allowed_hosts", ["evil.example"])):
        response = api("PATCH", "/api/config", json={"server": {key: value}}, headers=good)
        assert_error(response, 403, f"server.{key}")
    assert api.daemon.config.path.read_bytes() == before
    # The redacted token sent back means "unchanged": the GET, edit, PUT round trip works.
    config["generation"]["steps"] = 5
    assert api("PUT", "/api/config", json=config, headers=good).status_code == 200
    saved = yaml.safe_load(api.daemon.config.path.read_text())
    assert saved["server"]["auth_token"] == "s3cret" and saved["generation"]["steps"] == 5
    assert_error(api("GET", "/api/config"), 401)
    assert_error(api("PATCH", "/api/config", json={"generation": {"steps": 6}}), 401)
    assert api("GET", "/api/config", headers=good).status_code == 200


def test_the_environment_token_stays_authoritative(start_api, monkeypatch):
    monkeypatch.setenv("IMAGINEERD_AUTH_TOKEN", "from-env")
    api = start_api(workers=False)
    good = {"Authorization": "Bearer from-env"}
    for token in ("", "mine"):
        response = api("PATCH", "/api/config", json={"server": {"auth_token": token}}, headers=good)
        if token:
            assert_error(response, 403, "server.auth_token")
        else:  # the file's token is empty already: sent back unchanged, nothing changes
            assert response.status_code == 200
    assert config_mod.load(api.daemon.config.path)["server"]["auth_token"] == ""
    assert_error(api("GET", "/api/jobs"), 401)
    assert api("GET", "/api/jobs", headers=good).status_code == 200


# -- PATCH merges, PUT replaces ------------------------------------------------------------


def test_patch_merges_section_by_section_and_presets_by_name(start_api):
    api = start_api(workers=False, server={"auth_token": "s3cret", "host": "127.0.0.1"})
    api.http.headers["Authorization"] = "Bearer s3cret"
    path = api.daemon.config.path
    before = config_mod.load(path).data
    result = api(
        "PATCH",
        "/api/config",
        json={
            "generation": {"steps": 7},
            "queue": {"max_attempts": 4},
            "inbox": {"settle_seconds": 1.5, "max_jobs_per_file": 10},
            "performance": {"job_timeout": 60, "batch_buckets": [4, 1]},
            "presets": {"quick": {"steps": 12, "scheduler": "DPM++ 2M Karras"}},
        },
    )
    assert result.status_code == 200, result.text
    assert result.json()["restart_required"] == [
        "inbox.settle_seconds",
        "inbox.max_jobs_per_file",
        "performance.batch_buckets",
        "performance.job_timeout",
    ]
    assert api.daemon.config["generation"]["steps"] == 7  # live sections apply at once
    assert api.daemon.config["presets"]["quick"]["scheduler"] == "dpmpp_2m_karras"
    after = config_mod.load(path).data
    expected = json.loads(json.dumps(before))
    expected["generation"]["steps"], expected["queue"]["max_attempts"] = 7, 4
    expected["inbox"].update(settle_seconds=1.5, max_jobs_per_file=10)
    expected["performance"].update(job_timeout=60.0, batch_buckets=[1, 4])
    expected["presets"] = {"quick": {"steps": 12, "scheduler": "dpmpp_2m_karras"}}
    assert after == expected  # token, host, paths: all as they were
    api("PATCH", "/api/config", json={"presets": {"slow": {"steps": 80}}})
    assert set(config_mod.load(path)["presets"]) == {"quick", "slow"}
    api("PATCH", "/api/config", json={"presets": {"quick": None}})
    assert config_mod.load(path)["presets"] == {"slow": {"steps": 80}}
    text = path.read_text()
    assert api("PATCH", "/api/config", json={}).status_code == 200  # nothing asked
    assert path.read_text() == text


def test_put_must_carry_every_section_and_key(start_api):
    api = start_api(workers=False)
    path = api.daemon.config.path
    before = path.read_bytes()
    for body in ({}, {"generation": {"steps": 8}}):
        error = assert_error(api("PUT", "/api/config", json=body), 400)
        assert "server" in error["error"] and "PATCH" in error["error"]
    config = api("GET", "/api/config").json()
    del config["server"]["auth_token"], config["paths"]
    error = assert_error(api("PUT", "/api/config", json=config), 400, "paths")
    assert "server.auth_token" in error["error"]
    assert path.read_bytes() == before
    # A GET, PUT round trip (restart_required included) changes nothing at all.
    config = api("GET", "/api/config").json()
    assert api("PUT", "/api/config", json=config).status_code == 200
    assert path.read_bytes() == before
    # PUT replaces presets as a whole.
    api("PATCH", "/api/config", json={"presets": {"a": {"steps": 5}, "b": {"steps": 6}}})
    config = api("GET", "/api/config").json()
    config["presets"] = {"c": {"steps": 7}}
    assert api("PUT", "/api/config", json=config).status_code == 200
    assert config_mod.load(path)["presets"] == {"c": {"steps": 7}}


def test_put_generation_goes_through_the_same_path(start_api):
    api = start_api(workers=False)
    path = api.daemon.config.path
    response = api("PUT", "/api/config/generation", json={"negative_prompt": "yes", "steps": 4})
    assert response.status_code == 200
    # PyYAML reads a plain `yes` as true: it must be written so that it loads back as text.
    assert config_mod.load(path)["generation"]["negative_prompt"] == "yes"
    before = path.read_bytes()
    assert_error(api("PUT", "/api/config/generation", json={"seed": 1}), 400, "generation.seed")
    assert_error(api("PUT", "/api/config/generation", json={"steps": 0}), 400, "generation.steps")
    body = raw_json(api, "PUT", "/api/config/generation", '{"negative_prompt": "\\udcff"}')
    assert_error(body, 400, "generation.negative_prompt")
    assert path.read_bytes() == before


# -- whole-config validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"presets": {"\\udcff": {"steps": 5}}}', "presets"),
        ('{"presets": {"q": {"negative_prompt": "a\\udcffb"}}}', "presets.q.negative_prompt"),
        ('{"generation": {"negative_prompt": "\\ud800"}}', "generation.negative_prompt"),
        ('{"model": {"name": "\\udcff"}}', "model.name"),
        ('{"generation": {"sch\\udcffeduler": "euler"}}', "generation"),
        ('{"presets": {"a/b": {"steps": 5}}}', "presets.a/b"),
        ('{"presets": {"done": {"steps": 5}}}', "presets.done"),
        ('{"presets": {"q": {"steps": [[[[[[[1]]]]]]]}}}', "presets.q.steps"),
        ('{"generation": []}', "generation"),
        ('{"modle": {}}', "modle"),
        ('{"queue": {"max_attempts": 0}}', "queue.max_attempts"),
        ('{"inbox": {"settle_seconds": "soon"}}', "inbox.settle_seconds"),
    ],
)
def test_bad_text_and_values_are_400_before_anything_is_saved(start_api, text, field):
    api = start_api(workers=False)
    before = api.daemon.config.path.read_bytes()
    assert_error(raw_json(api, "PATCH", "/api/config", text), 400, field)
    assert api.daemon.config.path.read_bytes() == before
    assert api("GET", "/api/health").json()["status"] == "ok"


def test_absurd_bodies_are_400(api: Api):
    before = api.daemon.config.path.read_bytes()
    deep = '{"presets": {"q": {"steps": ' + "[" * 100_000 + "]" * 100_000 + "}}}"
    for method, path in (("PATCH", "/api/config"), ("PUT", "/api/config")):
        assert_error(raw_json(api, method, path, deep), 400)
    assert_error(raw_json(api, "PUT", "/api/config/generation", deep), 400)
    many = {"presets": {f"p{i}": {"steps": 5} for i in range(6000)}}
    body = assert_error(api("PATCH", "/api/config", json=many), 400)
    assert "values" in body["error"]
    assert api.daemon.config.path.read_bytes() == before


# -- the file on disk ----------------------------------------------------------------------


def test_hand_edits_made_while_running_survive_a_save(start_api):
    api = start_api(workers=False)
    path = api.daemon.config.path
    text = path.read_text()
    assert "server:\n" in text and "threads" not in text
    path.write_text("# tuned by hand\n" + text.replace("server:\n", "server:\n  threads: 8\n"))
    assert api("PATCH", "/api/config", json={"generation": {"steps": 3}}).status_code == 200
    text = path.read_text()
    assert "# tuned by hand" in text and "threads: 8" in text and "steps: 3" in text
    config = api("GET", "/api/config").json()
    assert config["server"]["threads"] == 8 and config["restart_required"] == ["server.threads"]


def test_a_config_file_gone_or_broken_on_disk_is_409_and_not_replaced(start_api):
    api = start_api(workers=False)
    path = api.daemon.config.path
    path.write_text(path.read_text() + "paths: {inbox: outputs}\n")
    body = assert_error(api("PATCH", "/api/config", json={"generation": {"steps": 3}}), 409)
    assert body["field"] == "paths.inbox" and "fix it there" in body["error"]
    path.unlink()  # saving only the change would write a file of defaults, without the token
    body = assert_error(api("PATCH", "/api/config", json={"generation": {"steps": 3}}), 409)
    assert "gone from disk" in body["error"] and not path.exists()
    assert api("GET", "/api/health").json()["status"] == "ok"


def test_a_symlinked_config_keeps_its_link(serve, tmp_path: Path, tiny_model: Path):
    from .conftest import write_config

    real_dir = tmp_path / "settings"
    real_dir.mkdir()
    real = write_config(real_dir, tiny_model)
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    api = serve(link)
    assert api("PATCH", "/api/config", json={"generation": {"steps": 6}}).status_code == 200
    assert link.is_symlink() and config_mod.load(real)["generation"]["steps"] == 6
    assert sorted(p.name for p in real_dir.iterdir()) == ["config.yaml", "outputs", "state"]


@pytest.mark.parametrize("fixture", [RELEASE_SHIPPED, RELEASE_SAVED], ids=["shipped", "saved"])
def test_a_last_release_config_changes_only_what_was_asked(serve, tmp_path: Path, fixture):
    """Upgrades keep data: a config.yaml as the last release wrote it (shipped, or saved by
    its API with a token, another port, presets, ...) round-trips byte for byte, and a
    change rewrites only its own line; the port given on the command line stays out."""
    path = tmp_path / "config.yaml"
    shutil.copy(fixture, path)
    before = path.read_text()
    api = serve(path)
    token = config_mod.load(path)["server"]["auth_token"]
    if token:
        api.http.headers["Authorization"] = f"Bearer {token}"
    config = api("GET", "/api/config").json()
    assert api("PUT", "/api/config", json=config).status_code == 200
    assert path.read_text() == before
    old_steps = config["generation"]["steps"]
    assert api("PUT", "/api/config/generation", json={"steps": 25}).status_code == 200
    assert changed_lines(before, path.read_text()) == [f"-  steps: {old_steps}", "+  steps: 25"]
    expected = config_mod.load(fixture).data
    expected["generation"]["steps"] = 25
    assert config_mod.load(path).data == expected


def test_the_model_list_is_read_only_when_model_name_changes(start_api, monkeypatch):
    """Listing the models folder can take a scan; a change of anything else never waits on it."""
    api = start_api(workers=False)
    asked: list[int] = []
    real = api.daemon.available_models
    monkeypatch.setattr(api.daemon, "available_models", lambda: asked.append(1) or real())
    assert api("PATCH", "/api/config", json={"generation": {"steps": 7}}).status_code == 200
    assert asked == []
    current = real()[0]
    assert api("PATCH", "/api/config", json={"model": {"name": current}}).status_code == 200
    assert asked == []  # unchanged: nothing to check
    assert_error(api("PATCH", "/api/config", json={"model": {"name": "nope"}}), 403, "model.name")
    assert asked == [1]
