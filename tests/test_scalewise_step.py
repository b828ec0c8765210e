"""The faster CSD-VAR / textual-inversion step (issue 22 item 3) computes what the old code did, bit for bit.

Each shortcut is compared with the code path it replaced, on the tiny presets (CPU fp32, ``torch.equal``).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit.backbone import ScaleTargets, ScaleWiseBackbone, TextContext
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN
from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARInputs, CSDVARTrainer
from cstoolkit.registry import backbones
from cstoolkit.runtime import Runtime, RuntimeConfig


@pytest.fixture(scope="module")
def tiny(tiny_scalewise):
    return tiny_scalewise


def _learned(bb, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {ph: {k: torch.randn(2, w, generator=g).requires_grad_(True) for k, w in bb.text_encoders().items()}
            for ph in (CONTENT_TOKEN, STYLE_TOKEN)}


def test_per_scale_losses_in_one_pass_equal_the_loss_of_each_scale(tiny):
    targets = tiny.image_to_targets(torch.rand(1, 3, 64, 64) * 2 - 1)
    text = tiny.encode_text(["a photo of a balloon"])
    logits = tiny.teacher_forcing_logits(text, targets)
    n = len(targets.schedule)
    for scales in (range(n), range(2, n), [0, 3]):
        fast = tiny.teacher_forcing_losses(logits, targets, scales)
        slow = ScaleWiseBackbone.teacher_forcing_losses(tiny, logits, targets, scales)  # the old loop
        assert fast.keys() == slow.keys()
        for k in fast:
            assert torch.equal(fast[k], slow[k]), k
    # the full loss with its cached weights is the official formula
    again = tiny.teacher_forcing_loss(logits, targets)
    assert torch.equal(again, tiny.teacher_forcing_loss(logits, ScaleTargets(targets.targets, targets.inputs,
                                                                               list(targets.schedule))))


def test_switti_cross_text_condition_equals_the_replaced_full_condition():
    cls = backbones()["switti"]
    bb = cls.from_config(cls.Config(preset="tiny"))
    bb.freeze()
    targets = bb.image_to_targets(torch.rand(1, 3, 64, 64) * 2 - 1)
    learned = _learned(bb)
    full = bb.encode_text(["A balloon <c> in mosaic <s> style"], learned=learned)
    cross = bb.encode_text(["A balloon in mosaic <s> style"], learned=learned)
    new = torch.cat(bb.teacher_forcing_logits(full, targets, cross_text=cross), dim=1)
    tr = bb.transformer  # the old path: the full prompt's condition, every row's text replaced by with_text
    cond = tr.with_text(bb._condition(full), cross.tokens, cross.mask)
    old = tr.teacher_forcing(cond, targets.inputs, [h for h, _ in targets.schedule])
    assert torch.equal(new, old)


def test_cached_tokenisation_gives_the_same_text_and_gradients(tiny):
    prompts = ["A balloon <c> in mosaic <s> style"]
    learned = _learned(tiny, 1)
    first = tiny.encode_text(prompts, learned=learned)
    first.tokens.sum().backward()
    grads = {(ph, k): v.grad.clone() for ph, d in learned.items() for k, v in d.items()}
    for d in learned.values():
        for v in d.values():
            v.grad = None
    second = tiny.encode_text(prompts, learned=learned)  # from the cache
    second.tokens.sum().backward()
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.mask, second.mask)
    assert all(torch.equal(grads[(ph, k)], v.grad) for ph, d in learned.items() for k, v in d.items())
    other = tiny.encode_text(["a <s> kite"], learned=learned)  # another prompt is not served from the cache
    assert other.tokens.shape[0] == 1 and not torch.equal(other.mask, first.mask)


def test_every_vector_of_a_token_the_prompts_hold_is_stepped():
    """Switti's full prompt gives only the pooled bigG vector: CLIP-L's <s> gets no gradient in a content
    step, yet the official optimiser steps it (weight decay, momentum); so does ours, with a zero gradient."""
    cls = backbones()["switti"]
    bb = cls.from_config(cls.Config(preset="tiny"))
    runtime = Runtime(RuntimeConfig(seed=0, device="cpu", progress=False, output_dir=tempfile.mkdtemp()))
    trainer = CSDVARTrainer(CSDVAR(CSDVARConfig(caption_dropout=0.0)), bb,
                            CSDVARInputs(image=str(EXAMPLE), content="balloon", style="mosaic"), runtime)
    trainer.step(0)  # a style step: the AdamW state of every tensor exists from here on
    before = trainer.tokens["style"]["clip_l"].detach().clone()
    trainer.step(1)  # a content step: <s> is in the full prompt only
    assert trainer.read == {"content", "style"}
    assert torch.equal(trainer.tokens["style"]["clip_l"].grad, torch.zeros_like(before))
    assert not torch.equal(trainer.tokens["style"]["clip_l"].detach(), before)  # moved by AdamW
    empty = trainer._empty
    assert empty is None or isinstance(empty, TextContext)
