"""``create_app(daemon, config)``: the Falcon application.

Collaborators are injected: the daemon (the only thing resources talk to) and the config.
Middleware, outermost first: access log, security headers, the Host check, CORS (only when
origins are configured), the body size limit, the token, the same-site and JSON rule for
state changes (security.py says why each exists).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import falcon

from ..config import Config
from ..config_schema import SCHEMA
from ..daemon import Daemon
from ..errors import ImagineerdError
from . import errors, resources
from .metrics_resource import MetricsResource
from .openapi import OpenApi
from .security import BearerAuth, HostCheck, SameSite, SecurityHeaders, redact_token
from .streams import Events, StaticFiles

access_log = logging.getLogger("imagineerd.access")
STATIC_DIR = Path(__file__).parent / "static"
JOB_ID_MAX = 2**63 - 1  # SQLite's largest integer


class AccessLog:
    """One line per request in the Combined Log Format (what log analysers expect)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.monotonic()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        status = resp.status_code if hasattr(resp, "status_code") else resp.status
        length = resp.headers.get("content-length")
        if length is None and resp.stream is None:
            # Falcon renders (and caches) the body after the middleware; render it now so
            # the log has the byte count. Streams (files, events) carry their own length.
            body = resp.render_body()
            length = len(body) if body else 0
        when = datetime.now().astimezone().strftime("%d/%b/%Y:%H:%M:%S %z")
        access_log.info(
            '%s - - [%s] "%s %s %s" %s %s "%s" "%s"',
            req.remote_addr or "-",
            when,
            req.method,
            # A script's ?token= must never land in a log file someone else reads.
            redact_token(req.relative_uri),
            req.env.get("SERVER_PROTOCOL", "HTTP/1.1"),
            status,
            length,
            redact_token(req.referer) if req.referer else "-",
            req.user_agent or "-",
        )


#: The routes whose bodies may carry images, and so be larger (server.max_image_bytes).
IMAGE_ROUTES = ("/api/generate", "/sdapi/v1/img2img", "/api/png-info")
#: Routes whose body may be an image rather than JSON. They only read what they are sent
#: (no state changes), and an image type is not one a page of another site can send
#: without a CORS preflight; the origin rule still applies to them.
RAW_BODY_ROUTES = {"/api/png-info": resources.RAW_IMAGE_TYPES}


class SameSiteRawBodies(SameSite):
    """:class:`SameSite`, letting :data:`RAW_BODY_ROUTES` take their image bodies."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            super().process_request(req, resp)
        except falcon.HTTPUnsupportedMediaType:
            ctype = (req.content_type or "").split(";")[0].strip().lower()
            if req.method != "POST" or ctype not in RAW_BODY_ROUTES.get(req.path, ()):
                raise


class BodyLimit:
    """413 from the declared length, before the application reads the body. (Waitress sets
    the length of a chunked body once it has de-chunked it, within its own hard cap.) A job
    may carry images up to ``image_limit``; ``Generate`` holds a body without images to the
    text limit once it has read it."""

    def __init__(self, limit: int, image_limit: int | None = None) -> None:
        self.limit = limit
        self.image_limit = max(limit, image_limit or limit)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        length = req.content_length
        images = req.method == "POST" and req.path in IMAGE_ROUTES
        limit, key = (
            (self.image_limit, "server.max_image_bytes")
            if images
            else (self.limit, "server.max_body_bytes")
        )
        if length is not None and length > limit:
            raise falcon.HTTPContentTooLarge(
                description=f"request body is {length} bytes; the limit is {limit} bytes ({key})"
            )


def auth_token(config: Config) -> str:
    """The token in force: ``IMAGINEERD_AUTH_TOKEN`` wins over ``server.auth_token``, and is
    held to the same rules (a token a client or proxy could alter would lock its owner out)."""
    from_env = os.environ.get("IMAGINEERD_AUTH_TOKEN")
    if from_env:
        return SCHEMA["server"]["auth_token"]("IMAGINEERD_AUTH_TOKEN", from_env)
    return config["server"]["auth_token"]


def create_app(daemon: Daemon, config: Config, *, streams: Any = None) -> falcon.App:
    server = config["server"]
    token = auth_token(config)
    middleware: list[Any] = [
        AccessLog(),
        SecurityHeaders(),
        HostCheck(server["allowed_hosts"], server["host"]),
    ]
    if server["cors_origins"]:
        # Falcon reads only the string "*" as "any origin"; a list holding "*" matches none.
        origins = "*" if "*" in server["cors_origins"] else server["cors_origins"]
        middleware.append(falcon.CORSMiddleware(allow_origins=origins, expose_headers=["Location"]))
    auth = BearerAuth(token)
    # The same-site rule after the token: a request without the token learns only that.
    limit = BodyLimit(server["max_body_bytes"], server["max_image_bytes"])
    middleware += [limit, auth, SameSiteRawBodies(server["cors_origins"])]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    # Only JSON is parsed; anything else is a 415 in the one error shape.
    app.req_options.media_handlers = falcon.media.Handlers(
        {falcon.MEDIA_JSON: falcon.media.JSONHandler()}
    )

    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(ImagineerdError, errors.handle_domain_error)
    app.set_error_serializer(errors.serialize_http_error)

    jobs = resources.Jobs(daemon)
    outputs = resources.Outputs(daemon, private=bool(token))
    config_resource = resources.ConfigResource(daemon)
    app.add_route("/api/generate", resources.Generate(daemon))
    app.add_route("/api/jobs", jobs)
    # Ids SQLite can hold; anything else (text, negative, float, beyond 64 bits) falls
    # through to the /api catch-all below: 404 on every method.
    app.add_route(f"/api/jobs/{{job_id:int(min=1, max={JOB_ID_MAX})}}", jobs, suffix="item")
    app.add_route(
        f"/api/jobs/{{job_id:int(min=1, max={JOB_ID_MAX})}}/interrupt", jobs, suffix="interrupt"
    )
    app.add_route(f"/api/jobs/{{job_id:int(min=1, max={JOB_ID_MAX})}}/move", jobs, suffix="move")
    queue = resources.Queue(daemon)
    app.add_route("/api/queue", queue)
    app.add_route("/api/queue/pause", queue, suffix="pause")
    app.add_route("/api/queue/resume", queue, suffix="resume")
    app.add_route("/api/png-info", resources.PngInfo(daemon))
    app.add_route("/api/config", config_resource)
    app.add_route("/api/config/generation", config_resource, suffix="generation")
    app.add_route("/api/outputs", outputs)
    # The literal routes before the images': Falcon tries literal segments first in any
    # case, and no image can be named delete, restore or zip (image names end in .png).
    app.add_route("/api/outputs/delete", outputs, suffix="delete")
    app.add_route("/api/outputs/restore", outputs, suffix="restore")
    app.add_route("/api/outputs/zip", outputs, suffix="zip")
    app.add_route("/api/outputs/{filename:path}", outputs, suffix="item")
    app.add_route("/api/trash", resources.Trash(daemon))
    app.add_route("/api/health", resources.Health(daemon, auth_required=bool(token)))
    app.add_route("/api/session", resources.Session(auth))
    app.add_route("/api/options", resources.Options(daemon))
    models = resources.Models(daemon)
    app.add_route("/api/models", models)
    app.add_route("/api/models/refresh", models, suffix="refresh")
    events = Events(daemon, streams)
    app.add_route("/api/events", events)
    app.add_route("/metrics", MetricsResource(daemon, streams=events.limiter))
    if config["metrics"]["public"]:  # for a scraper without the token
        auth.public = ("/metrics",)
    app.add_route("/api/openapi.json", OpenApi())
    app.add_route("/api/webhooks/deliveries", resources.Webhooks(daemon), suffix="deliveries")
    from . import openai_api  # OpenAI's Images API, with OpenAI's error shape under /v1/

    app.add_route("/v1/images/generations", openai_api.ImageGenerations(daemon))
    openai_models = openai_api.Models(daemon)
    app.add_route("/v1/models", openai_models)
    app.add_route("/v1/models/{model:path}", openai_models, suffix="item")
    app.add_route("/v1/{path:path}", openai_api.NoRoute())
    from . import a1111_api  # AUTOMATIC1111's /sdapi/v1, for its clients (webuiapi, plugins)

    a1111_api.add_routes(app, daemon)
    app.add_route("/api/{path:path}", resources.NoRoute())
    ui = StaticFiles(STATIC_DIR)
    app.add_route("/", ui)
    app.add_route("/{filename:path}", ui, suffix="item")
    return app
