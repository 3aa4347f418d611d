"""Property-based: random JSON bodies never make the API answer 5xx.

Falcon's TestClient drives the very app Waitress serves (same middleware, same handlers),
in-process, so hypothesis can try hundreds of bodies in seconds.
"""

from __future__ import annotations

import json

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagineerd.daemon import Daemon
from imagineerd.http import create_app

FIELDS = [
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "width",
    "height",
    "guidance_scale",
    "scheduler",
    "sampler",
    "model",
    "",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True)
    | st.text(max_size=50)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=8)
bodies = objects | values  # non-objects too


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    from imagineerd import config as config_mod

    from .conftest import write_config

    config = config_mod.load(write_config(tmp_path_factory.mktemp("fuzz"), tiny_model))
    daemon = Daemon(config)
    daemon.start(workers=False)
    yield falcon.testing.TestClient(create_app(daemon, config))
    daemon.stop()


def check(response, ok: int) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != ok:
        assert 400 <= response.status_code < 500
        body = response.json
        assert isinstance(body["error"], str) and body["status"] == response.status_code


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=bodies)
def test_generate_never_5xx(client, body):
    text = json.dumps(body, allow_nan=True)
    check(
        client.simulate_post(
            "/api/generate", body=text, headers={"Content-Type": "application/json"}
        ),
        201,
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    body=st.dictionaries(
        st.sampled_from(
            ["steps", "guidance_scale", "negative_prompt", "width", "height", "scheduler", "seed"]
        ),
        values,
        max_size=4,
    )
    | bodies
)
def test_config_generation_never_5xx(client, body):
    check(
        client.simulate_put(
            "/api/config/generation",
            body=json.dumps(body, allow_nan=True),
            headers={"Content-Type": "application/json"},
        ),
        200,
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_5xx(client, raw):
    check(
        client.simulate_post(
            "/api/generate", body=raw, headers={"Content-Type": "application/json"}
        ),
        201,
    )
