"""Serving the Falcon app with Waitress, in the daemon's process.

One process owns the GPU, so the HTTP frontend runs as threads of that process rather than as
several WSGI worker processes (each would load its own copy of the model). Waitress gives a
pool of ``server.threads`` threads; every open event stream holds one of them, so streams
are capped at ``server.max_event_streams``, which must stay well below the pool size.
"""

from __future__ import annotations

import logging
import threading

import waitress
from waitress import wasyncore
from waitress.server import BaseWSGIServer

from ..config import Config
from ..daemon import Daemon
from .app import create_app
from .streams import StreamLimiter

log = logging.getLogger("imagineerd.http")


class HttpService:
    def __init__(self, daemon: Daemon, config: Config) -> None:
        server = config["server"]
        # Streams beyond threads - 2 would leave no thread for API calls at all.
        self.streams = StreamLimiter(min(server["max_event_streams"], server["threads"] - 2))
        self.app = create_app(daemon, config, streams=self.streams)
        self.server: BaseWSGIServer = waitress.create_server(
            self.app,
            host=server["host"],
            port=server["port"],
            threads=server["threads"],
            # Past connection_limit Waitress stops accepting (the OS queues the rest) instead
            # of opening sockets without end; a connection silent for channel_timeout seconds
            # is closed, so idle or stalled clients cannot pin sockets forever.
            connection_limit=server["connection_limit"],
            channel_timeout=server["channel_timeout"],
            # Our own middleware answers 413 (in the JSON error shape) from the declared length;
            # Waitress's hard cap, higher, stops absurd bodies before they are read at all.
            # Bodies Waitress does read are spooled to a temp file past 512 KiB, not memory.
            max_request_body_size=max(
                4 * server["max_body_bytes"], server["max_image_bytes"] + (1 << 20), 1 << 20
            ),
            ident="imagineerd",
            # Lets the event stream notice a closed connection (waitress.client_disconnected).
            channel_request_lookahead=1,
            clear_untrusted_proxy_headers=True,
            # Never let a request thread die because a client went away mid-stream.
            expose_tracebacks=False,
        )
        self._thread = threading.Thread(target=self.server.run, name="imagineerd-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.effective_port

    @property
    def url(self) -> str:
        host = self.server.effective_host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP API and web UI on http://%s:%s/", self.server.effective_host, self.port)

    def stop(self) -> None:
        self.streams.stopping.set()  # event streams end within a second
        self.server.task_dispatcher.shutdown(timeout=5)
        # Close every socket from inside the server's own loop thread (closing them from here
        # would pull file descriptors from under its select()); the loop ends with its map.
        try:
            self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
        except OSError as exc:
            # The loop already closed its trigger (it does when select() reports the pipe
            # broken); there is nothing left to wake, and stopping must still finish.
            log.warning("HTTP server's wake-up pipe was already closed (%s); stopping anyway", exc)
        self._thread.join(10)
