"""REST resources, one class per noun. They talk to the daemon only."""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
from datetime import date, datetime
from typing import Any

import falcon

from .. import jobs
from ..checks import check_tree
from ..daemon import Daemon
from ..errors import Conflict, NotFound, ValidationError
from ..gallery import THUMBNAIL_SIZES
from ..gallery_index import MAX_FILES, MAX_NAME, SOURCES
from ..jobs import SCHEDULERS
from ..outputs import PNG_SIGNATURE
from ..png_info import PngInfoError
from ..png_info import read as read_png_info
from ..safefile import is_utf8_name
from ..store import OutputQuery
from ..stores import redact
from .coalesce import Coalesced
from .security import SESSION_COOKIE, SESSION_MAX_AGE, BearerAuth

REDACTED = "********"
#: JSON nested deeper than this is refused; no valid body comes near it (json.loads itself
#: overflows the stack at about a thousand levels).
MAX_JSON_DEPTH = 32


#: Brackets and commas a body larger than ``server.max_body_bytes`` may hold: such a body is
#: allowed only for the long strings of its images, never for structure to parse.
MAX_LARGE_BODY_ITEMS = 10_000


def read_json_object(
    req: falcon.Request, *, prefix: str = "", text_limit: int | None = None
) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it.
    ``prefix`` names where the body sits in a larger whole, for error fields
    (``generation`` for ``PUT /api/config/generation``). A body over ``text_limit`` bytes
    (one that may carry images) is refused before it is parsed when its size comes from
    anything but long strings."""
    if not req.content_length and req.content_length is not None:
        raise ValidationError("the request body is empty; send a JSON object")
    ctype = (req.content_type or "").split(";")[0].strip().lower()
    if ctype and ctype != falcon.MEDIA_JSON:
        raise falcon.HTTPUnsupportedMediaType(
            description=f"send the body as {falcon.MEDIA_JSON}, not {ctype}"
        )
    raw = req.bounded_stream.read()
    if text_limit is not None and len(raw) > text_limit:
        items = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
        if items > MAX_LARGE_BODY_ITEMS:
            raise falcon.HTTPContentTooLarge(
                description=f"request body is {len(raw)} bytes with {items} brackets and "
                f"commas; past {text_limit} bytes (server.max_body_bytes) only images may "
                "make a body larger"
            )
    if not raw.strip():
        raise ValidationError("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValidationError("the request body is not valid UTF-8") from None
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own stack ran out: far too deep
        raise ValidationError(
            f"the request body nests more than {MAX_JSON_DEPTH} levels deep"
        ) from None
    check_tree(data, what="the request body", max_depth=MAX_JSON_DEPTH, prefix=prefix)
    if not isinstance(data, dict):
        raise ValidationError(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def int_param(req: falcon.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a whole number, got {raw!r}", field=name) from None
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be from {lo} to {hi}, got {value}", field=name)
    return value


#: The header the web UI sends with the jobs it submits, so the gallery can tell them apart.
SOURCE_HEADER = "X-Imagineerd-Source"


def submit_source(req: falcon.Request) -> str:
    """``ui`` for a job the web UI submits (``X-Imagineerd-Source: ui``), else ``api``: any
    other value of the header is ignored, so the original API's contract is unchanged."""
    return "ui" if (req.get_header(SOURCE_HEADER) or "").strip().lower() == "ui" else "api"


class Generate:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = self.daemon.config["server"]["max_body_bytes"]
        data = read_json_object(req, text_limit=limit)
        if (req.content_length or 0) > limit and not (data.get("init_image") or data.get("mask")):
            raise falcon.HTTPContentTooLarge(
                description=f"request body is {req.content_length} bytes; without images the "
                f"limit is {limit} bytes (server.max_body_bytes)"
            )
        job = self.daemon.submit(data, source=submit_source(req))
        view = self.daemon.job_view(job)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/jobs/{job.id}"
        resp.media = {
            "id": job.id,
            "status": job.status,
            "submitted_at": job.submitted_at,
            "queue_position": view.get("queue_position", 0),
            "prompt": job.spec.prompt,
            "seed": job.spec.seed,
        }


class Jobs:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # Lists of the same page asked for at once are built and encoded once (coalesce.py).
        self.listings: Coalesced[tuple[int, int | None], bytes] = Coalesced(self._listing)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = int_param(req, "limit", 50, 1, 500)
        before = int_param(req, "before", None, 1, 2**62)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.listings.get((limit, before))

    def _listing(self, page: tuple[int, int | None]) -> bytes:
        limit, before = page
        # One more than asked tells whether another page exists.
        body = self.daemon.list_jobs(limit=limit + 1, before=before)
        more = len(body["history"]) > limit
        body["history"] = body["history"][:limit]
        body["next_before"] = body["history"][-1]["id"] if more else None
        # As resp.media would encode it (Falcon's JSON handler), once for every waiter.
        return json.dumps(body, ensure_ascii=False).encode()

    def on_get_item(self, req: falcon.Request, resp: falcon.Response, job_id: int) -> None:
        resp.media = self.daemon.job_view(self.daemon.job(job_id))

    def on_delete_item(self, req: falcon.Request, resp: falcon.Response, job_id: int) -> None:
        self.daemon.cancel(job_id)
        resp.media = {"message": "Job cancelled successfully"}

    def on_post_interrupt(self, req: falcon.Request, resp: falcon.Response, job_id: int) -> None:
        self.daemon.interrupt(job_id)
        resp.status = falcon.HTTP_202
        resp.media = {"message": "Job will stop at its next step", "id": job_id}

    def on_post_move(self, req: falcon.Request, resp: falcon.Response, job_id: int) -> None:
        """``{"to": "top" | "up" | "down" | <1-based place>}``; answers the job's view with
        ``move`` (its place before and after, and the new order of the places between)."""
        data = read_json_object(req)
        unknown = sorted(set(data) - {"to"})
        if unknown:
            name = unknown[0][:60]
            raise ValidationError(f"unknown field {name!r}; send only to", field=name)
        if "to" not in data:
            raise ValidationError('to is required: "top", "up", "down" or a place', field="to")
        resp.media = self.daemon.move(job_id, data["to"])


class Queue:
    """``POST /api/queue/pause`` and ``/api/queue/resume``: hold every worker of the queue
    (of every node sharing it) from taking jobs, or let them go on; ``GET /api/queue`` says
    which it is. The jobs running when the queue is paused finish."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.daemon.queue_state()

    def on_post_pause(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = self.daemon.pause()
        resp.media = {"message": "Queue paused; running jobs finish", **state}

    def on_post_resume(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = self.daemon.resume()
        resp.media = {"message": "Queue resumed", **state}


#: The body types ``POST /api/png-info`` takes as the PNG itself.
RAW_IMAGE_TYPES = ("image/png", "application/octet-stream")


class PngInfo:
    """``POST /api/png-info``: the generation parameters a PNG carries (ours, A1111's
    ``parameters`` text, or a simple ComfyUI graph) in our job field names. The body is the
    PNG's bytes (``image/png`` or ``application/octet-stream``), or JSON ``{"image": ...}``
    with the PNG as base64 or a ``data:`` URL; up to ``server.max_image_bytes``."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = self.daemon.config["server"]["max_image_bytes"]
        ctype = (req.content_type or "").split(";")[0].strip().lower()
        # One more byte than allowed tells a body over the limit (a chunked one has no
        # declared length for the middleware to refuse).
        raw = req.bounded_stream.read(limit + 1)
        if len(raw) > limit:
            raise falcon.HTTPContentTooLarge(
                description=f"the PNG is over {limit} bytes (server.max_image_bytes)"
            )
        field = None
        if ctype == falcon.MEDIA_JSON:
            raw, field = self._from_json(raw), "image"
        elif ctype not in RAW_IMAGE_TYPES:
            raise falcon.HTTPUnsupportedMediaType(
                description="send the PNG's bytes as image/png (or application/octet-stream), "
                'or JSON {"image": "<base64 or data: URL>"}'
            )
        if not raw:
            raise ValidationError("the request body is empty; send a PNG image", field=field)
        try:
            resp.media = read_png_info(raw)
        except PngInfoError as exc:
            raise ValidationError(str(exc), field=field) from None

    @staticmethod
    def _from_json(raw: bytes) -> bytes:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValidationError('the body is not valid JSON; send {"image": ...}') from None
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise ValidationError("send the PNG as a string: base64 or a data: URL", field="image")
        text = data["image"].strip()
        if text.startswith("data:"):
            head, comma, text = text.partition(",")
            if not comma or not head.endswith(";base64"):
                raise ValidationError("image: a data: URL must be base64", field="image")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("image is not valid base64", field="image") from None


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as the API shows it: the token and the webhook secrets masked."""
    shown = copy.deepcopy(config)
    if shown["server"]["auth_token"]:
        shown["server"]["auth_token"] = REDACTED
    hooks = shown["webhooks"]
    if hooks["job_secret"]:
        hooks["job_secret"] = REDACTED
    for endpoint in hooks["endpoints"]:
        endpoint["secret"] = REDACTED
    shown["queue"]["database"] = redact(shown["queue"]["database"], REDACTED)
    return shown


class ConfigResource:
    """``/api/config``: GET shows the saved configuration; PUT replaces it (every section and
    key), PATCH merges into it; ``/api/config/generation`` (PUT) changes generation defaults.

    Only the keys in ``config.REMOTE_KEYS`` may change over the API; the daemon enforces that
    (403 naming the key). A read-only key may be sent back as GET showed it, the token as
    ``********``, so a GET, edit, PUT round trip works.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _answer(self, resp: falcon.Response, result: dict[str, Any]) -> None:
        restart = result["restart_required"]
        resp.media = {
            "message": "Configuration saved"
            + (f"; restart to apply {', '.join(restart)}" if restart else ""),
            "restart_required": restart,
            "config": redacted(result["config"]),
        }

    def _body(self, req: falcon.Request) -> dict[str, Any]:
        data = read_json_object(req)
        data.pop("restart_required", None)  # accept back what GET returned
        server = data.get("server")
        if isinstance(server, dict) and server.get("auth_token") == REDACTED:
            # GET shows the token this way; sent back, it means "unchanged".
            server["auth_token"] = self.daemon.saved_config["server"]["auth_token"]
        queue = data.get("queue")
        saved_url = self.daemon.saved_config["queue"]["database"]
        if isinstance(queue, dict) and queue.get("database") == redact(saved_url, REDACTED):
            queue["database"] = saved_url  # as GET showed it: unchanged
        hooks, saved = data.get("webhooks"), self.daemon.saved_config["webhooks"]
        if isinstance(hooks, dict):
            if hooks.get("job_secret") == REDACTED:
                hooks["job_secret"] = saved["job_secret"]
            if (
                hooks.get("endpoints")
                == redacted(self.daemon.saved_config)["webhooks"]["endpoints"]
            ):
                hooks["endpoints"] = copy.deepcopy(saved["endpoints"])
        return data

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = redacted(self.daemon.saved_config)
        body["restart_required"] = self.daemon.pending_restart()
        resp.media = body

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(resp, self.daemon.update_config(self._body(req)))

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(resp, self.daemon.update_config(self._body(req), merge=True))

    def on_put_generation(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_json_object(req, prefix="generation")
        self._answer(resp, self.daemon.update_generation(values))


def text_param(req: falcon.Request, name: str, *, max_length: int = 1000) -> str | None:
    """A query parameter as text the store can hold (no NUL, valid UTF-8, bounded)."""
    raw = req.get_param(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_length or "\x00" in raw or not is_utf8_name(raw):
        raise ValidationError(
            f"{name} must be text of up to {max_length} characters, without NUL", field=name
        )
    return raw


def bool_param(req: falcon.Request, name: str) -> bool | None:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ValidationError(f"{name} must be true or false, got {raw[:40]!r}", field=name)


def time_param(req: falcon.Request, name: str, *, end_of_day: bool) -> str | None:
    """An ISO date (``2026-03-01``) or date and time (``2026-03-01T14:30``, with seconds,
    fractions and an offset as ISO 8601 writes them) as the gallery's ``created`` is written:
    local time. A date alone is its first moment, or with ``end_of_day`` its last."""
    raw = req.get_param(name)
    if raw is None or raw == "":
        return None
    text = raw.strip()
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is not None:
            when = when.astimezone().replace(tzinfo=None)
        if when.year < 1000:  # written with fewer digits, it would sort after every real date
            raise ValueError(when.year)
    except (ValueError, OverflowError):  # not ISO, or beyond year 9999 once made local
        raise ValidationError(
            f"{name} must be an ISO date or date and time, such as 2026-03-01 or "
            f"2026-03-01T14:30:00, got {raw[:40]!r}",
            field=name,
        ) from None
    if end_of_day and _is_date(text):  # a date alone: the whole day
        when = when.replace(hour=23, minute=59, second=59, microsecond=999999)
    return jobs.iso(when)


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def output_query(req: falcon.Request) -> OutputQuery:
    """The filters of ``GET /api/outputs``; a 400 naming the parameter for a bad one."""
    source = req.get_param("source")
    if source not in (None, "") and source not in SOURCES:
        raise ValidationError(
            f"source must be one of {', '.join(SOURCES)}, got {source[:40]!r}", field="source"
        )
    return OutputQuery(
        text=text_param(req, "q"),
        model=text_param(req, "model"),
        source=source or None,
        favourite=bool_param(req, "favourite"),
        width=int_param(req, "width", None, 1, 65535),
        height=int_param(req, "height", None, 1, 65535),
        since=time_param(req, "since", end_of_day=False),
        until=time_param(req, "until", end_of_day=True),
    )


def file_names(req: falcon.Request) -> list[str]:
    """``{"files": [<name>, ...]}``, 1 to MAX_FILES names, or a 400 saying what is wrong."""
    data = read_json_object(req)
    unknown = sorted(set(data) - {"files"})
    if unknown:
        name = unknown[0][:60]
        raise ValidationError(f"unknown field {name!r}; send only files", field=name)
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValidationError(
            'files is required: a list of image names, as {"files": ["a.png", "b.png"]}',
            field="files",
        )
    if not 1 <= len(files) <= MAX_FILES:
        raise ValidationError(
            f"files must name 1 to {MAX_FILES} images, got {len(files)}", field="files"
        )
    return files


class Outputs:
    """``/api/outputs``: the gallery, listed from its index (``gallery_index``), with
    favourites, the trash and zips; ``/api/outputs/<file>`` serves one image."""

    def __init__(self, daemon: Daemon, *, private: bool = False) -> None:
        self.daemon = daemon
        self.private = private

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = int_param(req, "limit", 50, 1, 500)
        before = text_param(req, "before", max_length=MAX_NAME)
        query = output_query(req)
        images = self.daemon.gallery_index.list(query, limit=limit + 1, before=before)
        more = len(images) > limit
        images = images[:limit]
        resp.media = {"outputs": images, "next_before": images[-1]["filename"] if more else None}

    def on_patch_item(self, req: falcon.Request, resp: falcon.Response, filename: str) -> None:
        """``{"favourite": true | false}``: the image's entry, marked."""
        data = read_json_object(req)
        unknown = sorted(set(data) - {"favourite"})
        if unknown:
            name = unknown[0][:60]
            raise ValidationError(f"unknown field {name!r}; send only favourite", field=name)
        if not isinstance(data.get("favourite"), bool):
            raise ValidationError(
                'favourite is required: true or false, as {"favourite": true}', field="favourite"
            )
        entry = self.daemon.gallery_index.set_favourite(filename, data["favourite"])
        # Every open page (on any node) shows the star as it is now, not as it loaded it.
        self.daemon.events.publish(
            "output.favourite", {"filename": entry["filename"], "favourite": entry["favourite"]}
        )
        resp.media = entry

    def on_delete_item(self, req: falcon.Request, resp: falcon.Response, filename: str) -> None:
        """Move one image to the trash (``POST /api/outputs/restore`` undoes it). One the
        file system will not move is a 409 or 503 naming it and the cause."""
        index = self.daemon.gallery_index
        trashed, _, when = index.trash([filename])
        if not trashed:
            if index.is_link(filename):
                raise Conflict(
                    f"{filename[:200]!r} is a symbolic link, not an image file: links are not "
                    "moved to the trash; remove it on the server"
                )
            raise NotFound(f"no image named {filename[:200]!r}")
        self.daemon.events.publish("output.trashed", {"files": trashed})
        resp.media = {"trashed": trashed, "purge_after": index.purge_after(when)}

    def on_post_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Each image to the trash; ``failed``: those the file system would not move, each
        ``{filename, error, status}``, left where they were."""
        index = self.daemon.gallery_index
        failed: list[dict[str, Any]] = []
        trashed, missing, when = index.trash(file_names(req), failed=failed)
        if trashed:
            self.daemon.events.publish("output.trashed", {"files": trashed})
        resp.media = {
            "trashed": trashed,
            "missing": missing,
            "failed": failed,
            "purge_after": index.purge_after(when) if trashed else None,
        }

    def on_post_restore(self, req: falcon.Request, resp: falcon.Response) -> None:
        failed: list[dict[str, Any]] = []
        restored, missing, conflicts = self.daemon.gallery_index.restore(
            file_names(req), failed=failed
        )
        if restored:
            self.daemon.events.publish("output.restored", {"files": restored})
        resp.media = {
            "restored": restored,
            "missing": missing,
            "conflicts": conflicts,
            "failed": failed,
        }

    def on_post_zip(self, req: falcon.Request, resp: falcon.Response) -> None:
        handle, size = self.daemon.gallery_index.zip(file_names(req))
        resp.content_type = "application/zip"
        resp.set_header("Content-Disposition", f'attachment; filename="{ZIP_NAME}"')
        resp.cache_control = ["no-store"]
        resp.set_stream(handle, size)

    def on_get_item(self, req: falcon.Request, resp: falcon.Response, filename: str) -> None:
        raw = req.get_param("thumb")
        thumb = None
        if raw:
            # A few fixed sizes only: each size asked for is a file in the cache.
            thumb = next((size for size in THUMBNAIL_SIZES if str(size) == raw), None)
            if thumb is None:
                sizes = ", ".join(map(str, THUMBNAIL_SIZES))
                raise ValidationError(
                    f"thumb must be one of {sizes}, got {raw[:20]!r}", field="thumb"
                )
        gallery = self.daemon.gallery
        path = gallery.thumbnail(filename, thumb) if thumb else gallery.resolve(filename)
        try:
            handle = path.open("rb")
            stat = os.fstat(handle.fileno())
        except OSError:  # removed (or its thumbnail evicted) since it was looked up
            raise NotFound(f"no image named {filename!r}") from None
        if not thumb and handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            # Other bytes under a .png name (dropped on the share) are not one of our
            # images: not served as image/png, as they are not listed either.
            handle.close()
            raise NotFound(f"{filename!r} is not a PNG image")
        handle.seek(0)
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        resp.etag = etag
        resp.last_modified = None
        # Names are unique per job, so an image never changes under its name. When a token
        # guards the images, shared caches (proxies) must not keep a copy for others.
        shared = "private" if self.private else "public"
        resp.cache_control = [shared, "max-age=86400"]
        if req.get_header("If-None-Match") == etag:
            handle.close()
            resp.status = falcon.HTTP_304
            return
        resp.content_type = "image/jpeg" if thumb else "image/png"
        resp.set_stream(handle, stat.st_size)


#: The name a zip of gallery images is offered under.
ZIP_NAME = "imagineerd-images.zip"


class Trash:
    """``GET /api/trash``: the images in the trash, the last trashed first."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = int_param(req, "limit", 1000, 1, 5000)
        resp.media = {"trashed": self.daemon.gallery_index.trashed(limit=limit)}


class Options:
    """``GET /api/options``: what a client needs to build a form: schedulers with their
    labels, the parameter bounds, and common sizes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            "schedulers": [{"id": key, "label": label} for key, label in SCHEDULERS.items()],
            "limits": jobs.limits(),
            "sizes": [
                {"label": "Square 512", "width": 512, "height": 512},
                {"label": "Square 768", "width": 768, "height": 768},
                {"label": "Square 1024 (SDXL)", "width": 1024, "height": 1024},
                {"label": "Portrait 512x768", "width": 512, "height": 768},
                {"label": "Landscape 768x512", "width": 768, "height": 512},
                {"label": "Portrait 832x1216 (SDXL)", "width": 832, "height": 1216},
                {"label": "Landscape 1216x832 (SDXL)", "width": 1216, "height": 832},
            ],
            "generation": self.daemon.config["generation"],
        }


class Models:
    """``GET /api/models``: the checkpoints, LoRAs, embeddings and VAEs found in
    ``paths.models`` and ``default``, the model jobs run with; ``POST /api/models/refresh``
    rescans the folder first (it is also rescanned when it changes)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _answer(self, resp: falcon.Response, listing: dict[str, Any]) -> None:
        resp.media = {**listing, "default": self.daemon.config["model"]["name"]}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(resp, self.daemon.models.listing())

    def on_post_refresh(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._answer(resp, self.daemon.models.refresh())


class Health:
    """``GET /api/health``: open to all (monitors need no token). When a token is set, a
    request without it sees only the status and the counts of the original API: the model
    path, backend errors, devices and folders describe the machine, not its health."""

    PUBLIC = ("status", "queue_size", "current_job", "total_completed", "total_failed")

    def __init__(self, daemon: Daemon, *, auth_required: bool = False) -> None:
        self.daemon = daemon
        self.auth_required = auth_required

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        health = self.daemon.health()
        if self.auth_required and not getattr(req.context, "authenticated", False):
            health = {key: health[key] for key in self.PUBLIC if key in health}
            # Says that the server restarted, and nothing about the machine.
            health["boot_id"] = self.daemon.boot_id
        resp.media = health


class Session:
    """``POST /api/session {"token": ...}``: a browser logs in once and gets a cookie
    (``HttpOnly``: page scripts cannot read it; ``SameSite=Strict``: other sites' pages
    do not send it), so images and the event stream need no token in their URLs.
    ``DELETE /api/session`` logs out; ``GET /api/session`` says whether a token is needed
    and whether this request has it."""

    def __init__(self, auth: BearerAuth) -> None:
        self.auth = auth

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            "auth_required": self.auth.sessions is not None,
            "authenticated": bool(getattr(req.context, "authenticated", False)),
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = read_json_object(req)
        supplied = data.get("token")
        if not isinstance(supplied, str) or not supplied:
            raise ValidationError("send the token as a non-empty string", field="token")
        if self.auth.sessions is None:
            resp.media = {"message": "this server needs no token", "authenticated": True}
            return
        if not self.auth.matches(supplied):
            raise falcon.HTTPUnauthorized(
                title="Unauthorized", description="that token was not accepted"
            )
        resp.set_cookie(
            SESSION_COOKIE,
            self.auth.sessions.new(),
            max_age=SESSION_MAX_AGE,
            path="/",
            http_only=True,
            same_site="Strict",
            # Behind a TLS proxy the daemon itself sees plain HTTP; the page's origin says
            # whether the browser is on HTTPS, where the cookie must never leave it.
            secure=req.scheme == "https"
            or (req.get_header("Origin") or "").lower().startswith("https://"),
        )
        resp.cache_control = ["no-store"]
        resp.media = {"message": "Logged in", "authenticated": True}

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.unset_cookie(SESSION_COOKIE, path="/", same_site="Strict")
        resp.media = {"message": "Logged out"}


class Webhooks:
    """``GET /api/webhooks/deliveries``: the latest deliveries, newest first."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_get_deliveries(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = int_param(req, "limit", 100, 1, 1000)
        resp.media = {"deliveries": [d.to_dict() for d in self.daemon.store.deliveries(limit)]}


class NoRoute:
    """Everything under /api/ that no route takes: 404 on every method, so a path that
    cannot name anything (``/api/jobs/abc``, an id beyond 64 bits) never looks like a
    resource that merely lacks that method."""

    def _not_found(self, req: falcon.Request, resp: falcon.Response, path: str) -> None:
        raise NotFound(f"no API route {req.path[:200]}")

    on_get = on_head = on_post = on_put = on_patch = on_delete = _not_found
