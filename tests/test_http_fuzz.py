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
from imagineerd.jobs import PARAMETERS

# Every real field, plus names a client might guess wrong (they must be refused as unknown).
FIELDS = [*PARAMETERS, "sampler", "model", ""]

# JSON may carry lone surrogates ("\udcff"): they parse to str that cannot be encoded.
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True)
    | st.text(max_size=50)
    | st.tuples(st.text(max_size=5), surrogates, st.text(max_size=5)).map("".join)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
objects = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10) | surrogates, values, max_size=8
)
bodies = objects | values  # non-objects too


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    from imagineerd import config as config_mod

    from .conftest import write_config

    # Falcon's test client sends "Host: falconframework.org"; the server answers only its
    # own names (421 otherwise), so that one is listed.
    config = config_mod.load(
        write_config(
            tmp_path_factory.mktemp("fuzz"),
            tiny_model,
            server={"allowed_hosts": [falcon.testing.helpers.DEFAULT_HOST]},
        )
    )
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


ROUTES = [
    "/api/generate",
    "/api/jobs",
    "/api/jobs/{}",
    "/api/jobs/{}/interrupt",
    "/api/config",
    "/api/config/generation",
    "/api/outputs",
    "/api/outputs/{}",
    "/api/outputs/delete",
    "/api/outputs/restore",
    "/api/outputs/zip",
    "/api/outputs/{}/{}",
    "/api/trash",
    "/api/health",
    "/api/options",
    "/api/models",
    "/api/models/refresh",
    "/api/{}",
    "/{}",
    "/api/jobs/{}/{}",
    "/api/session",
]
segment = st.one_of(
    st.integers(-5, 10**20).map(str),
    # ids no job can have: past SQLite's 64 bits, negative, fractional, absurdly long
    st.integers(2**63 - 2, 2**80).map(str),
    st.integers(-(2**70), -1).map(str),
    st.floats(allow_nan=True).map(str),
    st.integers(20, 5000).map(lambda n: "9" * n),
    st.text(st.characters(codec="utf-8", exclude_characters="/?#"), max_size=20),
    st.binary(max_size=12).map(lambda b: "".join(f"%{c:02X}" for c in b)),
    st.sampled_from(
        [
            "..",
            "%2e%2e",
            "..%2F..%2Fconfig.yaml",
            ".hidden.png",
            "x.png",
            "%00",
            "a%2Fb.png",
            "1",
            "999999",
        ]
    ),
)
queries = st.dictionaries(
    st.sampled_from(
        ["limit", "before", "thumb", "token", "last_event_id", "x", "", "q", "since", "favourite"]
    ),
    st.one_of(st.integers(-10, 10**6).map(str), st.text(max_size=12)),
    max_size=3,
)
headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Authorization",
            "If-None-Match",
            "Last-Event-ID",
            "Origin",
            "Accept",
            "X-Forwarded-For",
            "Sec-Fetch-Site",
            "Cookie",
            "Host",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=4,
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    route=st.sampled_from(ROUTES),
    parts=st.lists(segment, min_size=2, max_size=2),
    query=queries,
    head=headers,
    body=st.one_of(
        st.none(), st.binary(max_size=300), bodies.map(lambda b: json.dumps(b).encode())
    ),
)
def test_every_route_never_5xx(client, method, route, parts, query, head, body):
    path = route.format(*parts)
    if not path.startswith("/") or "?" in path or "#" in path or path == "/api/events":
        return  # an event stream never ends; its one parameter is checked in test_http
    response = client.simulate_request(method, path, params=query, headers=head, body=body)
    assert response.status_code < 500, (method, path, query, head, response.text)
    if path.startswith("/api/") and response.status_code >= 400 and method != "HEAD":
        body = response.json
        assert set(body) <= {"error", "code", "status", "field"}, body
        assert body["status"] == response.status_code


NESTED = [
    b"[" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"prompt": "x", "seed": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}",
]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/generate"),
        ("PUT", "/api/config"),
        ("PATCH", "/api/config"),
        ("PUT", "/api/config/generation"),
        ("POST", "/api/session"),
    ],
)
def test_deeply_nested_json_is_400(client, method, path):
    for body in NESTED:
        response = client.simulate_request(
            method, path, body=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (path, len(body), response.text)
        assert response.json["status"] == response.status_code


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "\udcff"},
        {"prompt": "ok", "negative_prompt": "a\ud800b"},
        {"\udcff": 1, "prompt": "x"},
        {"prompt": "x", "scheduler": "\udfff"},
        {"token": "\udcff"},
        {"steps": "\udcff"},
    ],
)
def test_lone_surrogates_are_refused_not_crashed_on(client, body):
    text = json.dumps(body)  # ASCII, with \udcff escapes: valid JSON
    for method, path in [
        ("POST", "/api/generate"),
        ("PUT", "/api/config/generation"),
        ("POST", "/api/session"),
        ("PATCH", "/api/config"),
    ]:
        response = client.simulate_request(
            method, path, body=text, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (method, path, response.text)
        assert "lone surrogate" in response.json["error"], (method, path, response.json)


def test_fuzzed_server_is_still_healthy(client):
    assert client.simulate_get("/api/health").json["status"] == "ok"
    ok = client.simulate_post("/api/generate", json={"prompt": "still fine"})
    assert ok.status_code == 201
