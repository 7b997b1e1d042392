"""cometstream: a daemon that delivers a Comet Backup Server's live events to sinks."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
