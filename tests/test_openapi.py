"""GET /api/openapi.json: a valid OpenAPI 3.1 document, generated from the parameter table,
that covers every route the README documents, served by the real server."""

from __future__ import annotations

import re
from pathlib import Path

from openapi_spec_validator import validate

from imagineerd import jobs
from imagineerd.http.openapi import document

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_routes() -> set[tuple[str, str]]:
    """``(method, path)`` of every row of the README's REST API table."""
    routes = set()
    for match in re.finditer(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/api/[^`? ]*)", README, re.M):
        method, path = match.groups()
        path = path.replace("<id>", "{job_id}").replace("<filename>", "{filename}")
        routes.add((method.lower(), path))
    return routes


def test_the_document_is_valid_openapi_and_the_job_schema_is_the_parameter_table():
    spec = document()
    validate(spec)
    request = spec["components"]["schemas"]["JobRequest"]
    assert set(request["properties"]) == set(jobs.PARAMS) | set(jobs.RECORD_ONLY)
    steps = request["properties"]["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (
        jobs.PARAMS["steps"].lo,
        jobs.PARAMS["steps"].hi,
    )
    assert request["properties"]["width"]["anyOf"][0]["multipleOf"] == 8
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False


def test_every_route_the_readme_documents_is_in_the_document():
    spec = document()
    routes = readme_routes()
    assert len(routes) >= 15
    missing = [(m, p) for m, p in routes if m not in spec["paths"].get(p, {})]
    assert not missing


def test_the_server_serves_it_behind_the_token(start_api):
    api = start_api(workers=False, server={"auth_token": "t0ken"})
    assert api("GET", "/api/openapi.json").status_code == 401
    response = api("GET", "/api/openapi.json", headers={"Authorization": "Bearer t0ken"})
    assert response.status_code == 200 and response.json() == document()
