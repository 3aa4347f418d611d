"""The HTTP frontend: the original Imagineer REST API, event stream and web UI, on Falcon."""

from .app import create_app

__all__ = ["create_app"]
