"""cstoolkit: content-style decomposition and style personalisation of text-to-image models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Decomposer", "Decomposition", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import cstoolkit` stays cheap for the CLI
    if name in ("Decomposer", "Decomposition"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
