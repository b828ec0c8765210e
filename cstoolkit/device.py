"""The ``--device`` option every command shares: one set of choices, one check.

``auto`` (the default: the first CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. A device this machine does not have stops the command with one line that names the
option and lists what exists, before any model is loaded or any file is written.
"""

from __future__ import annotations

import argparse
import re

from .errors import UserError

__all__ = ["DEVICE_HELP", "add_device_argument", "available_devices", "check_device", "runtime_device"]

DEVICE_HELP = "auto (default: cuda if available, else cpu), cpu, cuda or cuda:N"


def available_devices() -> list[str]:
    """The devices of this machine: ``cpu`` and ``cuda:0`` ... ``cuda:N-1``."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def check_device(value: str | None, where: str = "--device") -> str | None:
    """``value`` checked against this machine (``None`` stays ``None``: the command's default, auto).

    Raises a :class:`UserError` naming ``where`` for an unknown device or one that is not here.
    """
    if value is None:
        return None
    dev = str(value).strip().lower()
    if dev in ("auto", "cpu"):
        return dev
    here = ", ".join(available_devices())
    m = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if m is None:
        raise UserError(where, f"unknown device '{value}'",
                        f"expected auto, cpu, cuda or cuda:N (this machine has: {here})")
    import torch

    if not torch.cuda.is_available():
        raise UserError(where, f"'{value}' was asked for but this machine has no CUDA GPU",
                        f"expected auto or cpu (this machine has: {here})")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UserError(where, f"'{value}' does not exist", f"expected one of: auto, cuda, {here}")
    return dev


def runtime_device(value: str | None, where: str = "--device") -> str | None:
    """``value`` checked and turned into a recipe's ``runtime.device`` (``auto``, ``cpu`` or ``cuda``).

    ``cuda:N`` makes GPU ``N`` the current CUDA device, which ``cuda`` then means.
    """
    dev = check_device(value, where)
    if dev is None or ":" not in dev:
        return dev
    import torch

    torch.cuda.set_device(int(dev.split(":", 1)[1]))
    return "cuda"


def add_device_argument(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """Add ``--device`` (checked later with :func:`check_device`, so mistakes end in one line)."""
    parser.add_argument("--device", default=None, metavar="DEVICE", help=help)
