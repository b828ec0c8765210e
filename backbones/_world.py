"""Where the ``world`` presets find their trained weights (package data of ``cstoolkit.world``).

The world package (world/, installed as ``cstoolkit.world``) trains tiny backbones on its synthetic
images and ships them under ``world/weights/<backbone>/``. The backbones only look the folder up
here (no import of the world package); ``CSTOOLKIT_WORLD_WEIGHTS=/some/dir`` points at another
``<dir>/<backbone>/`` (freshly trained weights, tests).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from cstoolkit.errors import UserError

ENV = "CSTOOLKIT_WORLD_WEIGHTS"


def world_weights_dir(backbone: str) -> Path:
    """The folder of ``backbone``'s world weights (it may not exist)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser() / backbone
    spec = importlib.util.find_spec("cstoolkit.world")
    if spec is None or not spec.submodule_search_locations:
        return Path("cstoolkit/world/weights") / backbone
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / backbone


def world_weights(backbone: str, files: Sequence[str]) -> Path:
    """The folder of ``backbone``'s world weights; a one-line :class:`UserError` if a file is missing."""
    root = world_weights_dir(backbone)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise UserError("backbone.preset", f"the world preset of {backbone} has no trained weights "
                        f"({root / missing[0]} is missing)",
                        f"expected the weights shipped in cstoolkit/world/weights/{backbone}/ (made with "
                        f"`cstoolkit world train {backbone}`), ${ENV}/{backbone}/, or another preset")
    return root
