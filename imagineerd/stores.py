"""Which job store a configuration names (``queue.database``), and opening it.

* empty: SQLite in ``paths.state`` (``imagineerd.db``), the one-machine default;
* ``postgresql://...`` (or ``postgres://...``): PostgreSQL, a queue several nodes share;
* ``sqlite:PATH``: SQLite in another file (relative paths are relative to config.yaml).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .store import Store

#: The SQLite file in ``paths.state`` when ``queue.database`` is empty.
DB_NAME = "imagineerd.db"

_FORMS = (
    "empty (SQLite in paths.state), a PostgreSQL URL such as "
    "postgresql://imagineerd@db.lan/imagineerd, or sqlite:/path/to/jobs.db"
)


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(config: Any) -> Store:
    """The store ``config["queue"]["database"]`` names, opened (its schema made or brought
    up to date). Raises :class:`ConfigError` (field ``queue.database``) for a value of no
    accepted form, or a database that cannot be reached or is too new."""
    queue = config["queue"]
    url = (queue.get("database") or "").strip()
    if not url:
        from .sqlite_store import SQLiteStore

        return SQLiteStore(config.path_for("state") / DB_NAME)
    if is_postgres(url):
        from .pg_store import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite:") and url[len("sqlite:") :].strip():
        from .sqlite_store import SQLiteStore

        return SQLiteStore(config.resolve(url[len("sqlite:") :].strip()))
    raise ConfigError(
        f"queue.database must be {_FORMS}; got {redact(url)!r}", field="queue.database"
    )


def redact(url: str, marker: str = "***") -> str:
    """``url`` with any password replaced by ``marker`` (in the user part of a URL and in a
    ``password=`` parameter), for messages, logs and ``GET /api/config``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(?i)(password=)[^&\s]*", lambda m: m.group(1) + marker, url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + marker
        netloc = f"{userinfo}@{hostinfo}"
    query = re.sub(
        r"(?i)(^|&)(password=)[^&]*", lambda m: m.group(1) + m.group(2) + marker, parts.query
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
