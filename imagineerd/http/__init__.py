"""The HTTP frontend: the seed's REST API, the event stream and the web UI, on Falcon."""

from .app import create_app

__all__ = ["create_app"]
