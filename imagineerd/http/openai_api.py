"""OpenAI's Images API in front of the queue, so OpenAI's own clients (and every tool built
on them) can use imagineerd by changing the base URL.

- ``POST /v1/images/generations``: ``n`` jobs with consecutive seeds, queued together so
  they batch; the call waits until they finish and answers OpenAI's shape
  ``{"created", "data": [{"b64_json" | "url", "revised_prompt"}]}``.
- ``GET /v1/models`` (and ``/v1/models/<id>``): ``default`` and the listed checkpoints.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, because
that is what the clients read: ``param`` names the field at fault and becomes the
exception's ``.param``. The token is checked by ``BearerAuth`` before any of this runs.

Written by hand: this is a thin translation onto :meth:`Daemon.submit_spec` and the event
bus; no library maps OpenAI's API onto another queue.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import falcon

from .. import jobs
from ..checks import SEED_MAX
from ..daemon import Daemon
from ..errors import ImagineerdError, NotFound, ValidationError
from ..events import Subscription
from ..jobs import COMPLETED, Job
from .resources import read_json_object

log = logging.getLogger(__name__)

#: How long one call waits for its images. Below the OpenAI clients' default read timeout
#: (600 s), so a long queue gets our 504 naming the jobs instead of a client-side timeout,
#: which the clients retry: each retry would queue the images again.
WAIT_SECONDS = 570.0
MAX_IMAGES = 10
#: Accepted for compatibility and ignored: they steer OpenAI's models, not ours.
IGNORED = (
    "quality",
    "style",
    "user",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "partial_images",
)
#: OpenAI's own model names; a client that sends one (most do) gets the default model.
OPENAI_MODEL = re.compile(r"(dall-e|gpt-image|chatgpt-image)", re.IGNORECASE)
SIZE = re.compile(r"(\d{1,5})[xX](\d{1,5})")
FINISHED_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled"})


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        # A message may quote client input; a lone surrogate would make the body unencodable.
        text = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        error = {"message": text, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}


def _as_openai(ex: Exception) -> OpenAIError:
    if isinstance(ex, OpenAIError):
        return ex
    if isinstance(ex, ImagineerdError):
        return OpenAIError(ex.status, ex.message, param=ex.field, code=ex.code)
    if isinstance(ex, falcon.HTTPError):
        message = ex.description or ex.title or falcon.code_to_http_status(ex.status_code)
        headers = dict(ex.headers or {})
        return OpenAIError(ex.status_code, message, code=_slug(ex.title), headers=headers)
    log.exception("unexpected error in the OpenAI API")
    return OpenAIError(500, "internal server error; the server log has the details")


def _slug(title: str | None) -> str | None:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") if title else None


def render(resp: falcon.Response, error: OpenAIError) -> None:
    resp.status = error.status
    resp.media = error.body()
    for name, value in error.headers.items():
        resp.set_header(name, value)
    if error.status != 429:
        # The clients retry 5xx (and 408, 409) twice by default: for a generation that
        # would queue the images again, and a bad request stays bad. 429 is worth a retry.
        resp.set_header("x-should-retry", "false")


def openai_errors(responder: Callable[..., None]) -> Callable[..., None]:
    """Answer every error of ``responder`` in OpenAI's shape (never the /api one)."""

    @functools.wraps(responder)
    def wrapped(self: Any, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        try:
            responder(self, req, resp, **params)
        except Exception as ex:  # noqa: BLE001 - each kind is mapped in _as_openai
            render(resp, _as_openai(ex))

    return wrapped


def _method_not_allowed(allowed: str) -> Callable[..., None]:
    @openai_errors
    def responder(self: Any, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        raise OpenAIError(
            405,
            f"{req.method} is not allowed here; use {allowed}",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )

    return responder


class ImageGenerations:
    """``POST /v1/images/generations``."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        server = daemon.config["server"]
        # Each call holds a request thread while it waits, like an event stream: leave
        # threads for the rest of the API (event streams take at most threads - 2).
        streams = min(server["max_event_streams"], server["threads"] - 2)
        self.max_waiting = max(1, (server["threads"] - streams) // 2)
        self._waiting = threading.BoundedSemaphore(self.max_waiting)

    on_get = on_put = on_patch = on_delete = _method_not_allowed("POST")

    @openai_errors
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json_object(req)
        data, n, response_format, size_given = self._read(body)
        try:
            first = self.daemon.validate(data)
        except ValidationError as ex:
            # A size we turned into width and height is the client's "size".
            field = "size" if size_given and ex.field in ("width", "height") else ex.field
            raise OpenAIError(400, ex.message, param=field, code=ex.code) from None
        # Consecutive seeds, as A1111's batch count does: image i is seed + i, so any one
        # of them can be re-run alone.
        specs = [
            dataclasses.replace(first, seed=(first.seed + i) % (SEED_MAX + 1)) for i in range(n)
        ]
        if not self._waiting.acquire(blocking=False):
            raise OpenAIError(
                429,
                f"{self.max_waiting} image requests are already waiting for their images; "
                "try again when one has finished",
                code="too_many_waiting",
                type="requests",
                headers={"Retry-After": "5"},
            )
        try:
            with self.daemon.events.subscribe() as events:
                queued = self._submit(specs)
                finished = self._wait(events, [job.id for job in queued])
        finally:
            self._waiting.release()
        resp.media = {
            "created": int(time.time()),
            "data": [self._image(req, job, response_format) for job in finished],
        }

    # -- the request -------------------------------------------------------------------
    def _read(self, body: dict[str, Any]) -> tuple[dict[str, Any], int, str, bool]:
        """The job fields (our validator checks them), ``n``, the response format and
        whether ``size`` set the width and height."""
        data = dict(body)
        for name in IGNORED:
            data.pop(name, None)
        if data.pop("stream", None) not in (None, False):
            raise OpenAIError(400, "streaming is not supported; leave out stream", param="stream")
        for name in ("init_image", "mask"):
            if name in data:
                raise OpenAIError(
                    400,
                    f"{name} is not taken here (text to image only); "
                    "POST /api/generate takes image inputs",
                    param=name,
                    code="unknown_field",
                )
        n = data.pop("n", None)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise OpenAIError(
                400, f"n must be a whole number from 1 to {MAX_IMAGES}, got {n!r}", param="n"
            )
        response_format = data.pop("response_format", None) or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise OpenAIError(
                400,
                f"response_format must be 'b64_json' or 'url', got {response_format!r}",
                param="response_format",
            )
        size = data.pop("size", None)
        size_given = size not in (None, "auto")
        if size_given:
            if "width" in data or "height" in data:
                raise OpenAIError(400, "give size or width and height, not both", param="size")
            data["width"], data["height"] = self._size(size)
        model = self._model(data.pop("model", None))
        if model:
            data["model"] = model
        return data, n, response_format, size_given

    @staticmethod
    def _size(size: Any) -> tuple[int, int]:
        bounds = jobs.limits()["width"]
        lo, hi, step = bounds["min"], bounds["max"], bounds.get("multiple_of", 1)
        match = SIZE.fullmatch(size) if isinstance(size, str) else None
        if match:
            width, height = int(match.group(1)), int(match.group(2))
            if all(lo <= side <= hi and side % step == 0 for side in (width, height)):
                return width, height
        shown = repr(size)[:40]
        raise OpenAIError(
            400,
            f"size must be 'WIDTHxHEIGHT' with each side from {lo} to {hi} and divisible by "
            f"{step} (e.g. 512x512 or 1024x1024), or 'auto' for the configured size; "
            f"got {shown}",
            param="size",
        )

    def _model(self, model: Any) -> str | None:
        """The checkpoint to use (``None``: the default), as our validator takes it."""
        if model is None or model == "default":
            return None
        openai_name = isinstance(model, str) and OPENAI_MODEL.match(model)
        if openai_name and model not in self.daemon.models.names("checkpoints"):
            log.info("OpenAI API: model %r is OpenAI's; using the default model", model)
            return None
        return model  # a wrong type or an unknown name: the validator says which

    # -- the jobs ----------------------------------------------------------------------
    def _submit(self, specs: list[jobs.JobSpec]) -> list[Job]:
        # Queued in one transaction, so a worker takes them as one batch.
        return self.daemon.submit_many(specs, source="openai")

    def _wait(self, events: Subscription, ids: list[int]) -> list[Job]:
        """The jobs once all are finished, or a 504 naming them when that takes too long.
        Events end the wait promptly; a look at the store each second covers an event
        missed (a subscription dropped for falling behind)."""
        pending = set(ids)
        deadline = time.monotonic() + WAIT_SECONDS
        subscription: Subscription | None = events
        looked = time.monotonic()
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                listed = ", ".join(map(str, ids))
                raise OpenAIError(
                    504,
                    f"the images were not ready within {WAIT_SECONDS:g} s; jobs {listed} "
                    "stay queued: GET /api/jobs/<id> shows them",
                    code="timeout",
                    extra={"job_ids": ids},
                )
            if self.daemon.stopping.is_set():
                raise OpenAIError(
                    503,
                    f"the server is stopping; jobs {', '.join(map(str, ids))} stay queued",
                    code="unavailable",
                    extra={"job_ids": ids},
                )
            event = None
            if subscription is not None:
                try:
                    event = subscription.get(timeout=min(left, 1.0))
                except Subscription.Dropped:
                    subscription = None
            else:
                time.sleep(min(left, 0.5))
            if event is not None and event.type in FINISHED_EVENTS:
                pending.discard(event.data.get("id"))
            if time.monotonic() - looked >= 1.0:
                looked = time.monotonic()
                pending = {job_id for job_id in pending if not self.daemon.job(job_id).finished}
        finished = [self.daemon.job(job_id) for job_id in ids]
        failed = [job for job in finished if job.status != COMPLETED]
        if failed:
            reasons = "; ".join(
                f"job {job.id} {job.status}" + (f": {job.error}" if job.error else "")
                for job in failed
            )
            raise OpenAIError(
                500,
                f"{len(failed)} of {len(ids)} images could not be made: {reasons}",
                code=f"job_{failed[0].status}",
                extra={"job_ids": ids},
            )
        return finished

    def _image(self, req: falcon.Request, job: Job, response_format: str) -> dict[str, Any]:
        path = Path(job.output_path or "")
        if not path.is_absolute():
            path = self.daemon.config.base_dir / path
        item: dict[str, Any] = {"revised_prompt": job.spec.prompt}
        if response_format == "url":
            item["url"] = self._url(req, path)
            return item
        try:
            item["b64_json"] = base64.b64encode(self.daemon.output_bytes(job)).decode("ascii")
        except (OSError, NotFound):
            raise OpenAIError(
                500, f"the image of job {job.id} is gone from the outputs folder"
            ) from None
        return item

    def _url(self, req: falcon.Request, path: Path) -> str:
        try:
            name = path.resolve().relative_to(self.daemon.outputs_dir.resolve()).as_posix()
        except ValueError:
            name = path.name
        # The Host the client used (checked by HostCheck), so the URL works from where the
        # client is; the scheme a TLS proxy reports.
        host = req.get_header("Host") or req.netloc
        return f"{req.forwarded_scheme}://{host}/api/outputs/{quote(name)}"


class Models:
    """``GET /v1/models`` and ``GET /v1/models/<id>``: ``default`` (the configured model)
    and the checkpoints ``GET /api/models`` lists, by the names jobs take."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _names(self) -> list[str]:
        names = self.daemon.models.names("checkpoints")
        return ["default", *(name for name in names if name != "default")]

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "imagineerd"}

    on_post = on_put = on_patch = on_delete = _method_not_allowed("GET")
    on_post_item = on_put_item = on_patch_item = on_delete_item = _method_not_allowed("GET")

    @openai_errors
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [self._entry(name) for name in self._names()]}

    @openai_errors
    def on_get_item(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        if model not in self._names():
            raise OpenAIError(
                404,
                f"no model {model[:200]!r}; GET /v1/models lists them",
                param="model",
                code="model_not_found",
            )
        resp.media = self._entry(model)


class NoRoute:
    """Everything under /v1/ that no route takes: 404 in OpenAI's shape on every method."""

    @openai_errors
    def _not_found(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        raise OpenAIError(
            404,
            f"no route {req.method} {req.path[:200]}; this server offers "
            "POST /v1/images/generations and GET /v1/models",
            code="not_found",
        )

    on_get = on_head = on_post = on_put = on_patch = on_delete = _not_found
