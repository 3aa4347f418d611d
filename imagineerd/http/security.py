"""What keeps other web pages and other names out: the Host check, the same-site rule for
state changes, the token (header, session cookie or ``?token=``) and the session cookie.

Why each exists (README, "Security"):

- **Host check** (421). DNS rebinding points a name the attacker owns at this machine's
  address; the browser then treats the attacker's page as same-origin with us. The page's
  requests still carry the attacker's name in ``Host``, so answering only our own names
  stops it.
- **Same-site rule** (403) and **JSON content type** (415) for POST, PUT, PATCH and DELETE on
  ``/api/*``. A page on another site can make a browser send a POST without asking us first
  (a form, or ``fetch`` with ``mode: "no-cors"``), but only with a form or text content
  type, and a modern browser says where it comes from (``Origin``, ``Sec-Fetch-Site``).
  PUT, PATCH, DELETE and a JSON POST from another origin need a CORS preflight, which only
  ``server.cors_origins`` pass.
- **Session cookie**. Browsers cannot put a header on ``<img>`` or ``EventSource``
  requests, so the UI logs in once (``POST /api/session``) and the browser sends an
  ``HttpOnly; SameSite=Strict`` cookie instead of the token appearing in URLs.

Written by hand: Falcon has no host, origin or session middleware (its CORSMiddleware, used
in app.py, only answers preflights and adds headers; it refuses nothing), and the libraries
that do this (Django's ALLOWED_HOSTS and CSRF, Starlette's TrustedHostMiddleware) belong to
other frameworks. Each check is a few lines over the standard library's ``ipaddress``,
``hmac`` and ``urllib.parse``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import falcon

from ..errors import Forbidden

#: Methods that change state; GET, HEAD and OPTIONS never do.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SESSION_COOKIE = "imagineerd_session"
#: A session cookie is accepted for this long after login (then the UI asks again).
SESSION_MAX_AGE = 30 * 24 * 3600
REDACTED = "********"
# Split as the query parser splits: on "&" only (a ";" belongs to the value, as in a token)
_QUERY_PART = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def redact_token(text: str) -> str:
    """``text`` (a request URI or a Referer) with any ``token=`` value masked, for logs.
    The name is compared decoded, as the query parser reads it (``tok%65n=`` is a token)."""

    def mask(match: re.Match[str]) -> str:
        if unquote_plus(match.group(2)).strip().lower() != "token":
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}={REDACTED}"

    return _QUERY_PART.sub(mask, text)


# ------------------------------------------------------------------------- Host check
def split_host(value: str) -> str | None:
    """The host part of a ``Host`` header (no port, lower case, no trailing dot), or
    ``None`` when it is not a well-formed ``host[:port]``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
    else:
        host, colon, port = value.partition(":")
        rest = f"{colon}{port}"
    if rest and not re.fullmatch(r":\d{0,5}", rest):  # RFC 3986 allows an empty port
        return None
    return host.rstrip(".") or None


def is_ip_literal(host: str) -> bool:
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host.startswith("[") != host.endswith("]"):
        return False
    try:
        address = ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        return False
    # A v6 address is only valid in a Host header inside brackets, a v4 one without.
    return (address.version == 6) == host.startswith("[")


def machine_names(bind_host: str = "") -> set[str]:
    """This machine's own names: what a browser on the LAN may rightly have typed."""
    names = {"localhost"}
    try:
        hostname = socket.gethostname().lower()
        names |= {hostname, hostname.split(".")[0], f"{hostname.split('.')[0]}.local"}
        names.add(socket.getfqdn().lower())
    except OSError:  # no name service at all: localhost and IP addresses still work
        pass
    if bind_host and not is_ip_literal(bind_host) and bind_host not in ("0.0.0.0", "::"):
        names.add(bind_host.lower())
    return {n.rstrip(".") for n in names if n}


class HostCheck:
    """421 for a ``Host`` header that names none of this server's names (see the module
    docstring for why). Requests without a ``Host`` (HTTP/1.0 tools) are not browsers'."""

    def __init__(self, allowed: Iterable[str], bind_host: str = "") -> None:
        self.names = machine_names(bind_host)
        self.patterns: list[str] = []
        self.any = False
        for entry in allowed:
            entry = entry.lower()
            if entry == "*":
                self.any = True
            elif entry.startswith("*."):
                self.patterns.append(entry[1:])  # ".example.com"
            else:
                self.names.add(split_host(entry) or entry)

    def allows(self, header: str) -> bool:
        host = split_host(header)
        if host is None:
            return False
        if self.any or host in self.names or is_ip_literal(host):
            return True
        # RFC 6761: *.localhost always resolves to loopback; no one can rebind it.
        if host.endswith(".localhost"):
            return True
        return any(host.endswith(suffix) for suffix in self.patterns)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        header = req.get_header("Host")
        if header is None or self.allows(header):
            return
        raise falcon.HTTPError(
            421,
            title="Misdirected Request",
            description=f"this server does not answer to the host name {header[:100]!r}; "
            "add it to server.allowed_hosts if it is a name of this server (behind a reverse "
            "proxy: pass the original Host header, or list it there)",
        )


class SecurityHeaders:
    """On every response: no framing by other sites' pages (clickjacking: a hidden frame of
    the UI under a page's own buttons), and no content sniffing (an output named ``.png``
    holding other bytes is never run as a page)."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("X-Frame-Options", "DENY")
        resp.set_header("Content-Security-Policy", "frame-ancestors 'none'")


# --------------------------------------------------------------------- same-site rule
def origin_of_host(req: falcon.Request) -> str:
    """``host[:port]`` this request was sent to, as the browser wrote it in ``Host``."""
    return (req.get_header("Host") or "").strip().lower()


def _netloc(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return host if port in (None, default) else f"{host}:{port}"


def _host_netloc(header: str) -> str:
    # "example.com:80" and "example.com" are the same origin for http; the browser writes
    # the default port in neither Host nor Origin, but a proxy might.
    header = header.strip().lower().rstrip(".")
    return re.sub(r":(80|443)$", "", header)


class SameSite:
    """State changes on ``/api/*`` (and the A1111 and OpenAI APIs) only from this server's
    own pages or from non-browser clients, and only as JSON.

    - ``Sec-Fetch-Site`` (sent by current browsers, set by the browser, not by the page):
      ``same-origin`` or ``none`` passes; ``same-site`` and ``cross-site`` pass only when
      ``Origin`` is one of ``server.cors_origins``. Another port of this host is
      ``same-site`` to a browser, but it is another program: refused.
    - Otherwise ``Origin`` (browsers send it with every POST, PUT, PATCH and DELETE): it
      must name the host and port of this request, or be one of ``server.cors_origins``.
    - No ``Origin`` and no ``Sec-Fetch-Site``: a script, curl, or an old browser. Those
      old browsers can only send form or text bodies across sites, which the content-type
      rule refuses.

    Content type: POST, PUT and PATCH must say ``application/json`` (even with an empty
    body, like ``POST /api/jobs/<id>/interrupt``). A DELETE may come without a body and
    without a content type, as the original API's clients send it (``requests.delete``,
    ``curl -X DELETE``): no browser sends a DELETE to another origin without a CORS
    preflight, which only ``server.cors_origins`` pass.
    """

    #: Where the origin rule applies: our API and the other APIs served beside it.
    ORIGIN_PREFIXES = ("/api/", "/sdapi/", "/v1/")
    #: Where bodies must also say JSON. A1111's clients post some state changes without a
    #: body or type (interrupt, skip), so /sdapi/ has the origin rule only; its routes with
    #: a body read it as JSON and refuse anything else.
    JSON_PREFIXES = ("/api/", "/v1/")

    def __init__(self, cors_origins: Iterable[str]) -> None:
        origins = [o.strip().rstrip("/").lower() for o in cors_origins]
        self.any_origin = "*" in origins
        self.origins = set(origins)

    def _listed(self, origin: str | None) -> bool:
        if not origin:
            return False
        return self.any_origin or origin.strip().rstrip("/").lower() in self.origins

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method not in UNSAFE_METHODS or not req.path.startswith(self.ORIGIN_PREFIXES):
            return
        origin = req.get_header("Origin")
        site = (req.get_header("Sec-Fetch-Site") or "").strip().lower()
        if site in ("same-site", "cross-site") and not self._listed(origin):
            raise Forbidden(
                f"refused: this {req.method} comes from a page of another site "
                f"({(origin or site)[:100]}); list its origin in server.cors_origins to allow it"
            )
        if origin is not None and site not in ("same-origin", "none"):
            own = _netloc(origin) == _host_netloc(origin_of_host(req))
            if not own and not self._listed(origin):
                raise Forbidden(
                    f"refused: this {req.method} comes from a page of another origin "
                    f"({origin[:100]}); list it in server.cors_origins to allow it"
                )
        ctype = (req.content_type or "").split(";")[0].strip().lower()
        if ctype == falcon.MEDIA_JSON or not req.path.startswith(self.JSON_PREFIXES):
            return
        bodiless = not req.content_length and req.get_header("Transfer-Encoding") is None
        if req.method == "DELETE" and not ctype and bodiless:
            return
        raise falcon.HTTPUnsupportedMediaType(
            description=f"send {req.method} requests to the API with "
            f"'Content-Type: {falcon.MEDIA_JSON}'"
            + (f", not {ctype[:60]!r}" if ctype else "")
            + " (the body may be empty where none is needed)"
        )


# ---------------------------------------------------------------------- session cookie
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Sessions:
    """Signed session values: ``<issued>.<nonce>.<mac>``, the MAC keyed with the token.

    Nothing is stored on the server, so sessions outlive a restart; changing the token
    ends every session at once. The cookie holds no part of the token itself.
    """

    def __init__(self, token: str, clock: Any = time.time) -> None:
        self.key = hashlib.sha256(b"imagineerd session key\0" + token.encode()).digest()
        self.clock = clock

    def _mac(self, issued: str, nonce: str) -> str:
        return _b64(hmac.new(self.key, f"{issued}.{nonce}".encode(), hashlib.sha256).digest())

    def new(self) -> str:
        issued, nonce = str(int(self.clock())), _b64(secrets.token_bytes(18))
        return f"{issued}.{nonce}.{self._mac(issued, nonce)}"

    def valid(self, value: str | None) -> bool:
        if not value or value.count(".") != 2 or len(value) > 200:
            return False
        issued, nonce, mac = value.split(".")
        if not issued.isdigit() or len(issued) > 12:
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(issued, nonce).encode()):
            return False
        return 0 <= self.clock() - int(issued) <= SESSION_MAX_AGE


class BearerAuth:
    """When a token is set, every route under ``GUARDED`` except /api/health and
    /api/session needs one of: ``Authorization: Bearer <token>``, HTTP Basic with the token as
    the password (how A1111's API clients send ``--api-auth``), the session cookie, or (GET
    only, for scripts) ``?token=<token>``. Sets ``req.context.authenticated`` for every
    request, so /api/health can tell how much to show."""

    OPEN = ("/api/health", "/api/session")
    #: Our API, and the other APIs served beside it (A1111's, OpenAI's, metrics).
    GUARDED = ("/api/", "/sdapi/", "/v1/", "/metrics")
    #: Routes a configuration may open to anyone (``metrics.public``); set by the app.
    public: tuple[str, ...] = ()

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.sessions = Sessions(token) if token else None

    def matches(self, supplied: str) -> bool:
        """Whether ``supplied`` is the token (constant time; any text, even unencodable)."""
        return hmac.compare_digest(supplied.encode("utf-8", "replace"), self.token)

    def authenticated(self, req: falcon.Request) -> bool:
        if not self.token:
            return True
        header = req.get_header("Authorization") or ""
        if header.lower().startswith("bearer "):
            return self.matches(header[7:].strip())
        if header.lower().startswith("basic "):
            try:
                _, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return self.matches(password)
        assert self.sessions is not None
        if self.sessions.valid(req.cookies.get(SESSION_COOKIE)):
            return True
        if req.method in ("GET", "HEAD") and "token" in req.params:
            return self.matches(req.get_param("token") or "")
        return False

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.authenticated = self.authenticated(req)
        if req.context.authenticated or req.method == "OPTIONS":
            return
        if not req.path.startswith(self.GUARDED) or req.path in self.OPEN + self.public:
            return
        raise falcon.HTTPUnauthorized(
            title="Unauthorized",
            description="this server needs a token: send 'Authorization: Bearer <token>', "
            "or log in with POST /api/session",
            challenges=["Bearer"],
        )
