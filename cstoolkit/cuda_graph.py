"""Replay a fixed training step as one CUDA graph.

At batch 1 a UNet step on an H100/H200 is bound by the CPU launching thousands of small kernels,
not by the GPU. A training step whose shapes and tensors never change (one image, fixed prompts:
the single-image methods) can be captured once and replayed: the same kernels on the same memory,
with random draws from registered generators advancing as in eager mode.

Rules for a graphed step: no host synchronisation inside (no ``.item()``, no data-dependent Python
branches), tensors it reads are updated in place (parameters, masks), ``torch.optim`` optimisers
are built with ``capturable=True``, and its outputs are read after :meth:`GraphedStep.__call__`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

#: eager calls of a :class:`GraphedStep` before it captures (the next call captures, then replays)
EAGER_WARMUP = 3


class GraphedStep:
    """Capture ``fn`` (a full forward/backward/optimizer step) after warm-up, then replay it.

    ``generators`` are CUDA generators used inside ``fn``; they are registered with the graph so
    each replay draws fresh numbers (simpler and as fast: draw random inputs eagerly into static
    tensors before each call, as the methods here do). ``fn`` must return a tensor or a dict of
    tensors (static outputs, overwritten by each replay). If capture fails the step runs eagerly.
    ``before_capture`` drops what the eager calls left alive that the step makes anew (per-step merged
    weights, gradients): freed before capture, their memory goes back to the driver instead of sitting
    beside the graph's private pool for the rest of the run.
    """

    def __init__(self, fn: Callable[[], Any], *, generators: Sequence[torch.Generator] = (), warmup: int = EAGER_WARMUP,
                 stream: torch.cuda.Stream | None = None, before_capture: Callable[[], Any] | None = None):
        self.fn = fn
        self.before_capture = before_capture
        self.generators = list(generators)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.failed = False
        self._calls = 0
        self._side: torch.cuda.Stream | None = stream

    def __call__(self) -> Any:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if self._calls < self.warmup or self.failed:
            self._calls += 1
            if self.failed:
                return self.fn()
            with torch.cuda.stream(self._stream()):  # eager warm-up on a side stream (lazy inits)
                out = self.fn()
            torch.cuda.current_stream().wait_stream(self._stream())
            return out
        for attempt in (1, 2):  # a first capture in a process can trip over lazy CUDA inits: retry once
            if self.before_capture is not None:
                self.before_capture()
            torch.cuda.synchronize()
            gc.collect()  # free tensors of eager steps before capture starts
            # hand the eager steps' cached blocks back: the graph gets its own pool, and blocks cached for
            # eager activations would otherwise stay reserved beside it for the rest of the run
            torch.cuda.empty_cache()
            graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                graph.register_generator_state(g)
            try:
                with torch.cuda.graph(graph, stream=self._stream()):
                    self.outputs = self.fn()
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0]
                del graph
                torch.cuda.synchronize()
                if attempt == 2 or self.generators:  # something in the step cannot be captured: stay eager
                    log.warning("CUDA graph capture failed (%s); continuing without it", reason)
                    self.failed = True
                    return self.fn()
                continue
            self.graph = graph
            graph.replay()
            return self.outputs
        raise AssertionError("unreachable")

    @property
    def captured(self) -> bool:
        """Whether the step now replays a captured graph."""
        return self.graph is not None

    def release(self) -> None:
        """Drop the captured graph and its memory pool (the next call captures again, without warm-up).

        Call :func:`release_graphs` when a stage ends or before eager work that needs memory: a graph's
        private pool stays reserved as long as the graph lives.
        """
        self.graph = None
        self.outputs = None

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run eager work that touches the step's tensors (warm-up, other steps) on the capture stream.

        Autograd ties a parameter's gradient accumulation to the stream of its first backward; if
        that is the default (legacy) stream, a later capture fails. Run every step in here.
        """
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def _stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
        return self._side


def cuda_graphs_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def graph_steps(enabled: bool, fns: dict[str, Callable[[], Any]], *,
                before_capture: Callable[[], Any] | None = None) -> dict[str, Callable[[], Any]]:
    """Each step function as a :class:`GraphedStep` (``enabled``: CUDA graphs wanted) sharing one capture
    stream (autograd ties a parameter's gradient accumulation to the stream of its first backward);
    ``before_capture``: see :class:`GraphedStep`."""
    if not enabled:
        return dict(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return {name: GraphedStep(fn, stream=stream, before_capture=before_capture) for name, fn in fns.items()}


def on_capture_stream(step: Callable[[], Any]) -> contextlib.AbstractContextManager:
    """Where eager work touching a graphed step's tensors must run (see :meth:`GraphedStep.on_stream`)."""
    return step.on_stream() if isinstance(step, GraphedStep) else contextlib.nullcontext()


def release_graphs(*steps: Callable[[], Any]) -> None:
    """Release the graphs of these steps (plain functions are skipped), then hand the freed pools
    back to the driver, so that the next stage (or sampling) does not sit beside them."""
    released = False
    for step in steps:
        if isinstance(step, GraphedStep) and step.graph is not None:
            step.release()
            released = True
    if released:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
