"""Break-for-Make on the tiny SDXL: PLP (frozen halves, A·C = 0), MCP routing, make = recombination, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, fit_on

from cstoolkit.backbones.sdxl import build_pipeline
from cstoolkit.errors import UserError
from cstoolkit.lora import lora_state_dict_to_layers
from cstoolkit.methods._sdxl_lora import StaticBatch
from cstoolkit.methods.break_for_make import (
    CONTENT_FILE,
    FUSED_FILE,
    STYLE_FILE,
    BreakForMakeConfig,
    BreakForMakeTrainer,
    frozen_dims,
    full_rank_frozen_halves,
    orthogonal_frozen_halves,
    recombine,
)
from cstoolkit.recipe import load_recipe
from cstoolkit.runtime import Runtime, TrainLoop

EX = ROOT / "examples"


def recipe(out, **params):
    return {
        "method": "break_for_make",
        "backbone": {"name": "sdxl", "preset": "tiny"},
        "inputs": {
            "content_images": [str(EX / "balloon.png")], "content": "balloon",
            "style_images": [str(EX / "style_watercolor.png")], "style": "watercolor",
            "mcp_styles": [{"image": str(EX / "style_neon.png"), "style": "neon"},
                           {"image": str(EX / "style_earth.png"), "style": "earthy"}],
            "mcp_contents": [{"image": str(EX / "content_cube.png"), "content": "cube"}],
        },
        # the exact-orthogonal init (Eq. 14-15), whose A·C = 0 the block tests below check
        "params": {"rank": 4, "lr": 1e-3, "steps": 3, "make_steps": 2, "init": "orthogonal", **params},
        "generate": {"both": ["A <c> in <s> style"], "steps": 2},
        "runtime": {"output_dir": str(out), "progress": False, "device": "cpu", "seed": 0},
    }


fit = fit_on



@pytest.fixture(scope="module")
def fitted(backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bfm")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    dec = fit(recipe(tmp / "run"), backbone)
    dec.save(tmp / "dec")
    return dec, before, tmp


@pytest.fixture(scope="module")
def unmade(backbone, tmp_path_factory):
    """No MCP, no make steps: LoRA_f is the bare recombination."""
    return fit(recipe(tmp_path_factory.mktemp("bfm0") / "run", mcp=False, make_steps=0, steps=2), backbone)


def halves(state, ratio=0.5):
    """{layer: (A, B, C, D)} of a PLP LoRA: W_up = [A; B], W_down = [C D]."""
    out = {}
    for name, (down, up) in lora_state_dict_to_layers(state).items():
        d_up, d_down = frozen_dims(up.shape[0], down.shape[1], ratio)
        out[name] = (up[:d_up], up[d_up:], down[:, :d_down], down[:, d_down:])
    return out


def test_base_unchanged_and_every_projection_adapted(fitted, backbone):
    dec, before, _ = fitted
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    n_attn = sum(1 for _ in backbone.attention_layers())
    for rel in (CONTENT_FILE, STYLE_FILE, FUSED_FILE):
        assert len(lora_state_dict_to_layers(dec.files[rel])) == 4 * n_attn
    assert dec.meta["loras"] == {"both": [FUSED_FILE]}


def test_orthogonal_init_gives_vanishing_product():
    a, c = orthogonal_frozen_halves(3, 40, 24, 8, 1 / 8, torch.Generator().manual_seed(0))
    assert a.shape == (3, 40, 8) and c.shape == (3, 8, 24)
    assert (a @ c).abs().max() < 1e-6 * a.abs().max() * c.abs().max() * 8  # Eq. 15: A·C = 0
    assert a.std() == pytest.approx(1 / 8, rel=0.3) and c.std() == pytest.approx(1 / 8, rel=0.3)


def test_trainer_init_is_plp(backbone):
    cfg = BreakForMakeConfig(rank=4, init="orthogonal")
    trainer = BreakForMakeTrainer(backbone, cfg, lora_generator=torch.Generator().manual_seed(1))
    try:
        for key, (up, down) in trainer.initial.items():
            d_up, d_down = frozen_dims(up.shape[1], down.shape[2], 0.5)
            a, c = up[:, :d_up], down[:, :, :d_down]
            assert (a @ c).abs().max() < 1e-6  # A·C ≈ 0 at init (Eq. 14-15)
            assert a.abs().sum() > 0 and c.abs().sum() > 0
            assert torch.all(up[:, d_up:] == 0) and torch.all(down[:, :, d_down:] == 0)  # B = D = 0: ΔW = 0
            mask_up, mask_down = trainer.masks[key]
            assert mask_up.sum() == up.shape[1] - d_up and mask_down.sum() == down.shape[2] - d_down
    finally:
        trainer.loras.remove()


def numerical_rank(t: torch.Tensor) -> int:
    s = torch.linalg.svdvals(t.double())
    return int((s > 1e-6 * s[0]).sum())


def test_full_rank_init_keeps_rank_r_with_a_small_product(backbone):
    """The default init (official construction, every layer): A and C of rank r, A·C small, D starts non-zero;
    the exact-orthogonal init leaves A and C at rank r/2 (A·C = 0 forces rank(A) + rank(C) <= r)."""
    r = 8
    a, c = full_rank_frozen_halves(2, 48, 40, r, 1 / r, torch.Generator().manual_seed(0))
    for i in range(2):
        assert numerical_rank(a[i]) == r and numerical_rank(c[i]) == r  # content's B·C can reach rank r
        gram = a[i].double().T @ a[i].double() + c[i].double() @ c[i].double().T  # one basis split in two
        assert torch.allclose(gram, gram[0, 0] * torch.eye(r, dtype=torch.float64), atol=1e-6)
        rel = ((a[i] @ c[i]).norm() / (a[i].norm() * c[i].norm())).item()
        assert rel < 2.0 / r ** 0.5  # A·C ≈ 0 within the tolerance of near-orthogonal rows
    a0, c0 = orthogonal_frozen_halves(1, 48, 40, r, 1 / r, torch.Generator().manual_seed(0))
    assert numerical_rank(a0[0]) == r // 2 and numerical_rank(c0[0]) == r // 2
    trainer = BreakForMakeTrainer(backbone, BreakForMakeConfig(rank=4), lora_generator=torch.Generator().manual_seed(1))
    try:
        assert trainer.cfg.init == "full_rank"
        for up, down in trainer.initial.values():
            d_up, d_down = frozen_dims(up.shape[1], down.shape[2], 0.5)
            a, c = up[:, :d_up], down[:, :, :d_down]
            for i in range(up.shape[0]):
                assert numerical_rank(a[i]) == min(4, d_up) and numerical_rank(c[i]) == min(4, d_down)
            assert torch.all(up[:, d_up:] == 0) and down[:, :, d_down:].abs().sum() > 0  # B = 0, D ~ N(0, std)
    finally:
        trainer.loras.remove()


def test_frozen_halves_never_change(fitted, backbone):
    dec, _, _ = fitted
    trainer = BreakForMakeTrainer(backbone, BreakForMakeConfig(rank=4, init="orthogonal"),
                                  lora_generator=Runtime(load_recipe(dec.recipe).runtime).generator(1))
    trainer.load()  # the PLP init, drawn as fit draws it
    init = halves(trainer.export())
    trainer.loras.remove()
    parts = {rel: halves(dec.files[rel]) for rel in (CONTENT_FILE, STYLE_FILE, FUSED_FILE)}
    for name, (a0, _, c0, _) in init.items():
        for rel, layers in parts.items():
            a, b, c, d = layers[name]
            assert torch.equal(a, a0) and torch.equal(c, c0), (rel, name)  # A and C: exactly the init
            assert (a @ c).abs().max() < 1e-6  # the top-left block of ΔW stays 0
    # the trainable halves did train: content B (and D through MCP), style D (and B through MCP)
    changed = {rel: [sum(t.abs().sum() for t in (layers[n][i] for n in layers)) > 0 for i in (1, 3)]
               for rel, layers in parts.items()}
    assert changed[CONTENT_FILE] == [True, True] and changed[STYLE_FILE] == [True, True]


def test_without_mcp_each_concept_trains_only_its_half(unmade):
    content, style = halves(unmade.files[CONTENT_FILE]), halves(unmade.files[STYLE_FILE])
    assert all(torch.all(d == 0) for _, _, _, d in content.values())  # content never touches D ...
    assert any(b.abs().sum() > 0 for _, b, _, _ in content.values())  # ... and trains B
    assert all(torch.all(b == 0) for _, b, _, _ in style.values())  # style never touches B ...
    assert any(d.abs().sum() > 0 for _, _, _, d in style.values())  # ... and trains D


def test_fused_is_exactly_the_recombination_before_fine_tuning(unmade, fitted):
    content, style, fused = (unmade.files[r] for r in (CONTENT_FILE, STYLE_FILE, FUSED_FILE))
    expected = recombine(content, style)  # LoRA_f = W_up of LoRA_c with W_down of LoRA_s
    assert fused.keys() == expected.keys() and all(torch.equal(fused[k], expected[k]) for k in fused)
    for name, (a, b, c, d) in halves(fused).items():  # ΔW_f = [[0, A D_s], [B_c C, B_c D_s]] (Eq. 16)
        _, b_c, _, _ = halves(content)[name]
        _, _, _, d_s = halves(style)[name]
        assert torch.equal(b, b_c) and torch.equal(d, d_s)
        down, up = lora_state_dict_to_layers(fused)[name]
        delta = up @ down
        d_up, d_down = a.shape[0], c.shape[1]
        assert delta[:d_up, :d_down].abs().max() < 1e-6
        assert torch.allclose(delta[d_up:, :d_down], b_c @ c, atol=1e-7)
        assert torch.allclose(delta[:d_up, d_down:], a @ d_s, atol=1e-7)
    # after the make stage LoRA_f has moved away from the bare recombination
    made = fitted[0]
    remade = recombine(made.files[CONTENT_FILE], made.files[STYLE_FILE])
    assert any(not torch.equal(made.files[FUSED_FILE][k], remade[k]) for k in remade)


def test_routing_of_gradients(backbone):
    trainer = BreakForMakeTrainer(backbone, BreakForMakeConfig(rank=4), lora_generator=torch.Generator().manual_seed(1))
    try:
        lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        cond = backbone.encode_prompt(["A sks balloon"])
        batch = StaticBatch(backbone, lat, cond)
        for up, down in ((True, False), (False, True)):
            trainer.start("content")
            batch.fill(lat, cond, torch.Generator().manual_seed(3))
            trainer.train_halves(up=up, down=down)
            trainer.diffusion_loss(batch).backward()
            for key, bank in trainer.loras.banks.items():
                mask_up, mask_down = trainer.masks[key]
                if up:
                    assert bank.lora_A.grad is None and torch.all(bank.lora_B.grad * ~mask_up == 0)
                    assert bank.lora_B.grad.abs().sum() > 0
                else:
                    assert bank.lora_B.grad is None and torch.all(bank.lora_A.grad * ~mask_down == 0)
                    assert bank.lora_A.grad.abs().sum() > 0
            trainer.optimizer.zero_grad(set_to_none=True)
    finally:
        trainer.loras.remove()


def test_loras_load_in_diffusers(fitted):
    dec, _, tmp = fitted
    pipe = build_pipeline("tiny")
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(0))
    for role, rel in (("content", CONTENT_FILE), ("style", STYLE_FILE), ("fused", FUSED_FILE)):
        pipe.load_lora_weights(str(tmp / "dec" / role), adapter_name=role)
        pipe.set_adapters([role])
        layer = pipe.unet.get_submodule(name)
        f = dec.files[rel]
        ref = x @ layer.base_layer.weight.t() + (x @ f[f"unet.{name}.lora_A.weight"].float().t()) @ f[
            f"unet.{name}.lora_B.weight"].float().t()
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, atol=1e-5)


def test_generate_uses_fused_for_both(fitted):
    dec, _, _ = fitted
    both = dec.generate("A <c> in <s> style", use="both", seed=1, steps=2, progress=False)
    again = dec.generate("A <c> in <s> style", use="both", seed=1, steps=2, progress=False)
    content = dec.generate("A <c> in <s> style", use="content", seed=1, steps=2, progress=False)
    assert both[0].size == (128, 128) and both[0].tobytes() == again[0].tobytes()
    assert content[0].tobytes() != both[0].tobytes()


def test_mcp_needs_its_images(tmp_path, backbone):
    data = recipe(tmp_path / "run")
    data["inputs"]["mcp_styles"] = []
    with pytest.raises(UserError, match="inputs.mcp_styles"):
        fit(data, backbone)
    data["inputs"]["mcp_styles"] = [{"image": str(EX / "style_neon.png")}]
    with pytest.raises(UserError, match=r"inputs.mcp_styles\[0\]"):
        load_recipe(data)
    with pytest.raises(UserError, match=r"params: ratio \(d\) must lie strictly between 0 and 1"):
        load_recipe(recipe(tmp_path / "run", ratio=1.0))


def test_mcp_captions_name_the_other_factor_where_given():
    from cstoolkit.methods.break_for_make import BreakForMake, BreakForMakeInputs, ContentImage, StyleImage

    method = BreakForMake(BreakForMakeConfig())
    inputs = BreakForMakeInputs(content_images=["c.png"], content="star", style_images=["s.png"], style="gradient")
    # the official examples: "A Christmas tree in w@z sticker style", "A photo of snq teapot"
    assert method.mcp_style_prompt(inputs, StyleImage("x.png", "sticker", content="Christmas tree")) == \
        "A Christmas tree in w@z sticker style"
    assert method.mcp_content_prompt(inputs, ContentImage("y.png", "moon", style="mosaic")) == \
        "A sks moon in mosaic style"
    # without the other factor: the concept's own caption, as before
    assert method.mcp_style_prompt(inputs, StyleImage("x.png", "sticker")) == "An image in w@z sticker style"
    assert method.mcp_content_prompt(inputs, ContentImage("y.png", "moon")) == "A sks moon"


def test_resume_across_stages_is_bit_identical(tmp_path, monkeypatch, backbone):
    full = recipe(tmp_path / "full", steps=2, make_steps=2, mcp_schedule="cycle")
    part = recipe(tmp_path / "part", steps=2, make_steps=2, mcp_schedule="cycle")
    for r in (full, part):
        r["runtime"]["checkpoint_every"] = 1
    ref = fit(full, backbone)
    original = TrainLoop.log

    def crash(self, **metrics):
        original(self, **metrics)
        if self.stage == "style" and self._step == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLoop, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(part, backbone)
    monkeypatch.setattr(TrainLoop, "log", original)
    resumed = fit(part, backbone, resume=True)
    for rel in (CONTENT_FILE, STYLE_FILE, FUSED_FILE):
        for k, v in ref.files[rel].items():
            assert torch.equal(v, resumed.files[rel][k]), (rel, k)


def test_micro_batches_accumulate_the_same_loss_and_gradient(backbone):
    from cstoolkit.lora import LoRASet
    from cstoolkit.methods._sdxl_lora import target_linears

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 16, 16, generator=g)
    cond = backbone.encode_prompt(["a", "b c", "d e f"])
    batch = StaticBatch(backbone, latents, cond)
    batch.fill(latents, cond, torch.Generator().manual_seed(1))
    loras = LoRASet(backbone.unet, target_linears(backbone)[:8], 2, ("x",), generator=g).inject()
    try:
        grads, losses = [], []
        for micro in (0, 1, 2):
            bank = next(iter(loras.banks.values()))
            bank.lora_A.grad = None
            total = torch.zeros(())
            for part, weight in batch.split(micro):
                loras.prepare(torch.float32)
                loss = part.loss() * weight
                loss.backward()
                total = total + loss.detach()
            losses.append(total)
            grads.append(bank.lora_A.grad.clone())
        assert len(batch.split(1)) == 3 and [w for _, w in batch.split(2)] == [2 / 3, 1 / 3]
        for loss, grad in zip(losses[1:], grads[1:]):
            assert torch.allclose(loss, losses[0], atol=1e-6)
            assert torch.allclose(grad, grads[0], atol=1e-6)
    finally:
        loras.remove()
