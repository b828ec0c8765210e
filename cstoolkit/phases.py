"""Phase timer: wall time and CUDA memory of the phases of a run (build, fit stages, save, sample).

``Runtime.phases`` holds one; methods and the API mark phases with ``with runtime.phase("fit"):``.
Every finished phase is logged at info level and, once a run folder is set, the record is rewritten
to ``<run>/phases.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

GIB = 2.0 ** 30


def cuda_in_use() -> bool:
    """Whether this process has initialised CUDA (a CPU run never touches the CUDA allocator)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def free_cuda_memory() -> None:
    """Collect garbage and hand the CUDA caching allocator's unused blocks back (between stages)."""
    gc.collect()
    if cuda_in_use():
        torch.cuda.empty_cache()


class PhaseTimer:
    """Wall time and, where CUDA is in use, peak allocated / peak reserved memory per phase.

    ``with timer("fit"):`` times a phase; phases nest (recorded as ``fit/content``). Inside a loop,
    :meth:`switch` ends the sub-phase the previous ``switch`` started and starts the next one; such
    sub-phases end at the latest with the enclosing ``with`` or where the next ``with`` starts.
    Peaks are the allocator's ``max_memory_allocated`` / ``max_memory_reserved`` over the phase
    (nested phases reset the allocator's counters; the timer folds them into every open phase first).
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._stack: list[dict[str, Any]] = []
        #: other records of the run by kind, written beside the phases (e.g. ``compile``: one per compile)
        self.notes: dict[str, list[dict[str, Any]]] = {}
        self._t0 = time.perf_counter()

    def _flush_peaks(self) -> None:
        if not cuda_in_use():
            return
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        for entry in self._stack:
            entry["alloc"] = max(entry["alloc"], alloc)
            entry["reserved"] = max(entry["reserved"], reserved)
        torch.cuda.reset_peak_memory_stats()

    def start(self, name: str, *, switched: bool = False) -> None:
        """Begin phase ``name`` inside the current one."""
        self._flush_peaks()
        path = "/".join([e["name"] for e in self._stack] + [name])
        self._stack.append({"name": name, "path": path, "t": time.perf_counter(), "alloc": 0, "reserved": 0,
                            "switched": switched})

    def stop(self) -> dict[str, Any]:
        """End the innermost phase; returns its record."""
        cuda = cuda_in_use()
        if cuda:
            torch.cuda.synchronize()
        self._flush_peaks()
        entry = self._stack.pop()
        record: dict[str, Any] = {"phase": entry["path"], "depth": len(self._stack),
                                  "start_s": round(entry["t"] - self._t0, 3),
                                  "seconds": round(time.perf_counter() - entry["t"], 3)}
        if cuda:
            record.update(peak_allocated_gib=round(entry["alloc"] / GIB, 3),
                          peak_reserved_gib=round(entry["reserved"] / GIB, 3),
                          end_allocated_gib=round(torch.cuda.memory_allocated() / GIB, 3),
                          end_reserved_gib=round(torch.cuda.memory_reserved() / GIB, 3))
            log.info("phase %s: %.2f s, peak %.2f GiB allocated / %.2f GiB reserved, %.2f GiB reserved at its end",
                     record["phase"], record["seconds"], record["peak_allocated_gib"], record["peak_reserved_gib"],
                     record["end_reserved_gib"])
        else:
            log.info("phase %s: %.2f s", record["phase"], record["seconds"])
        self.records.append(record)
        self.write()
        return record

    def switch(self, name: str) -> None:
        """End the sub-phase the last :meth:`switch` started (if still open) and start ``name``; a no-op
        while that sub-phase is ``name`` (call it every step of a loop)."""
        if self._stack and self._stack[-1]["switched"]:
            if self._stack[-1]["name"] == name:
                return
            self.stop()
        self.start(name, switched=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._stack and self._stack[-1]["switched"]:  # a loop's sub-phase ends where the next phase starts
            self.stop()
        self.start(name)
        depth = len(self._stack)
        try:
            yield
        finally:
            while len(self._stack) > depth:  # sub-phases started by switch()
                self.stop()
            self.stop()

    def note(self, kind: str, record: dict[str, Any]) -> None:
        """Add a record of ``kind`` (e.g. a compile: seconds, cold or warm cache) and rewrite the file."""
        self.notes.setdefault(kind, []).append(dict(record))
        self.write()

    def summary(self) -> dict[str, Any]:
        """``{"total_s": seconds since the timer was made, "phases": [records in the order they ended]}`` and,
        when any were added, the :meth:`note` records by kind (``"compile": [...]``)."""
        out: dict[str, Any] = {"total_s": round(time.perf_counter() - self._t0, 3), "phases": list(self.records)}
        out.update({kind: list(records) for kind, records in self.notes.items()})
        return out

    def write(self) -> None:
        """Rewrite :attr:`path` (when set and its folder exists) with :meth:`summary`, atomically."""
        if self.path is None or not self.path.parent.is_dir():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2))
        os.replace(tmp, self.path)
