"""The phase timer of a run: nesting, loop sub-phases, phases.json."""

from __future__ import annotations

import json
import os

from cstoolkit.phases import PhaseTimer
from cstoolkit.runtime import Runtime


def test_phases_nest_switch_and_are_written(tmp_path):
    timer = PhaseTimer(tmp_path / "phases.json")
    with timer("build"):
        pass
    with timer("fit"):
        for step in range(5):
            timer.switch("warmup" if step < 2 else "train")  # one record per run of equal names
        with timer("save"):
            pass
    record = json.loads((tmp_path / "phases.json").read_text())
    names = [(p["phase"], p["depth"]) for p in record["phases"]]
    assert names == [("build", 0), ("fit/warmup", 1), ("fit/train", 1), ("fit/save", 1), ("fit", 0)]
    fit = record["phases"][-1]
    assert fit["seconds"] >= sum(p["seconds"] for p in record["phases"][1:4]) - 1e-3
    assert record["total_s"] >= fit["seconds"]


def test_runtime_phase_uses_its_timer():
    runtime = Runtime()
    with runtime.phase("x"):
        pass
    assert [p["phase"] for p in runtime.phases.summary()["phases"]] == ["x"]


def test_cuda_allocator_setting_respects_the_user(monkeypatch):
    """runtime.cuda_memory: expandable sets PYTORCH_CUDA_ALLOC_CONF before CUDA starts, never over the user's."""
    import torch

    from cstoolkit.runtime import configure_cuda_allocator

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert configure_cuda_allocator("default") is False
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert configure_cuda_allocator("expandable") is True
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert configure_cuda_allocator("expandable") is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
