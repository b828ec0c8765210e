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


#: kernel (or, on a CPU, operator) name fragments -> the category a profile sums them under; first match wins
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "matmul", "mm_", "addmm", "bmm", "cublas", "nvjet", "aten::mm",
              "aten::linear")),
    ("norm", ("norm", "rms")),
    ("cast/copy", ("copy", "cast", "convert", "to_copy", "cat", "transpose", "contiguous", "index", "scatter",
                   "gather", "fill")),
    ("reduce", ("reduce", "sum", "softmax", "logsumexp", "nll", "cross_entropy")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_poi", "mul", "add", "silu",
                     "gelu", "exp", "neg", "where")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, parts in KERNEL_CATEGORIES:
        if any(p in low for p in parts):
            return category
    return "other"


def profile_calls(fn: Callable[[], Any], device: torch.device, calls: int = 3, top: int = 12) -> dict[str, Any]:
    """Where the time of ``calls`` calls of ``fn`` goes, per call: wall seconds, the device's busy time
    (kernel durations summed: on a GPU, kernels of one stream do not overlap, so ``busy / wall`` below 1 is
    time the GPU waited for the host), kernel launches, the busy time per kernel category
    (``KERNEL_CATEGORIES``) and the ``top`` kernels. On a CPU the operators' self times stand for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # nothing first-call-only inside the window
    sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = (time.perf_counter() - t) / calls
    kernels: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        else:
            if e.key.startswith(("ProfilerStep", "autograd::engine")) or "::" not in e.key:
                continue
            us = e.self_cpu_time_total
        if us > 0:
            kernels[e.key] = [us / 1e6 / calls, e.count / calls]
    busy = sum(s for s, _ in kernels.values())
    by_category: dict[str, float] = {}
    for name, (s, _) in kernels.items():
        by_category[kernel_category(name)] = by_category.get(kernel_category(name), 0.0) + s
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"calls": calls, "wall_s": round(wall, 5), "busy_s": round(busy, 5),
            "busy_over_wall": round(busy / wall, 3) if wall else None,
            "launches": round(sum(n for _, n in kernels.values())),
            "categories_s": {k: round(v, 5) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "s": round(s, 6), "count": round(c, 1), "category": kernel_category(n)}
                    for n, (s, c) in ranked]}
