"""Schemathesis over the live server from our own OpenAPI document: for requests generated
from every operation (valid and invalid, bounded in number), no 5xx, only documented status
codes and content types, and every answer matching its schema.

The server runs no worker (queued jobs stay queued) and the event stream is left out: it is
an endless response by design, tested in tests/test_http.py.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from imagineerd.http.openapi import document

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_no_request_from_the_document_gets_a_5xx_or_an_undocumented_answer(start_api):
    api = start_api(workers=False)
    schema = schemathesis.openapi.from_dict(document()).exclude(path="/api/events")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            statuses.append(case.call_and_validate(base_url=api.url, checks=CHECKS).status_code)

        call()
    # Many requests ran, and both kinds of answers were seen.
    assert len(statuses) >= 100 and {200, 400} <= set(statuses), sorted(set(statuses))
