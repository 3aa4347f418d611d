"""The event stream (``GET /api/events``, Server-Sent Events) and the web UI's static files:
the two resources that are not JSON."""

from __future__ import annotations

import json
import mimetypes
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import falcon

from ..daemon import Daemon
from ..errors import NotFound, ValidationError
from ..events import Event, Subscription


class StreamLimiter:
    """Counts open event streams (each holds a server thread) and ends them on shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.open >= self.limit or self.stopping.is_set():
                return False
            self.open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.open -= 1


class Events:
    """``GET /api/events``: Server-Sent Events. ``Last-Event-ID`` (header, or
    ``?last_event_id=``) replays recent events a reconnecting client missed."""

    HEARTBEAT_SECONDS = 15.0
    #: Events kept encoded: every open stream sends the same bytes for an event, so each
    #: event is encoded once, not once per browser tab.
    ENCODED_EVENTS = 2048

    def __init__(self, daemon: Daemon, limiter: StreamLimiter | None) -> None:
        self.daemon = daemon
        self.limiter = limiter or StreamLimiter(8)
        self._encoded: dict[int, tuple[Event, bytes]] = {}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = req.get_header("Last-Event-ID") or req.get_param("last_event_id")
        try:
            last = int(raw) if raw else None
        except ValueError:
            raise ValidationError(
                f"Last-Event-ID must be a number, got {raw!r}", field="Last-Event-ID"
            ) from None
        if not self.limiter.acquire():
            raise falcon.HTTPServiceUnavailable(
                description=f"too many open event streams ({self.limiter.limit}, "
                "server.max_event_streams); close a tab or raise the limit",
                retry_after=5,
            )
        subscription = self.daemon.events.subscribe(last)
        resp.content_type = "text/event-stream"
        resp.cache_control = ["no-cache"]
        resp.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        # Waitress tells us when the client went away (needs channel_request_lookahead), so a
        # closed tab frees its thread within a second instead of at the next heartbeat.
        gone = req.env.get("waitress.client_disconnected") or (lambda: False)
        resp.stream = self._stream(subscription, gone)

    def _stream(self, sub: Subscription, gone: Callable[[], bool]) -> Iterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            idle = 0.0
            while not (self.limiter.stopping.is_set() or self.daemon.stopping.is_set() or gone()):
                try:
                    event = sub.get(timeout=1.0)
                except Subscription.Dropped:
                    return  # fell behind; the client reconnects with Last-Event-ID
                if event is None:
                    idle += 1.0
                    if idle >= self.HEARTBEAT_SECONDS:
                        idle = 0.0
                        yield b": keep-alive\n\n"  # finds dead connections, keeps proxies open
                    continue
                idle = 0.0
                yield self._encode(event)
        finally:
            sub.close()
            self.limiter.release()

    def _encode(self, event: Event) -> bytes:
        """The event as one SSE message. Every stream is handed the same event object, so
        the message is kept by id for that very object (a ``reset`` made for one stream may
        share an id with a real event; it is not the same object). A lost race between two
        streams costs one more encoding, nothing else; no lock on the way."""
        cached = self._encoded.get(event.id)
        if cached is not None and cached[0] is event:
            return cached[1]
        data = json.dumps(event.data, separators=(",", ":"))
        message = f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()
        encoded = self._encoded
        encoded[event.id] = (event, message)
        while len(encoded) > self.ENCODED_EVENTS:
            try:
                encoded.pop(next(iter(encoded)), None)  # the oldest
            except (StopIteration, RuntimeError):  # emptied or changed by another stream
                break
        return message


class StaticFiles:
    """The web UI: files of ``static/`` only (no symlinks out), ``index.html`` at ``/``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "index.html")

    def on_get_item(self, req: falcon.Request, resp: falcon.Response, filename: str) -> None:
        if filename.startswith("api/") or filename == "api":
            raise NotFound(f"no API route {req.path}")
        self._send(resp, filename)

    def _send(self, resp: falcon.Response, filename: str) -> None:
        parts = filename.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\x00" in filename:
            raise NotFound(f"no file {filename!r}")
        try:
            path = (self.root / filename).resolve()
            found = path.is_relative_to(self.root) and path.is_file()
        except (OSError, RuntimeError):  # a name too long for the file system, a link loop
            found = False
        if not found:
            raise NotFound(f"no file {filename[:200]!r}")
        resp.content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".js":
            resp.content_type = "text/javascript; charset=utf-8"
        resp.cache_control = ["no-cache"]  # small files; always fresh after an upgrade
        resp.data = path.read_bytes()
