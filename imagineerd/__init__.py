"""imagineerd: a self-hosted image-generation daemon.

Plugins import the hook marker from here::

    from imagineerd import hookimpl
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations (``@hookimpl``).
hookimpl = pluggy.HookimplMarker("imagineerd")

__all__ = ["__version__", "hookimpl"]
