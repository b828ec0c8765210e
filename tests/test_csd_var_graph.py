"""CUDA-graph option of CSD-VAR's trainer (``CSDVARTrainer(cuda_graph=True)``): off CUDA the fixed-tensor step
(targets copied into fixed tensors, caption dropout selected by a fixed 0/1 tensor inside the step, what a
dropped caption leaves unstepped put back) runs eagerly and is bitwise the eager trainer; its step function makes
no host sync; resume from a checkpoint is unchanged; ``CSDVAR.fit`` graphs only with ``runtime.cuda_graph: on``."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit.backbone import ScaleWiseBackbone
from cstoolkit.methods import csd_var
from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARInputs, CSDVARTrainer
from cstoolkit.runtime import Runtime, RuntimeConfig

STEPS = 8  # seed 0: both targets (image, mirror image) drawn, with caption dropout or without
INPUTS = CSDVARInputs(image=str(EXAMPLE), content="balloon", style="mosaic")


@pytest.fixture(scope="module")
def tiny(tiny_scalewise) -> ScaleWiseBackbone:
    return tiny_scalewise


def _trainer(tiny, tmp_path, cuda_graph: bool, **params) -> CSDVARTrainer:
    runtime = Runtime(RuntimeConfig(seed=0, device="cpu", progress=False, output_dir=str(tmp_path / "run")))
    return CSDVARTrainer(CSDVAR(CSDVARConfig(**params)), tiny, INPUTS, runtime, cuda_graph=cuda_graph)


def _learned(trainer: CSDVARTrainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.state.params.items()}


def _assert_same(eager: CSDVARTrainer, graphed: CSDVARTrainer) -> None:
    """Learned tensors and optimiser states bitwise equal; a state the eager optimiser never made (a tensor it
    never stepped) is the fresh one (zeros, step 0) in the graphed trainer."""
    a, b = _learned(eager), _learned(graphed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, opt in eager.optimizers.items():
        other = graphed.optimizers[name]
        for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
            ref, got = opt.state.get(p, {}), other.state.get(q, {})
            if not ref:
                assert all(float(t.abs().sum()) == 0 for t in got.values())
                continue
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k].to(ref[k])) for k in ref)


@pytest.mark.parametrize("params", [
    {"caption_dropout": 0.5},  # official: one AdamW over both roles, SVD in hidden mode
    {"caption_dropout": 0.0},
    {"caption_dropout": 0.5, "optimizer": "adam_per_role"},
    {"caption_dropout": 0.5, "alternating": False},
    {"caption_dropout": 0.5, "svd_mode": "embedding", "grad_clip": 0.0},
])
def test_cuda_graph_is_a_no_op_on_a_cpu(tiny, tmp_path, params):
    """cuda_graph=True on a CPU: the fixed-tensor step runs eagerly (nothing captured) and gives the eager
    trainer's losses, learned tensors and optimiser states bitwise, with flips and caption dropout drawn in the
    same order. Infinity's empty prompt has another padded length than the full one: with caption dropout its
    trainer stays eager (logged)."""
    eager = _trainer(tiny, tmp_path / "eager", False, **params)
    graphed = _trainer(tiny, tmp_path / "graph", True, **params)
    assert not eager.static and not graphed.cuda_graph and not graphed.captured  # captured on CUDA only
    assert graphed.static == (tiny.name != "infinity" or not params["caption_dropout"])
    ref, got, draws = [], [], []
    for i in range(STEPS):
        ref.append(eager.step(i))
        got.append(graphed.step(i))
        draws.append(graphed.last_draw)
        assert graphed.read == eager.read  # the roles whose tokens the step's prompts held
    assert torch.equal(torch.stack(ref), torch.stack(got))
    _assert_same(eager, graphed)
    if graphed.static:  # the draws the fixed tensors carried: both targets, and both dropout outcomes
        assert {i for i, _ in draws} == {0, 1}
        assert {d for _, d in draws} == ({True, False} if params["caption_dropout"] else {False})


def test_the_put_back_is_what_keeps_a_dropped_caption_step_eager(tmp_path, single_thread):
    """On Switti (content and style tokens both in the full prompt, which a dropout replaces): without putting
    back the tokens the full prompt alone reads (stepped by the graph with a zero gradient), the graphed trainer
    parts from the eager one at the first dropout; with it, it does not (previous test)."""
    from cstoolkit.registry import backbones

    cls = backbones()["switti"]
    bb = cls.from_config(cls.Config(preset="tiny"))
    bb.freeze()
    eager = _trainer(bb, tmp_path / "eager", False, caption_dropout=0.5)
    graphed = _trainer(bb, tmp_path / "graph", True, caption_dropout=0.5)
    assert graphed._reads["style"][2] == {"content"} and graphed._reads["content"][2] == {"style"}
    graphed._reads = {k: (reads, context, set()) for k, (reads, context, _) in graphed._reads.items()}
    eager.step(0)
    graphed.step(0)
    assert graphed.last_draw == (0, True)  # seed 0: the first step drops the caption
    assert not torch.equal(eager.tokens["content"]["clip_l"], graphed.tokens["content"]["clip_l"])


def _refuse_host_syncs(monkeypatch, optimizers) -> None:
    """``.item()``, ``bool()``, ``float()``, ``int()`` and ``.tolist()`` of a tensor raise, but on the optimisers'
    step counters (a CPU Adam reads its CPU step count on the host: no device sync; capturable on CUDA it does
    not)."""
    allowed = {id(st["step"]) for opt in optimizers for st in opt.state.values() if "step" in st}
    assert allowed

    def refusing(name: str):
        original = getattr(torch.Tensor, name)

        def refuse(self, *args, **kwargs):
            if id(self) in allowed:
                return original(self, *args, **kwargs)
            raise AssertionError(f"Tensor.{name} inside the step function (a host sync a CUDA graph cannot hold)")
        return refuse

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refusing(name))


def test_step_functions_make_no_host_sync(tiny, tmp_path, monkeypatch):
    """The style and content step functions (what a CUDA graph captures) read nothing back to the host, as
    transformers' text encoders run while a CUDA stream captures (they then skip their own host checks of the
    attention mask, e.g. T5's "no padding" test)."""
    from transformers.utils import import_utils

    trainer = _trainer(tiny, tmp_path, True, caption_dropout=0.0 if tiny.name == "infinity" else 0.5)
    assert trainer.static and set(trainer._steps) == {"style", "content"}
    trainer.step(0)
    trainer.step(1)
    with monkeypatch.context() as m:
        m.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
        _refuse_host_syncs(m, trainer.optimizers.values())
        for kind in ("style", "content"):
            out = trainer._steps[kind]()
            assert isinstance(out, torch.Tensor) and not out.requires_grad and out.dim() == 0


def test_resume_mid_run_is_unchanged(tiny, tmp_path):
    """A graphed (fixed-tensor) run stopped after 3 steps and resumed from its checkpoint into a fresh trainer
    ends where the uninterrupted run ends, which is where the eager run ends."""
    dropout = 0.0 if tiny.name == "infinity" else 0.5
    whole = _trainer(tiny, tmp_path / "whole", True, caption_dropout=dropout)
    losses = [whole.step(i) for i in range(STEPS)]
    first = _trainer(tiny, tmp_path / "part", True, caption_dropout=dropout)
    for i in range(3):
        first.step(i)
    folder = first.runtime.save_checkpoint("csd_var", 3, first.state)
    resumed = _trainer(tiny, tmp_path / "part", True, caption_dropout=dropout)
    assert resumed.runtime.load_checkpoint(folder, resumed.state) == 3
    assert torch.equal(torch.stack([resumed.step(i) for i in range(3, STEPS)]), torch.stack(losses[3:]))
    _assert_same(whole, resumed)
    eager = _trainer(tiny, tmp_path / "eager", False, caption_dropout=dropout)
    for i in range(STEPS):
        eager.step(i)
    _assert_same(eager, resumed)


class _Built(Exception):
    """Raised by the spied trainer constructor: the fit stops once the trainer's arguments are known."""


@pytest.mark.parametrize("setting, expected", [("auto", False), ("on", True), ("off", False)])
def test_fit_graphs_only_when_asked(tiny, tmp_path, monkeypatch, setting, expected):
    """CSDVAR.fit passes cuda_graph=True only for runtime.cuda_graph: on (no GPU run has checked the captured
    step yet; auto keeps it eager), on CUDA; the runtime's device is made to look like CUDA."""
    runtime = Runtime(RuntimeConfig(seed=0, device="cpu", progress=False, cuda_graph=setting,
                                    output_dir=str(tmp_path / "run")))
    runtime._device = torch.device("cuda")  # what a GPU run sees (nothing here touches the device)
    assert runtime.cuda_graph_asked == expected
    assert runtime.use_cuda_graph == (setting != "off")  # what the checked steps follow
    seen: list = []

    def build(*args, **kwargs):
        seen.append(kwargs.get("cuda_graph"))
        raise _Built

    monkeypatch.setattr(csd_var, "CSDVARTrainer", build)
    with pytest.raises(_Built):
        CSDVAR(CSDVARConfig(steps=2)).fit(tiny, INPUTS, runtime)
    assert seen == [expected]
