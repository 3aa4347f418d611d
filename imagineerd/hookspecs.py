"""The plugin contract of imagineerd: every hook a plugin may implement.

Plugins are found through the ``imagineerd`` entry-point group (or registered in-process) and
implement these hooks with ``from imagineerd import hookimpl``. Built-in behaviour (the
diffusers backend, the YAML and TXT prompt-file parsers) is provided through the very same
hooks, so anything built in can be extended or overridden.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .backends import BackendRegistry

hookspec = pluggy.HookspecMarker("imagineerd")


@hookspec
def imagineerd_register_backends(registry: BackendRegistry) -> None:
    """Add generation backends to ``registry``.

    Called once at start-up, before the configured backend is looked up by ``model.backend``.
    Call ``registry.add(name, factory)`` for each backend; ``factory(settings)`` is called on
    the worker thread with the ``model:`` section of config as a dict (``name`` made absolute
    when it is a local path, ``cache_dir`` resolved) and must return an object with
    ``generate(batch, on_step) -> list[PIL.Image.Image]``. Return value: ignored.
    """


@hookspec
def imagineerd_job_submitted(job: dict[str, Any]) -> None:
    """A job was accepted and queued.

    ``job`` is the job as ``GET /api/jobs/<id>`` shows it. Called on the submitting thread
    after the job is durable; keep it quick. Exceptions are logged and otherwise ignored.
    Return value: ignored.
    """


@hookspec
def imagineerd_job_finished(job: dict[str, Any]) -> None:
    """A job reached ``completed``, ``failed`` or ``cancelled``.

    ``job`` is the job as the API shows it (``output_path`` set when completed, ``error``
    when failed). Called on the worker thread after the store was updated; keep it quick.
    Exceptions are logged and otherwise ignored. Return value: ignored.
    """


@hookspec
def imagineerd_prompt_file_suffixes() -> list[str]:
    """File name suffixes the inbox takes, lower case with the dot (e.g. ``[".csv"]``).

    Called once when the inbox starts; the results of all plugins are combined. Files with
    other suffixes are left alone (and reported once in the log). Files taken are handed to
    :func:`imagineerd_parse_prompt_file`. The built-in plugins return ``.yaml``, ``.yml`` and
    ``.txt``.
    """


@hookspec(firstresult=True)
def imagineerd_parse_prompt_file(path: Path, text: str) -> list[dict[str, Any]] | None:
    """Turn a prompt file dropped into the inbox into raw job requests.

    ``path`` is the file (already claimed, its name tells the format); ``text`` its contents
    decoded as UTF-8. Return a list of dicts (the fields of ``POST /api/generate``; each is
    validated afterwards exactly as an API request), or ``None`` when this plugin does not
    handle the format, so the next plugin is asked. Raise
    ``imagineerd.errors.ValidationError`` with a message a non-programmer can act on
    (name the line or item) when the file is of your format but wrong. The first non-None
    result wins; the built-in YAML and TXT parsers run last.
    """
