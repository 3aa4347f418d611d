"""OpenAI's Images API (``/v1/``), driven by the official ``openai`` client against a real
server with the tiny model (64x64, 2 steps)."""

from __future__ import annotations

import base64
import io
import json
import time

import openai
import pytest
from openai import OpenAI
from PIL import Image

from imagineerd.http import openai_api

from .conftest import wait_for

TOKEN = "t0ken-for-openai"


def client_for(api, key: str = "no-token-needed", **kwargs) -> OpenAI:
    kwargs.setdefault("max_retries", 0)  # a retry must never hide a wrong first answer
    kwargs.setdefault("timeout", 120)
    return OpenAI(base_url=api.url + "/v1", api_key=key, **kwargs)


def png_record(data: bytes) -> tuple[Image.Image, dict]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, json.loads(image.info["imagineerd"])


def ready(api) -> None:
    """Wait until the worker has loaded its model and waits for work."""
    wait_for(lambda: api.daemon.health()["backend"]["state"] == "ready", timeout=120)


def test_n_images_come_back_as_pngs_with_consecutive_seeds_from_one_batch(start_api):
    api = start_api(performance={"max_batch": 4})
    ready(api)
    result = client_for(api).images.generate(
        prompt="  a red fox  ", n=4, size="64x64", model="dall-e-3", quality="hd", user="x"
    )
    assert isinstance(result.created, int) and abs(result.created - time.time()) < 300
    assert len(result.data) == 4
    records = []
    for item in result.data:
        assert item.url is None and item.revised_prompt == "a red fox"
        image, record = png_record(base64.b64decode(item.b64_json))
        assert image.format == "PNG" and image.size == (64, 64)
        assert record["source"] == "openai" and record["steps"] == 2
        records.append(record)
    seeds = [record["seed"] for record in records]
    assert seeds == [(seeds[0] + i) % 2**31 for i in range(4)]
    # Queued together, so the idle worker claimed them as one batch (they start at once).
    assert len({record["started_at"] for record in records}) == 1
    # OpenAI's model name stood for the configured default.
    assert {api.daemon.job(r["id"]).spec.model for r in records} == {
        api.daemon.config["model"]["name"]
    }


def test_url_format_and_extensions_behind_a_token(start_api):
    api = start_api(server={"auth_token": TOKEN})
    result = client_for(api, TOKEN).images.generate(
        prompt="a lighthouse",
        response_format="url",
        size="auto",
        extra_body={"seed": 42, "negative_prompt": "fog", "steps": 1},
    )
    (item,) = result.data
    assert item.b64_json is None
    assert item.url.startswith(api.url + "/api/outputs/") and item.url.endswith(".png")
    assert api("GET", item.url[len(api.url) :]).status_code == 401  # the token still guards
    got = api.http.get(item.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    image, record = png_record(got.content)
    assert image.size == (64, 64)  # "auto": the configured size
    assert (record["seed"], record["negative_prompt"], record["steps"]) == (42, "fog", 1)


def test_a_wrong_api_key_is_an_authentication_error(start_api):
    api = start_api(workers=False, server={"auth_token": TOKEN})
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(api, "wrong").images.generate(prompt="a cat", size="64x64")
    assert caught.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client_for(api, "wrong").models.list()
    assert [m.id for m in client_for(api, TOKEN).models.list()] == ["default"]
    assert api.daemon.list_jobs()["queued"] == []


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"size": "65x64"}, "size", "divisible by 8"),
        ({"size": "4096x4096"}, "size", "from 64 to 2048"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 11}, "n", "from 1 to 10"),
        ({"n": 0}, "n", "from 1 to 10"),
        ({"response_format": "png"}, "response_format", "b64_json"),
        ({"model": "nobody-has-this"}, "model", "nobody-has-this"),
        ({"extra_body": {"steps": 0}}, "steps", "steps must be"),
        ({"extra_body": {"seed": "abc"}}, "seed", "seed"),
        ({"extra_body": {"colour": "red"}}, "colour", "unknown field"),
        ({"extra_body": {"width": 64}}, "size", "not both"),
        ({"extra_body": {"init_image": "x"}}, "init_image", "/api/generate"),
        ({"extra_body": {"stream": True}}, "stream", "stream"),
    ],
)
def test_bad_input_is_a_bad_request_naming_the_parameter(start_api, kwargs, param, words):
    api = start_api(workers=False)
    kwargs.setdefault("size", "64x64")
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(api).images.generate(prompt="a cat", **kwargs)
    error = caught.value
    assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error")
    assert words in error.message
    assert api.daemon.list_jobs()["queued"] == []


def test_a_blank_prompt_names_prompt(start_api):
    api = start_api(workers=False)
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(api).images.generate(prompt="   ", size="64x64")
    assert caught.value.param == "prompt"


def test_models_lists_default_and_the_checkpoints(start_api, model_files, monkeypatch):
    api = start_api(workers=False, paths={"models": str(model_files)})
    client = client_for(api)
    models = client.models.list()
    assert [m.id for m in models] == ["default", "alpha", "beta", "xl/gamma"]
    assert {(m.object, m.owned_by, m.created) for m in models} == {("model", "imagineerd", 0)}
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nobody")
    assert caught.value.param == "model"
    # A listed checkpoint is a model a generation may name: checked, then queued.
    monkeypatch.setattr(openai_api, "WAIT_SECONDS", 0.2)
    with pytest.raises(openai.APIStatusError) as waited:
        client.images.generate(prompt="a cat", model="xl/gamma", size="64x64")
    assert waited.value.status_code == 504
    (queued,) = api.daemon.list_jobs()["queued"]
    assert queued["model"] == "xl/gamma"


def test_a_failing_job_answers_an_error_at_once_and_is_not_retried(start_api, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = start_api(model={"name": "nobody/missing"})
    client = client_for(api, max_retries=2)  # the clients' default: the server says no
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="a cat", n=2, size="64x64")
    assert time.monotonic() - started < 60
    error = caught.value
    assert error.status_code == 500 and error.code == "job_failed"
    assert "2 of 2 images could not be made" in error.message
    assert "nobody/missing" in error.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(error.body["job_ids"]) == 2
    assert len(api.daemon.list_jobs()["history"]) == 2  # no retry queued them again


def test_a_call_that_waits_too_long_is_a_504_naming_the_jobs(start_api, monkeypatch):
    monkeypatch.setattr(openai_api, "WAIT_SECONDS", 0.5)
    api = start_api(workers=False)  # nothing takes the jobs
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(api, max_retries=2).images.generate(prompt="a cat", n=3, size="64x64")
    error = caught.value
    assert error.status_code == 504 and error.code == "timeout"
    ids = error.body["job_ids"]
    queued = [job["id"] for job in api.daemon.list_jobs()["queued"]]
    assert queued == ids and len(ids) == 3  # still queued, and not queued again by a retry
    assert all(str(job_id) in error.message for job_id in ids)


def test_errors_outside_the_client_keep_openais_shape(start_api):
    api = start_api(workers=False)

    def error_of(response, status: int) -> dict:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) >= {"message", "type", "param", "code"}
        return body

    error_of(api("GET", "/v1/images/generations"), 405)
    assert api("GET", "/v1/images/generations").headers["Allow"] == "POST"
    error_of(api("POST", "/v1/models", json={}), 405)
    error_of(api("GET", "/v1/chat/completions"), 404)
    error_of(api("POST", "/v1/images/generations", data="{", headers=_json()), 400)
    error_of(api("POST", "/v1/images/generations", json=[1]), 400)
    error_of(api("POST", "/v1/images/generations", data="{}", headers=_json("text/plain")), 415)
    error_of(api("POST", "/v1/images/generations", data='{"prompt": "x"}'), 415)
    other_site = {**_json(), "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    error_of(api("POST", "/v1/images/generations", data='{"prompt": "x"}', headers=other_site), 403)
    assert api.daemon.list_jobs()["queued"] == []


def _json(ctype: str = "application/json") -> dict[str, str]:
    return {"Content-Type": ctype}
