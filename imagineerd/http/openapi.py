"""``GET /api/openapi.json``: an OpenAPI 3.1 description of every ``/api`` route.

The job's request schema is generated from ``jobs.PARAMS``, the table the validator, config
and README read, so the bounds are written once; the routes and their answers are listed
here beside the resources that serve them. Response schemas say what each answer
certainly holds and leave room for more (``additionalProperties``), as a client should read
them; every error is the one error shape of ``errors.py``.
"""

from __future__ import annotations

from typing import Any

import falcon

from .. import __version__, jobs
from ..gallery_index import MAX_FILES, MAX_ZIP_BYTES, MAX_ZIPS, SOURCES

JSON = "application/json"
ERROR_CODES = ("400", "401", "403", "404", "405", "409", "410", "413", "415", "421", "503")


def _param_schema(param: jobs.Param) -> dict[str, Any]:
    """One job field as JSON Schema, from its row in the parameter table."""
    kind = param.kind
    if kind in ("text", "name", "url"):
        return {"type": "string", "maxLength": param.max_length}
    if kind == "int":
        schema: dict[str, Any] = {"type": "integer", "minimum": param.lo, "maximum": param.hi}
        if param.multiple_of > 1:
            schema["multipleOf"] = param.multiple_of
        return schema
    if kind == "float":
        return {"type": "number", "minimum": param.lo, "maximum": param.hi}
    if kind == "choice":
        return {
            "type": "string",
            "description": "a scheduler id, or its A1111 label: "
            + ", ".join(f"{k} ({v})" for k, v in jobs.SCHEDULERS.items()),
        }
    if kind == "option":
        return {"type": "string", "enum": list(param.choices)}
    if kind == "image":
        return {
            "type": "string",
            "description": "a data: URL or base64 of a PNG, JPEG or WebP, an output's file "
            "name, or sha256:<hex> of a stored input",
        }
    if kind == "loras":
        lo, hi = jobs.LORA_WEIGHT
        return {
            "type": "array",
            "maxItems": jobs.LORAS_MAX,
            "items": {
                "anyOf": [
                    {"type": "string", "description": "name or name:weight"},
                    {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "maxLength": jobs.NAME_MAX},
                            "weight": {"type": "number", "minimum": lo, "maximum": hi},
                        },
                        "additionalProperties": False,
                    },
                ]
            },
        }
    if kind == "hires":
        lo, hi = jobs.HIRES_SCALE
        return {
            "anyOf": [
                {"type": "boolean"},
                {
                    "type": "object",
                    "properties": {
                        "scale": {"type": "number", "minimum": lo, "maximum": hi},
                        "steps": {"type": "integer", "minimum": 0, "maximum": 150},
                        "denoising_strength": {"type": "number", "minimum": 0, "maximum": 1},
                        "upscaler": {"type": "string", "enum": list(jobs.UPSCALERS)},
                    },
                    "additionalProperties": False,
                },
            ]
        }
    raise ValueError(f"no schema for parameter kind {kind!r}")


def job_request_schema() -> dict[str, Any]:
    properties = {}
    for name, param in jobs.PARAMS.items():
        schema = _param_schema(param)
        schema.setdefault("description", param.rule())
        properties[name] = schema
    for name, schema in properties.items():
        if name != "prompt" and "anyOf" not in schema:
            # An explicit null means "the default", for every optional field.
            properties[name] = {"anyOf": [schema, {"type": "null"}]}
    properties["prompt"]["minLength"] = 1
    # The record-only keys of a PNG's imagineerd chunk are accepted and ignored.
    properties.update({key: {} for key in sorted(jobs.RECORD_ONLY)})
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": properties,
        "additionalProperties": False,
    }


def _object(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": properties,
        "additionalProperties": True,
    }


def _answer(description: str, schema: dict[str, Any] | None = None, **extra: Any) -> dict:
    answer: dict[str, Any] = {"description": description, **extra}
    if schema is not None:
        answer["content"] = {JSON: {"schema": schema}}
    return answer


def _errors() -> dict[str, Any]:
    """Every error status an operation may answer, all in the one error shape."""
    return {code: {"$ref": "#/components/responses/Error"} for code in ERROR_CODES}


def _operation(
    summary: str,
    ok: tuple[str, dict[str, Any]],
    *,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
    parameters: list[dict[str, Any]] | None = None,
    security: bool = True,
) -> dict[str, Any]:
    status, answer = ok
    responses = {status: answer}
    responses.update(_errors())
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {JSON: {"schema": body}},
        }
    if not security:
        operation["security"] = [{}]
    return operation


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    job = _object(
        ("id", "status"),
        id={"type": "integer"},
        status={"enum": list(jobs.STATUSES)},
        node={"type": "string", "description": "the node (queue.node_name) that ran it"},
        stopped={
            "type": "boolean",
            "description": "interrupted while it ran (it ended cancelled), not taken out of "
            "the queue",
        },
        output_file={
            "type": "string",
            "description": "a completed job's image as /api/outputs/{filename} serves it",
        },
    )
    queue_state = _object(
        ("paused", "since", "by"),
        paused={"type": "boolean"},
        since={"type": ["string", "null"], "description": "when it was paused"},
        by={"type": ["string", "null"], "description": "the node that paused it"},
    )
    ids = {"type": "array", "items": {"type": "integer"}}
    move_body = {
        "type": "object",
        "required": ["to"],
        "properties": {
            "to": {
                "anyOf": [
                    {"type": "string", "enum": ["top", "up", "down"]},
                    {"type": "integer", "minimum": 1, "description": "a 1-based place"},
                ]
            }
        },
        "additionalProperties": False,
    }
    png_info = _object(
        ("format", "parameters", "extra", "infotext"),
        format={"enum": ["imagineerd", "a1111", "comfyui", None]},
        parameters={
            "type": "object",
            "description": "job fields, as POST /api/generate takes them",
            "additionalProperties": True,
        },
        extra={"type": "object", "additionalProperties": True},
        infotext={"type": ["string", "null"]},
    )
    job_id = [_path_param("job_id", {"type": "integer", "minimum": 1})]
    filename = [_path_param("filename", {"type": "string"})]
    names = {"type": "array", "items": {"type": "string"}}
    failed = {
        "type": "array",
        "items": _object(
            ("filename", "error", "status"),
            filename={"type": "string"},
            error={"type": "string", "description": "the cause, as an error would say it"},
            status={
                "type": "integer",
                "enum": [409, 503],
                "description": "409: the server's folders must change first; 503: try again",
            },
        ),
    }
    files_body = {
        "type": "object",
        "required": ["files"],
        "properties": {
            "files": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_FILES,
                "description": "image names, as the gallery lists them",
            }
        },
        "additionalProperties": False,
    }
    entry = _object(
        ("filename", "favourite"),
        filename={"type": "string"},
        url={"type": "string"},
        favourite={"type": "boolean"},
        created={"type": "string"},
    )
    anything = {"type": "object", "additionalProperties": True}
    config_body = {"type": "object", "additionalProperties": True}
    paths = {
        "/api/generate": {
            "post": _operation(
                "queue a job",
                (
                    "201",
                    _answer(
                        "queued",
                        _object(
                            ("id", "status", "submitted_at", "queue_position", "prompt", "seed"),
                            id={"type": "integer"},
                            status={"type": "string"},
                            submitted_at={"type": "string"},
                            queue_position={"type": "integer"},
                            prompt={"type": "string"},
                            seed={"type": "integer"},
                        ),
                        headers={"Location": {"schema": {"type": "string"}}},
                    ),
                ),
                body={"$ref": "#/components/schemas/JobRequest"},
            )
        },
        "/api/jobs": {
            "get": _operation(
                "the running job, the queue and finished jobs",
                (
                    "200",
                    _answer(
                        "one snapshot",
                        _object(
                            ("running", "queued", "history", "next_before"),
                            running={"type": "array", "items": job},
                            queued={"type": "array", "items": job},
                            history={"type": "array", "items": job},
                            next_before={"type": ["integer", "null"]},
                            queue_paused={"type": "boolean"},
                        ),
                    ),
                ),
                parameters=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size"),
                    _query("before", {"type": "integer", "minimum": 1}, "next_before of a page"),
                ],
            )
        },
        "/api/jobs/{job_id}": {
            "get": _operation("a job", ("200", _answer("the job", job)), parameters=job_id),
            "delete": _operation(
                "cancel a queued job",
                ("200", _answer("cancelled", _object(("message",), message={"type": "string"}))),
                parameters=job_id,
            ),
        },
        "/api/jobs/{job_id}/interrupt": {
            "post": _operation(
                "stop a running job at its next step",
                ("202", _answer("stopping", job)),
                parameters=job_id,
                body=anything,
                body_required=False,
            )
        },
        "/api/jobs/{job_id}/move": {
            "post": _operation(
                "move a queued job: to the top, one place up or down, or to a place",
                (
                    "200",
                    _answer(
                        "moved (published as job.moved)",
                        {
                            "allOf": [
                                job,
                                _object(
                                    ("move",),
                                    move=_object(
                                        ("from", "to", "first", "order"),
                                        **{
                                            "from": {"type": "integer"},
                                            "to": {"type": "integer"},
                                            "first": {"type": "integer"},
                                            "order": ids,
                                        },
                                    ),
                                ),
                            ]
                        },
                    ),
                ),
                parameters=job_id,
                body=move_body,
            )
        },
        "/api/queue": {
            "get": _operation("whether the queue is paused", ("200", _answer("state", queue_state)))
        },
        "/api/queue/pause": {
            "post": _operation(
                "pause the queue (running jobs finish; no worker of any node takes more)",
                ("200", _answer("paused (published as queue.paused)", queue_state)),
                body=anything,
                body_required=False,
            )
        },
        "/api/queue/resume": {
            "post": _operation(
                "resume the queue",
                ("200", _answer("resumed (published as queue.resumed)", queue_state)),
                body=anything,
                body_required=False,
            )
        },
        "/api/png-info": {
            "post": {
                **_operation(
                    "the generation parameters a PNG carries (ours, A1111's, ComfyUI's)",
                    ("200", _answer("what was found, in job field names", png_info)),
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                        JSON: {
                            "schema": _object(
                                ("image",),
                                image={
                                    "type": "string",
                                    "description": "the PNG as base64 or a data: URL",
                                },
                            )
                        },
                    },
                },
            }
        },
        "/api/config": {
            "get": _operation("the saved configuration", ("200", _answer("config", anything))),
            "put": _operation(
                "replace the configuration",
                ("200", _answer("saved", anything)),
                body=config_body,
            ),
            "patch": _operation(
                "change some settings", ("200", _answer("saved", anything)), body=config_body
            ),
        },
        "/api/config/generation": {
            "put": _operation(
                "change generation defaults",
                ("200", _answer("saved", anything)),
                body=config_body,
            )
        },
        "/api/outputs": {
            "get": _operation(
                "images, newest first, from the gallery index (with filters)",
                (
                    "200",
                    _answer(
                        "a page",
                        _object(
                            ("outputs", "next_before"),
                            outputs={"type": "array", "items": entry},
                            next_before={"type": ["string", "null"]},
                        ),
                    ),
                ),
                parameters=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size"),
                    _query("before", {"type": "string"}, "next_before of a page"),
                    _query("q", {"type": "string"}, "a part of the prompt (case does not matter)"),
                    _query("model", {"type": "string"}, "the model, as the entries name it"),
                    _query(
                        "source",
                        {"type": "string", "enum": list(SOURCES)},
                        "where the job came from",
                    ),
                    _query("favourite", {"type": "boolean"}, "only favourites, or only others"),
                    _query(
                        "width", {"type": "integer", "minimum": 1, "maximum": 65535}, "exact width"
                    ),
                    _query(
                        "height",
                        {"type": "integer", "minimum": 1, "maximum": 65535},
                        "exact height",
                    ),
                    _query(
                        "since",
                        {"type": "string"},
                        "created at or after: an ISO date or date and time (local time)",
                    ),
                    _query(
                        "until",
                        {"type": "string"},
                        "created at or before: an ISO date (the whole day) or date and time",
                    ),
                ],
            )
        },
        "/api/outputs/delete": {
            "post": _operation(
                "move images to the trash",
                (
                    "200",
                    _answer(
                        "what was moved, what was not found, and what the file system would "
                        "not move (each left where it was, with why)",
                        _object(
                            ("trashed", "missing", "failed", "purge_after"),
                            trashed=names,
                            missing=names,
                            failed=failed,
                            purge_after={"type": ["string", "null"]},
                        ),
                    ),
                ),
                body=files_body,
            )
        },
        "/api/outputs/restore": {
            "post": _operation(
                "move images back out of the trash (never over a file of the same name)",
                (
                    "200",
                    _answer(
                        "what came back; missing: not in the trash; conflicts: a file has that "
                        "name again (the image stays in the trash); failed: the file system "
                        "would not move it back (it stays in the trash)",
                        _object(
                            ("restored", "missing", "conflicts", "failed"),
                            restored=names,
                            missing=names,
                            conflicts=names,
                            failed=failed,
                        ),
                    ),
                ),
                body=files_body,
            )
        },
        "/api/outputs/zip": {
            "post": _operation(
                "the images as one zip file (stored, not compressed); 413 past "
                f"{MAX_ZIP_BYTES // 1024**3} GiB of images, 503 while {MAX_ZIPS} zips are "
                "being built",
                (
                    "200",
                    {
                        "description": "an attachment, imagineerd-images.zip",
                        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                        "content": {
                            "application/zip": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                ),
                body=files_body,
            )
        },
        "/api/outputs/{filename}": {
            "get": {
                "summary": "an image (PNG), or a JPEG thumbnail",
                "parameters": [
                    _path_param("filename", {"type": "string"}),
                    _query("thumb", {"type": "integer", "enum": [128, 256, 512]}, "thumbnail"),
                ],
                "responses": {
                    "200": {
                        "description": "the image",
                        "content": {"image/png": {}, "image/jpeg": {}},
                    },
                    "304": {"description": "not modified"},
                    **_errors(),
                },
            },
            "patch": _operation(
                "mark an image a favourite, or not",
                ("200", _answer("its entry", entry)),
                parameters=filename,
                body={
                    "type": "object",
                    "required": ["favourite"],
                    "properties": {"favourite": {"type": "boolean"}},
                    "additionalProperties": False,
                },
            ),
            "delete": _operation(
                "move an image to the trash; 409 or 503 (naming the cause) when the file "
                "system will not move it",
                (
                    "200",
                    _answer(
                        "moved; restorable until purge_after",
                        _object(
                            ("trashed", "purge_after"),
                            trashed=names,
                            purge_after={"type": "string"},
                        ),
                    ),
                ),
                parameters=filename,
            ),
        },
        "/api/trash": {
            "get": _operation(
                "the images in the trash, the last trashed first",
                (
                    "200",
                    _answer(
                        "the trash",
                        _object(
                            ("trashed",),
                            trashed={
                                "type": "array",
                                "items": _object(
                                    ("filename", "trashed_at", "purge_after"),
                                    filename={"type": "string"},
                                    trashed_at={"type": "string"},
                                    purge_after={"type": "string"},
                                ),
                            },
                        ),
                    ),
                ),
                parameters=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 5000}, "how many")
                ],
            )
        },
        "/api/models": {
            "get": _operation(
                "the models folder",
                (
                    "200",
                    _answer(
                        "the listing",
                        _object(
                            ("checkpoints", "loras", "embeddings", "vaes", "default"),
                            checkpoints={"type": "array", "items": anything},
                            loras={"type": "array", "items": anything},
                            embeddings={"type": "array", "items": anything},
                            vaes={"type": "array", "items": anything},
                            default={"type": "string"},
                        ),
                    ),
                ),
            )
        },
        "/api/models/refresh": {
            "post": _operation(
                "rescan the models folder",
                ("200", _answer("the new listing", anything)),
                body=anything,
                body_required=False,
            )
        },
        "/api/options": {
            "get": _operation("what a form needs", ("200", _answer("options", anything)))
        },
        "/api/health": {
            "get": _operation(
                "status and counts (details with the token)",
                (
                    "200",
                    _answer(
                        "health",
                        _object(
                            ("status", "queue_size", "current_job", "total_completed"),
                            status={"type": "string"},
                            queue_size={"type": "integer"},
                            current_job={"type": "boolean"},
                            total_completed={"type": "integer"},
                            boot_id={"type": "string", "description": "new at each start"},
                            queue_paused={"type": "boolean", "description": "with the token"},
                            node={"type": "string"},
                            nodes={
                                "type": "array",
                                "description": "every node of the queue (with the token)",
                                "items": _object(
                                    ("name", "state"),
                                    name={"type": "string"},
                                    state={"type": "string"},
                                    devices={"type": "array"},
                                    last_heartbeat={"type": "string"},
                                ),
                            },
                        ),
                    ),
                ),
                security=False,
            )
        },
        "/api/session": {
            "get": _operation(
                "whether a token is needed and held",
                ("200", _answer("state", anything)),
                security=False,
            ),
            "post": _operation(
                "log in with the token (sets a session cookie)",
                ("200", _answer("logged in", anything)),
                body=_object(("token",), token={"type": "string"}),
                security=False,
            ),
            "delete": _operation("log out", ("200", _answer("logged out", anything))),
        },
        "/api/events": {
            "get": {
                "summary": "Server-Sent Events (job and model state, progress)",
                "responses": {
                    "200": {"description": "an event stream", "content": {"text/event-stream": {}}},
                    **_errors(),
                },
            }
        },
        "/api/webhooks/deliveries": {
            "get": _operation(
                "the latest webhook deliveries, newest first",
                (
                    "200",
                    _answer(
                        "deliveries",
                        _object(("deliveries",), deliveries={"type": "array", "items": anything}),
                    ),
                ),
                parameters=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "how many")
                ],
            )
        },
        "/api/openapi.json": {
            "get": _operation("this document", ("200", _answer("OpenAPI 3.1", anything)))
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagineerd",
            "version": __version__,
            "description": "A self-hosted image-generation daemon: a durable job queue over "
            "Hugging Face diffusers. See the README for what each field does.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "JobRequest": job_request_schema(),
                "Error": _object(
                    ("error", "code", "status"),
                    error={"type": "string"},
                    code={"type": "string"},
                    status={"type": "integer"},
                    field={"type": "string"},
                ),
            },
            "responses": {
                "Error": _answer(
                    "an error, in the one error shape", {"$ref": "#/components/schemas/Error"}
                )
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "the token as password",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": "imagineerd_session"},
            },
        },
        "security": [{"bearer": []}, {"basic": []}, {"session": []}, {}],
    }


class OpenApi:
    """``GET /api/openapi.json``."""

    def __init__(self) -> None:
        self._document = document()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._document
