"""What the benchmark scripts share: importing the toolkit from a plain checkout, and timing a call on
the CPU or a GPU (wall time between device synchronisations; median and min-max of the repeats)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_toolkit(*modules: str) -> None:
    """Make ``cstoolkit.backbones`` / ``cstoolkit.methods`` importable from a plain checkout (installed
    package or not); ``modules`` are imported first to see whether that is needed."""
    try:
        for name in modules:
            importlib.import_module(name)
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import cstoolkit  # noqa: F401

    for name, folder in (("cstoolkit.backbones", "backbones"), ("cstoolkit.methods", "methods")):
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call: ``repeats`` values, each the mean of ``inner`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        out.append((time.perf_counter() - t) / inner)
    return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float] | None:
    """Peak allocated and peak reserved GPU memory of one call of ``fn`` from an emptied cache (GiB, 3
    decimals): ``{"allocated": ..., "reserved": ...}``; None on the CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return {"allocated": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "reserved": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max (4 decimals) and count of ``values``."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}
