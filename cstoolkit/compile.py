"""torch.compile for training steps: a module's forward compiled (switchable per call), the compile cache on
disk under the user's cache folder, and a record of each compile: how long it took, cold or warm cache.

A compiled forward is installed on the module itself (an instance ``forward``), so every caller of the
module (a backbone's loss, a method's own forward) runs it compiled, and :meth:`CompiledForward.remove`
gives the plain module back (before sampling, say). The first step that runs it pays the compile: Dynamo
traces the forward, AOTAutograd builds forward and backward graphs, Inductor generates kernels. The last
two are cached on disk (Inductor's FX graph cache and AOTAutograd's cache), so a second process with
the same model and settings loads them instead (a warm cache); only the Dynamo trace is paid again.

:func:`configure_cache` puts those caches under ``$XDG_CACHE_HOME/cstoolkit/torch_compile`` (default
``~/.cache/cstoolkit/torch_compile``) instead of PyTorch's default in the temporary folder, which does
not outlive a reboot; a ``TORCHINDUCTOR_CACHE_DIR`` the user set is left as it is.

A compiled step may still be captured and replayed as a CUDA graph (:mod:`cstoolkit.cuda_graph`): the
compile happens in the graph's eager warm-up calls, the capture records the compiled kernels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

#: (counter group, counter) read around a compile: Inductor's FX graph cache and AOTAutograd's cache
_COUNTERS = {
    "fx_hits": ("inductor", "fxgraph_cache_hit"),
    "fx_misses": ("inductor", "fxgraph_cache_miss"),
    "aot_hits": ("aot_autograd", "autograd_cache_hit"),
    "aot_misses": ("aot_autograd", "autograd_cache_miss"),
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cstoolkit/torch_compile`` (``~/.cache/cstoolkit/torch_compile`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cstoolkit" / "torch_compile"


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
    except ImportError:  # pragma: no cover - older PyTorch
        return None
    return os.path.abspath(torch_default())


def user_cache_dir() -> Path | None:
    """The ``TORCHINDUCTOR_CACHE_DIR`` the user set, if any (PyTorch writes its own default into that
    variable once it has used the cache: that one is not the user's)."""
    value = os.environ.get(CACHE_ENV)
    if not value or os.path.abspath(value) == _torch_default_cache_dir():
        return None
    return Path(value)


def _set_flag(module: Any, name: str, value: bool, env: str) -> None:
    """Set a PyTorch config flag unless the user forced it with its environment variable."""
    if env not in os.environ and hasattr(module, name):
        setattr(module, name, value)


def configure_cache(cache_dir: str | Path | None = None) -> Path:
    """Keep the compile caches on disk and say where: the user's ``TORCHINDUCTOR_CACHE_DIR`` if set,
    else ``cache_dir``, else :func:`default_cache_dir`. Turns on Inductor's FX graph cache and
    AOTAutograd's cache (also for graphs with custom autograd functions, e.g. the fused LoRA layers)
    unless their environment variables say otherwise."""
    chosen = user_cache_dir() or Path(cache_dir if cache_dir is not None else default_cache_dir())
    chosen = chosen.expanduser().resolve()
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(chosen)  # read by Inductor (and Triton's cache below it) on every lookup
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    _set_flag(inductor_config, "fx_graph_cache", True, "TORCHINDUCTOR_FX_GRAPH_CACHE")
    _set_flag(functorch_config, "enable_autograd_cache", True, "TORCHINDUCTOR_AUTOGRAD_CACHE")
    _set_flag(functorch_config, "autograd_cache_allow_custom_autograd_functions", True,
              "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD")
    return chosen


def cache_counters() -> dict[str, int]:
    """Cache hits and misses of this process so far (``fx_hits``, ``fx_misses``, ``aot_hits``, ``aot_misses``)."""
    from torch._dynamo.utils import counters

    return {key: int(counters[group][name]) for key, (group, name) in _COUNTERS.items()}


def compile_timings() -> dict[str, float]:
    """PyTorch's cumulative compile timers of this process (``torch._dynamo.utils.compile_times``, seconds by
    timer: ``bytecode_tracing`` = Dynamo's trace, ``OutputGraph.call_user_compiler`` = the backend: AOTAutograd and
    Inductor, or their cache loads, ...); empty where this PyTorch does not offer them."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return {str(n): float(v) for n, v in zip(names, values)}
    except Exception:  # pragma: no cover - the timers are internal API
        return {}


def count_files(folder: str | Path) -> int:
    """Files below ``folder`` (0 when it does not exist)."""
    return sum(len(files) for _, _, files in os.walk(folder))


def cache_state(delta: dict[str, int]) -> str:
    """``cold`` (only misses), ``warm`` (only hits), ``partly warm`` (both), or ``in memory`` (neither:
    compiled earlier in this process). A backend without an on-disk cache records ``none``."""
    hits = delta["fx_hits"] + delta["aot_hits"]
    misses = delta["fx_misses"] + delta["aot_misses"]
    if hits and misses:
        return "partly warm"
    if misses:
        return "cold"
    if hits:
        return "warm"
    return "in memory"


@dataclass
class CompileRecord:
    """One compile: ``seconds`` is the wall time of the first step that ran the compiled forward (trace,
    compile or load forward and backward, and that step itself)."""

    label: str
    seconds: float
    cache: str
    cache_dir: str
    files_before: int
    files_after: int
    fx_hits: int = 0
    fx_misses: int = 0
    aot_hits: int = 0
    aot_misses: int = 0
    failed: str = ""
    #: where the seconds went, by PyTorch's compile timer (those above 0.05 s; see :func:`compile_timings`)
    timers: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.failed:
            return f"compile of {self.label} failed after {self.seconds:.1f} s ({self.failed}); running eagerly"
        return (f"compile of {self.label}: {self.seconds:.1f} s, {self.cache} cache ({self.fx_hits} FX graph hits / "
                f"{self.fx_misses} misses, {self.aot_hits} AOTAutograd hits / {self.aot_misses} misses; "
                f"{self.files_before} -> {self.files_after} files in {self.cache_dir})"
                + ("; timers: " + ", ".join(f"{k} {v:.1f} s" for k, v in list(self.timers.items())[:5])
                   if self.timers else ""))


def have_cxx_compiler() -> bool:
    """Whether a C++ compiler is on the PATH (Inductor builds its CPU kernels with one)."""
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


class CompiledForward:
    """``module``'s forward under ``torch.compile`` (static shapes), installed on the module.

    ``step(fn)`` wraps a training step: its first call is the compile (timed, cache hits counted, logged,
    handed to ``on_record``, and recorded as the phase ``compile`` of ``phases`` when given); should it
    fail, the step runs eagerly from then on with a warning. :meth:`eager` runs the plain forward for a
    while (steps that change what the forward does, e.g. recording per-layer gradients).
    """

    def __init__(self, module: nn.Module, *, label: str = "", backend: str = "inductor", mode: str | None = None,
                 cache_dir: str | Path | None = None, phases: Any = None,
                 on_record: Callable[[CompileRecord], None] | None = None):
        self.module = module
        self.label = label or type(module).__name__
        self.backend = backend
        self.cache_dir = configure_cache(cache_dir) if backend == "inductor" else None
        self.phases = phases
        self.on_record = on_record
        self.records: list[CompileRecord] = []
        self.failed = ""
        self._plain = module.forward  # the class's forward, bound
        self._compiled = torch.compile(self._plain, backend=backend, mode=mode, dynamic=False)
        self._eager = 0
        self.install()

    # ------------------------------------------------------------------ the forward
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._eager or self.failed:
            return self._plain(*args, **kwargs)
        return self._compiled(*args, **kwargs)

    def install(self) -> None:
        """Make the module's forward this compiled one."""
        self.module.__dict__["forward"] = self

    def remove(self) -> None:
        """Give the module its plain forward back."""
        if self.module.__dict__.get("forward") is self:
            del self.module.__dict__["forward"]

    @property
    def installed(self) -> bool:
        return self.module.__dict__.get("forward") is self

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run the plain forward inside."""
        self._eager += 1
        try:
            yield
        finally:
            self._eager -= 1

    # ------------------------------------------------------------------ the step
    def step(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` whose first call that reaches the compiled forward is timed as the compile."""
        state = {"pending": True}

        @functools.wraps(fn)
        def wrapped() -> Any:
            if not state["pending"] or self.failed or self._eager:
                return fn()
            state["pending"] = False
            return self._first_call(fn)

        return wrapped

    def _first_call(self, fn: Callable[[], Any]) -> Any:
        cache = str(self.cache_dir) if self.cache_dir is not None else f"(backend {self.backend}: no disk cache)"
        files_before = count_files(self.cache_dir) if self.cache_dir is not None else 0
        before = cache_counters()
        timers_before = compile_timings()
        if self.phases is not None:
            self.phases.start("compile")
        _sync()
        t0 = time.perf_counter()
        failed = ""
        try:
            out = fn()
            _sync()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # Dynamo/Inductor could not compile this step: keep training, eagerly
            failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            self.failed = failed
            out = None
        seconds = time.perf_counter() - t0
        if self.phases is not None:
            self.phases.stop()
        after = cache_counters()
        delta = {k: after[k] - before[k] for k in after}
        timers = {k: round(v - timers_before.get(k, 0.0), 2) for k, v in compile_timings().items()}
        timers = dict(sorted(((k, v) for k, v in timers.items() if v > 0.05), key=lambda kv: -kv[1]))
        state = cache_state(delta) if self.cache_dir is not None else "none"
        record = CompileRecord(label=self.label, seconds=round(seconds, 3), cache=state, cache_dir=cache,
                               files_before=files_before,
                               files_after=count_files(self.cache_dir) if self.cache_dir is not None else 0,
                               failed=failed, timers=timers, **delta)
        self.records.append(record)
        (log.warning if failed else log.info)("%s", record.describe())
        if self.on_record is not None:
            self.on_record(record)
        if failed:
            return fn()
        return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
