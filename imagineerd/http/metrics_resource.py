"""``GET /metrics``: the daemon's Prometheus metrics (see ``imagineerd/metrics.py``).

Guarded by the token like ``/api/*`` (``BearerAuth.GUARDED``) unless ``metrics.public`` is
true; Prometheus then sends the token from its scrape config (``contrib/prometheus.yml``).
"""

from __future__ import annotations

import falcon

from ..daemon import Daemon
from ..metrics import Metrics, StreamCount


class MetricsResource:
    """Serves ``daemon.metrics`` and tells it how many event streams are open."""

    def __init__(self, daemon: Daemon, streams: StreamCount | None = None) -> None:
        self.metrics: Metrics = daemon.metrics
        if streams is not None:
            self.metrics.streams = streams

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, content_type = self.metrics.exposition(req.get_header("Accept"))
        resp.content_type = content_type
        resp.cache_control = ["no-store"]
        resp.data = body
