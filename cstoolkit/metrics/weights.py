"""Finding and reading metric weights without running pickled code.

A weights location is a local file, or a Hugging Face hub repo ``org/name`` (its usual file name)
or ``org/name:path/in/repo``. ``.safetensors`` files load as they are; ``.pth``/``.bin``/``.pt``
files go through ``torch.load(weights_only=True)`` with one extra class allowed,
``argparse.Namespace`` (the official CSD checkpoint keeps its training arguments in one). A file
that needs anything else is refused with a :class:`~cstoolkit.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..io import load_weights_file


def _looks_like_hub_repo(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~", "/")) and "\\" not in text
            and not text.endswith((".pth", ".pt", ".bin", ".safetensors")))


def resolve_weights(spec: str, where: str, names: Sequence[str] = ()) -> Path:
    """The local path of a weights file: ``spec`` itself, or a hub download (``names`` are tried in
    order when ``spec`` is ``org/name`` without a file)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise UserError(where, f"{path} holds none of {', '.join(names)}", "expected a weights file or a hub repo")
    repo, _, filename = spec.partition(":")
    if _looks_like_hub_repo(repo):
        from huggingface_hub import hf_hub_download

        errors = []
        for name in [filename] if filename else list(names):
            try:
                return Path(hf_hub_download(repo, name))
            except Exception as exc:  # network, missing file, auth
                errors.append(f"{name}: {exc.__class__.__name__}")
        raise UserError(where, f"cannot fetch weights from the hub repo {repo} ({'; '.join(errors)})",
                        "expected a local file, a reachable hub repo, or --metrics-preset tiny")
    raise UserError(where, f"file not found: {spec}",
                    "expected a local .safetensors/.pth/.bin file or a hub repo (org/name[:file])")


def load_weights(path: str | Path, where: str) -> dict[str, Any]:
    """Read a ``.safetensors`` file or a weights-only torch pickle into a mapping."""
    return load_weights_file(path, where)


def state_dict_from(raw: Mapping[str, Any], *, wrappers: Sequence[str] = ("model_state_dict", "state_dict", "model"),
                    prefixes: Sequence[str] = ("module.",), drop: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unwrap a training checkpoint's ``wrappers`` key, strip the
    ``prefixes`` (``module.`` of DistributedDataParallel) and drop keys starting with ``drop``."""
    for key in wrappers:
        if key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        if any(k.startswith(d) for d in drop):
            continue
        out[k] = v
    return out


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` whose mismatch is one user-facing line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(where, "the weights do not fit the model: " + ", ".join(parts),
                        "expected the official checkpoint of this architecture")
    module.load_state_dict(dict(state), strict=True)
