"""Gradient checkpointing of the scale-wise transformers (``backbone.gradient_checkpointing``).

On the tiny presets (CPU, fp32) a CSD-VAR step (text encoders with learned tokens, SVD edit, K-V memory
hook on block 0, cross-attention from the step's prompt), a textual-inversion step and a LoRA step give
the same loss and the same gradients with checkpointing on (selective or full) as off. Tolerance: exact
(``torch.equal``): the recomputation runs the same fp32 kernels on the same inputs. The ``auto`` rule is
tested on the presets' tables (no model built).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit.backbones.infinity import backbone as infinity_backbone
from cstoolkit.backbones.infinity import schedule as infinity_schedule
from cstoolkit.backbones.infinity import transformer as infinity_transformer
from cstoolkit.backbones.infinity import vae as infinity_vae
from cstoolkit.backbones.scalewise import AUTO_CHECKPOINT_VOLUME, resolve_checkpointing
from cstoolkit.backbones.switti import backbone as switti_backbone
from cstoolkit.backbones.switti.presets import preset_row
from cstoolkit.errors import UserError
from cstoolkit.lora import LoRASet
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN
from cstoolkit.methods._scalewise_lora import PEFT_PREFIX
from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARInputs, CSDVARTrainer
from cstoolkit.registry import backbones
from cstoolkit.runtime import Runtime, RuntimeConfig

MODES = [(False, True), (True, True), (True, False)]  # (checkpointing, keep attention)


@pytest.fixture(scope="module", params=["switti", "infinity"])
def tiny(request, single_thread):
    cls = backbones()[request.param]
    bb = cls.from_config(cls.Config(preset="tiny"))
    assert bb.transformer.gradient_checkpointing is False  # auto: off on tiny
    bb.freeze()
    return bb


def _set(bb, on: bool, keep: bool) -> None:
    bb.transformer.gradient_checkpointing = on
    bb.transformer.checkpoint_keep_attention = keep


def _csd_var_grads(bb, on: bool, keep: bool) -> dict[str, torch.Tensor]:
    """Loss and gradients of a style and a content step, from the same fresh trainer each time."""
    _set(bb, on, keep)
    runtime = Runtime(RuntimeConfig(seed=0, device="cpu", progress=False, output_dir=tempfile.mkdtemp()))
    inputs = CSDVARInputs(image=str(EXAMPLE), content="balloon", style="mosaic")
    trainer = CSDVARTrainer(CSDVAR(CSDVARConfig(caption_dropout=0.0)), bb, inputs, runtime)
    out = {}
    for step in (0, 1):
        loss, _ = trainer.loss(step)
        params = {k: p for role in ("content", "style") for k, p in trainer.params[role].items()}
        for p in params.values():
            p.grad = None
        loss.backward()
        out[f"{step}.loss"] = loss.detach()
        out.update({f"{step}.{k}": p.grad.clone() for k, p in params.items() if p.grad is not None})
    return out


@pytest.mark.parametrize("on,keep", MODES[1:])
def test_csd_var_step_is_identical_with_checkpointing(tiny, on, keep):
    ref = _csd_var_grads(tiny, False, True)
    got = _csd_var_grads(tiny, on, keep)
    _set(tiny, False, True)
    assert ref.keys() == got.keys()
    assert any(".memory." in k for k in ref)  # the K-V memory hook of block 0 is checkpointed with its block
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("on,keep", MODES[1:])
def test_textual_inversion_step_is_identical_with_checkpointing(tiny, on, keep):
    targets = tiny.image_to_targets(torch.rand(1, 3, 64, 64) * 2 - 1)
    init = {k: torch.randn(2, w, generator=torch.Generator().manual_seed(0)) for k, w in tiny.text_encoders().items()}

    def step(on: bool, keep: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _set(tiny, on, keep)
        vectors = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        text = tiny.encode_text(["a photo of a <c> object in <s> style"],
                                learned={CONTENT_TOKEN: vectors, STYLE_TOKEN: vectors})
        loss = tiny.teacher_forcing_loss(tiny.teacher_forcing_logits(text, targets), targets)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in vectors.items()}

    ref_loss, ref = step(False, True)
    loss, got = step(on, keep)
    _set(tiny, False, True)
    assert torch.equal(ref_loss, loss)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("merge", [False, True])  # True: the GPU path (W0 + B A merged once per step)
@pytest.mark.parametrize("on,keep", MODES[1:])
def test_lora_step_is_identical_with_checkpointing(tiny, on, keep, merge):
    targets = tiny.image_to_targets(torch.rand(1, 3, 64, 64) * 2 - 1)
    text = tiny.encode_text(["a photo of a balloon"])
    names = tiny.adapter_targets(ffn=True)
    dtype = next(tiny.lora_model().parameters()).dtype

    def step(on: bool, keep: bool) -> tuple[float, dict[str, torch.Tensor]]:
        _set(tiny, on, keep)
        loras = LoRASet(tiny.lora_model(), names, 2, ("content",), init="gaussian_a",
                        generator=torch.Generator().manual_seed(0), merge=merge, prefix=PEFT_PREFIX).inject()
        try:
            for bank in loras.banks.values():  # B != 0 so that every LoRA weight gets a gradient
                with torch.no_grad():
                    bank.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            loras.prepare(dtype)
            loss = tiny.teacher_forcing_loss(tiny.teacher_forcing_logits(text, targets), targets)
            loss.backward()
            grads = {f"{k}.{n}": getattr(b, n).grad.clone() for k, b in loras.banks.items()
                     for n in ("lora_A", "lora_B")}
        finally:
            loras.remove()
        return loss.item(), grads

    ref_loss, ref = step(False, True)
    loss, got = step(on, keep)
    _set(tiny, False, True)
    assert ref_loss == loss
    assert all(g.abs().sum() > 0 for g in ref.values())
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_no_checkpoint_without_grad(tiny, monkeypatch):
    """Sampling (no autograd) never goes through torch.utils.checkpoint."""
    from cstoolkit.backbones import scalewise

    calls = []
    monkeypatch.setattr(scalewise, "checkpoint", lambda *a, **k: calls.append(1))
    _set(tiny, True, True)
    try:
        tiny.generate(["a balloon"], seed=0, progress=False)
    finally:
        _set(tiny, False, True)
    assert calls == []


# ------------------------------------------------------------------------------ the auto rule
def _switti(preset: str, mode="auto") -> bool:
    row = preset_row(preset)
    schedule = [(pn, pn) for pn in row.transformer.patch_nums]
    cfg = switti_backbone.SwittiConfig(preset=preset, gradient_checkpointing=mode)
    return switti_backbone.checkpointing_default(cfg, row.transformer, schedule)


def _infinity(preset: str, resolution: int | None = None, mode="auto") -> bool:
    schedule = infinity_schedule.scale_schedule(resolution or infinity_backbone.DEFAULT_RESOLUTION[preset], 1.0,
                                                infinity_vae.PRESETS[preset].patch_size)
    cfg = infinity_backbone.InfinityConfig(preset=preset, gradient_checkpointing=mode)
    return infinity_backbone.checkpointing_default(cfg, infinity_transformer.PRESETS[preset], schedule)


def test_auto_is_on_for_the_presets_that_would_not_fit_a_24_gb_card():
    assert _infinity("infinity-2b") and _switti("switti-1024")  # 6.9e8 / 5.4e8 > 1.8e8
    assert not _switti("switti-ar") and not _switti("switti-512")  # 2,240 tokens x 1920 x 30 = 1.3e8
    for preset in ("tiny", "world"):
        assert not _switti(preset) and not _infinity(preset)
    assert not _infinity("infinity-2b", resolution=256)  # the volume follows the schedule, not the name
    assert _infinity("tiny", mode="on") and not _infinity("infinity-2b", mode="off")
    assert _switti("tiny", mode=True) and not _switti("switti-1024", mode=False)  # YAML 1.1: on/off are booleans
    assert resolve_checkpointing("auto", 10_000, 2000, 10) == (2e8 > AUTO_CHECKPOINT_VOLUME)
    with pytest.raises(UserError, match="gradient_checkpointing"):
        resolve_checkpointing("sometimes", 1, 1, 1)  # type: ignore[arg-type]


def test_recipe_key_takes_on_off_and_booleans(tmp_path):
    from cstoolkit.config import from_dict

    # YAML 1.1 reads an unquoted on/off as true/false: the config maps them back (cstoolkit.config)
    for value, want in (("on", "on"), (True, "on"), ("auto", "auto"), (False, "off")):
        cfg = from_dict(switti_backbone.SwittiConfig, {"preset": "tiny", "gradient_checkpointing": value}, "backbone")
        assert cfg.gradient_checkpointing == want
    with pytest.raises(UserError, match="gradient_checkpointing"):
        from_dict(infinity_backbone.InfinityConfig, {"gradient_checkpointing": "maybe"}, "backbone")
