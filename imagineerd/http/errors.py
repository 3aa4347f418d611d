"""One JSON error body for every error on /api/* (and OpenAI's on /v1/*).

Shape: ``{"error": "<message>", "code": "<machine code>", "status": <int>}`` plus ``field``
when one input is at fault. Domain errors carry their status; Falcon's own HTTP errors (404
route, 405 method, 413, ...) are serialized into the same shape; anything unexpected is
logged with its traceback and answered with a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from ..errors import ImagineerdError
from .security import redact_token

log = logging.getLogger("imagineerd.http")


def _text(value: str) -> str:
    # A message may quote client input; a lone surrogate in it (JSON allows "\udcff")
    # would make the error body itself unencodable, turning a 400 into a 500.
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": _text(message), "code": code, "status": status}
    if field is not None:
        body["field"] = _text(field)
    return body


def _code_for(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        411: "length_required",
        413: "payload_too_large",
        415: "unsupported_media_type",
        421: "misdirected_request",
        429: "too_many_requests",
        503: "unavailable",
    }.get(status, "error")


#: Routes that answer errors in OpenAI's shape (their clients parse no other).
OPENAI_PREFIX = "/v1/"


def openai_body(status: int, code: str, message: str, field: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {message, type, param, code}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": _text(message), "type": kind, "param": field, "code": code}}


def _body(req: falcon.Request, status: int, code: str, message: str, field: str | None = None):
    shape = openai_body if req.path.startswith(OPENAI_PREFIX) else error_body
    return shape(status, code, message, field)


def handle_domain_error(
    req: falcon.Request, resp: falcon.Response, ex: ImagineerdError, params: dict
) -> None:
    resp.status = ex.status
    resp.media = _body(req, ex.status, ex.code, ex.message, ex.field)


def serialize_http_error(
    req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError
) -> None:
    status = exception.status_code
    message = exception.description or exception.title or falcon.code_to_http_status(status)
    code = getattr(exception, "code", None) or _code_for(status)
    resp.media = _body(req, status, code, message)
    resp.content_type = falcon.MEDIA_JSON


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict
) -> None:
    if isinstance(ex, falcon.HTTPError | falcon.HTTPStatus):
        raise ex  # Falcon's own handlers deal with these
    log.exception("unexpected error on %s %s", req.method, redact_token(req.relative_uri))
    resp.status = 500
    resp.media = error_body(
        500, "internal_error", "internal server error; the server log has the details"
    )
