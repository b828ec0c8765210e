"""Break-for-Make on the scale-wise backbones (issue 20): the three stages on the teacher-forcing cross-entropy,
which half each stage trains, fused q|k|v layers split per projection, the make stage's recombination, the saved
decomposition (PEFT layout), resume, determinism, cross-combination."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, fit_on, logits_with_lora, random_targets

from cstoolkit.backbone import ScaleWiseBackbone
from cstoolkit.backbones.infinity import InfinityBackbone
from cstoolkit.decomposition import Decomposition
from cstoolkit.lora import lora_state_dict_to_layers
from cstoolkit.methods._scalewise_lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    PEFT_PREFIX,
    LoRAGenerateConfig,
    sample_scalewise,
)
from cstoolkit.methods.break_for_make import (
    CONTENT_PEFT,
    FUSED_PEFT,
    STAGES,
    STYLE_PEFT,
    BreakForMakeConfig,
    ScaleWiseBreakForMakeData,
    ScaleWiseBreakForMakeTrainer,
    frozen_dims,
    frozen_rows,
    recombine,
    same_frozen_halves,
)
from cstoolkit.runtime import TrainLoop

EX = ROOT / "examples"
RUNTIME = {"progress": False, "device": "cpu", "seed": 0}
ROLES = {"content": CONTENT_PEFT, "style": STYLE_PEFT, "fused": FUSED_PEFT}


@pytest.fixture(scope="module")
def tiny(tiny_scalewise) -> ScaleWiseBackbone:
    return tiny_scalewise


def _name(backbone: ScaleWiseBackbone) -> str:
    return "infinity" if isinstance(backbone, InfinityBackbone) else "switti"


def _data(backbone: ScaleWiseBackbone) -> ScaleWiseBreakForMakeData:
    """Random images with the method's captions: one content, one style, two MCP styles, one MCP content."""
    def items(seeds, prompt):
        with torch.no_grad():
            text = backbone.encode_text([prompt])
        return [(random_targets(backbone, s), text) for s in seeds]

    return ScaleWiseBreakForMakeData(content=items([1], "A sks star"), style=items([2], "An image in w@z mosaic style"),
                                     mcp_styles=items([3, 4], "An image in w@z neon style"),
                                     mcp_contents=items([5], "A sks cup"))


def halves(state: dict[str, torch.Tensor], parts: dict[str, int], ratio: float = 0.5):
    """{layer: (A, B, C, D)} of a PEFT-layout PLP LoRA: A, B the frozen / trainable rows of W_up (per projection
    in a fused layer), C, D the frozen / trainable columns of W_down."""
    out = {}
    for name, (down, up) in lora_state_dict_to_layers(state, PEFT_PREFIX).items():
        rows = frozen_rows(up.shape[0], ratio, parts.get(name, 1))
        d_down = frozen_dims(up.shape[0], down.shape[1], ratio)[1]
        out[name] = (up[rows], up[~rows], down[:, :d_down], down[:, d_down:])
    return out


def recipe(backbone: str, out, **params):
    return {
        "method": "break_for_make",
        "backbone": {"name": backbone, "preset": "tiny"},
        "inputs": {
            "content_images": [str(EX / "world_star_neon.png")], "content": "star",
            "style_images": [str(EX / "world_tree_mosaic.png")], "style": "mosaic",
            "mcp_styles": [{"image": str(EX / "world_cup_striped.png"), "style": "striped", "content": "cup"},
                           {"image": str(EX / "world_boat_hatched.png"), "style": "hatched"}],
            "mcp_contents": [{"image": str(EX / "world_moon_mosaic.png"), "content": "moon", "style": "mosaic"}],
        },
        "params": {"rank": 4, "lr": 1e-2, "steps": 2, "make_steps": 2, **params},
        "runtime": {"output_dir": str(out), **RUNTIME},
    }


# ------------------------------------------------------------------------------------ the trainer
def test_fused_layers_split_per_projection(tiny):
    """q|k|v (and k|v) in one linear layer: each projection's rows are split as a layer of its own, so the content
    half B reaches q, k and v alike (a contiguous split would leave q to A alone)."""
    assert frozen_rows(12, 0.5, 3).tolist() == [True, True, False, False] * 3
    assert torch.equal(frozen_rows(10, 0.5), torch.arange(10) < 5)  # one projection: the first d_up rows
    parts = tiny.fused_projections()
    assert sorted(set(parts.values())) == [2, 3] and set(parts) <= set(tiny.adapter_targets())
    trainer = ScaleWiseBreakForMakeTrainer(tiny, BreakForMakeConfig(rank=4), merge=False,
                                           lora_generator=torch.Generator().manual_seed(1))
    try:
        for key, bank in trainer.loras.banks.items():
            mask_up, _ = trainer.masks[key]
            for i, name in enumerate(bank.names):
                k = parts.get(name, 1)
                trainable = mask_up[min(i, mask_up.shape[0] - 1), :, 0].view(k, -1)
                size = bank.out_features // k
                assert trainable.sum(1).tolist() == [size - frozen_dims(size, 2, 0.5)[0]] * k, name
                up = trainer.initial[key][0][i]
                assert torch.all(up[mask_up[min(i, mask_up.shape[0] - 1), :, 0]] == 0)  # B = 0 at init
                assert torch.all(up[~mask_up[min(i, mask_up.shape[0] - 1), :, 0]].abs().sum(-1) > 0)  # A drawn
    finally:
        trainer.loras.remove()


@pytest.mark.parametrize("mcp", [False, True])
def test_each_stage_trains_only_its_half(tiny, mcp):
    """content: B (and, through MCP, D); style: D (and, through MCP, B); make: B and D. A, C and the transformer
    stay bit-identical throughout."""
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    parts = tiny.fused_projections()
    trainer = ScaleWiseBreakForMakeTrainer(tiny, BreakForMakeConfig(rank=4, lr=1e-2, mcp=mcp), _data(tiny),
                                           merge=False, lora_generator=torch.Generator().manual_seed(1))
    try:
        trainer.load()
        init = halves(trainer.export(), parts)
        loras = {}
        for stage in STAGES:
            start = trainer.fused_start(loras["content"], loras["style"]) if stage == "make" else None
            trainer.start(stage, None, start)
            first = halves(trainer.export(), parts)
            logs = [trainer.step(i) for i in range(2)]
            assert all(np.isfinite(v) for log in logs for v in log.values())
            assert ("mcp" in logs[0]) == (mcp and stage != "make")
            loras[stage] = trainer.export()
            trainer.finish()
            last = halves(loras[stage], parts)
            moved = [any(not torch.equal(first[n][j], last[n][j]) for n in last) for j in range(4)]  # A, B, C, D
            expected = {"content": [False, True, False, mcp], "style": [False, mcp, False, True],
                        "make": [False, True, False, True]}[stage]
            assert moved == expected, stage
            for n, (a, _, c, _) in last.items():  # the frozen halves: exactly the init
                assert torch.equal(a, init[n][0]) and torch.equal(c, init[n][2]), (stage, n)
    finally:
        trainer.loras.remove()
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("merge", [False, True])
def test_gradients_reach_only_the_chosen_half(tiny, merge):
    """Own pass: only B's trainable rows (per projection) get a gradient, W_down none; and the reverse. The merged
    banks (the GPU path) route the same gradients as the unmerged ones."""
    data = _data(tiny)
    grads = {}
    for m in (False, merge):
        trainer = ScaleWiseBreakForMakeTrainer(tiny, BreakForMakeConfig(rank=4), merge=m,
                                               lora_generator=torch.Generator().manual_seed(1))
        try:
            trainer.start("content")
            for up, down in ((True, False), (False, True)):
                trainer.train_halves(up=up, down=down)
                trainer.loss(data.content[0]).backward()
                for key, bank in trainer.loras.banks.items():
                    mask_up, mask_down = trainer.masks[key]
                    if up:
                        assert bank.lora_A.grad is None and torch.all(bank.lora_B.grad * ~mask_up == 0)
                        assert bank.lora_B.grad.abs().sum() > 0
                        grads[(m, key, "B")] = bank.lora_B.grad.clone()
                    else:
                        assert bank.lora_B.grad is None and torch.all(bank.lora_A.grad * ~mask_down == 0)
                        assert bank.lora_A.grad.abs().sum() > 0
                        grads[(m, key, "A")] = bank.lora_A.grad.clone()
                trainer.optimizer.zero_grad(set_to_none=True)
        finally:
            trainer.finish()
            trainer.loras.remove()
    for (m, key, half), g in grads.items():
        assert torch.allclose(g, grads[(False, key, half)], rtol=1e-4, atol=1e-6), (m, key, half)


# ------------------------------------------------------------------------------------ fit and files
@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bfm_sw")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    dec = fit_on(recipe(_name(tiny), tmp / "run"), tiny)
    dec.save(tmp / "dec")
    return dec, before, tmp


def test_fit_leaves_the_base_and_keeps_the_init(fitted, tiny):
    dec, before, _ = fitted
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dec.meta["layout"] == "peft" and dec.meta["loras"] == {"both": [FUSED_PEFT]}
    parts = dec.meta["plp"]["parts"]
    assert parts == {n: k for n, k in tiny.fused_projections().items()}
    # the PLP init as fit draws it (seed 0 + 1), then A and C bit-identical in LoRA_c, LoRA_s and LoRA_f
    trainer = ScaleWiseBreakForMakeTrainer(tiny, BreakForMakeConfig(rank=4), merge=False,
                                           lora_generator=torch.Generator().manual_seed(1))
    trainer.load()
    init = halves(trainer.export(), parts)
    trainer.loras.remove()
    files = {role: halves(dec.files[rel], parts) for role, rel in ROLES.items()}
    for role, layers in files.items():
        assert sorted(layers) == sorted(tiny.adapter_targets())
        for name, (a, _, c, _) in layers.items():
            assert torch.equal(a, init[name][0]) and torch.equal(c, init[name][2]), (role, name)
    # MCP: content trained B (own) and D (other styles), style D (own) and B (other contents)
    for role in ("content", "style"):
        assert all(any(not torch.equal(files[role][n][j], init[n][j]) for n in init) for j in (1, 3)), role


def test_make_starts_from_the_recombination(tiny, fitted, tmp_path):
    """make_steps 0: LoRA_f is exactly W_up of LoRA_c with W_down of LoRA_s; fine-tuned, it moves away."""
    unmade = fit_on(recipe(_name(tiny), tmp_path / "run", mcp=False, make_steps=0), tiny)
    content, style, fused = (unmade.files[r] for r in (CONTENT_PEFT, STYLE_PEFT, FUSED_PEFT))
    expected = recombine(content, style)
    assert fused.keys() == expected.keys() and all(torch.equal(fused[k], expected[k]) for k in fused)
    assert all(k.startswith(PEFT_PREFIX + ".") for k in fused)
    parts = unmade.meta["plp"]["parts"]
    c, s, f = (halves(x, parts) for x in (content, style, fused))
    for name, (_, b, _, d) in f.items():  # B from the content stage, D from the style stage
        assert torch.equal(b, c[name][1]) and torch.equal(d, s[name][3])
    made = fitted[0]
    remade = recombine(made.files[CONTENT_PEFT], made.files[STYLE_PEFT])
    assert any(not torch.equal(made.files[FUSED_PEFT][k], remade[k]) for k in remade)


def test_saved_decomposition_reloads_loads_in_peft_and_generates(tiny, fitted):
    from peft import PeftModel

    dec, _, tmp = fitted
    for role in ROLES:
        assert (tmp / "dec" / role / ADAPTER_FILE).is_file() and (tmp / "dec" / role / CONFIG_FILE).is_file()
    loaded = Decomposition.load(tmp / "dec")
    for rel, tensors in dec.files.items():
        assert all(torch.equal(tensors[k], loaded.files[rel][k]) for k in tensors), rel
    # the fused adapter as saved, through PEFT, gives the logits of our layers
    targets = random_targets(tiny, 7)
    with torch.no_grad():
        text = tiny.encode_text(["A sks star in w@z mosaic style"])
    ours = torch.cat([x.reshape(-1) for x in logits_with_lora(tiny, loaded.files[FUSED_PEFT], text, targets)])
    model = tiny.lora_model()
    peft_model = PeftModel.from_pretrained(model, str(tmp / "dec" / "fused"))
    try:
        with torch.no_grad():
            theirs = torch.cat([x.reshape(-1) for x in tiny.teacher_forcing_logits(text, targets)])
    finally:
        peft_model.unload()
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # every use generates; "both" is LoRA_f alone
    method, options = dec.method_impl, LoRAGenerateConfig()
    images = {}
    for use, prompt in (("content", "a <c>"), ("style", "a fish in <s> style"), ("both", "a <c> in <s> style")):
        out = method.generate(tiny, loaded, [prompt], use, num_images=1, seed=1, options=options, progress=False)
        assert len(out) == 1 and len(out[0]) == 1 and min(out[0][0].size) >= 16
        images[use] = np.asarray(out[0][0])
    fused = sample_scalewise(tiny, {"fused": loaded.files[FUSED_PEFT]}, ["a <c> in <s> style"], loaded.placeholders,
                             num_images=1, seed=1, options=options, progress=False)[0][0]
    both_as_content = method.generate(tiny, loaded, ["a <c> in <s> style"], "content", num_images=1, seed=1,
                                      options=options, progress=False)[0][0]
    assert np.array_equal(images["both"], np.asarray(fused))
    assert not np.array_equal(images["both"], np.asarray(both_as_content))


def test_same_seed_same_files_and_cross_combination(tiny, fitted, tmp_path):
    """A second run with the same seed gives the same files bit for bit; its style recombines with the first's
    content (same frozen halves: LoRA_f from LoRA_c and LoRA_s, no fine-tuning). Another seed draws other halves:
    the two LoRAs are then added."""
    dec, _, _ = fitted
    again = fit_on(recipe(_name(tiny), tmp_path / "again"), tiny)
    assert sorted(again.files) == sorted(dec.files)
    for rel, tensors in dec.files.items():
        assert all(torch.equal(tensors[k], again.files[rel][k]) for k in tensors), rel
    other = recipe(_name(tiny), tmp_path / "other")
    other["runtime"]["seed"] = 1
    other = fit_on(other, tiny)
    parts = {f"{PEFT_PREFIX}.{n}": k for n, k in dec.meta["plp"]["parts"].items()}
    assert same_frozen_halves(dec.files[CONTENT_PEFT], again.files[STYLE_PEFT], 0.5, parts)
    assert not same_frozen_halves(dec.files[CONTENT_PEFT], other.files[STYLE_PEFT], 0.5, parts)
    method = dec.method_impl
    joined = method.combine(method.part(dec, "content"), method.part(again, "style"))
    assert joined.meta["loras"] == {"both": [FUSED_PEFT]} and joined.meta["layout"] == "peft"
    expected = recombine(dec.files[CONTENT_PEFT], again.files[STYLE_PEFT])
    assert all(torch.equal(joined.files[FUSED_PEFT][k], expected[k]) for k in expected)
    added = method.combine(method.part(dec, "content"), method.part(other, "style"))
    assert FUSED_PEFT not in added.files and "loras" not in added.meta
    out = method.generate(tiny, added, ["a <c> in <s> style"], "both", num_images=1, seed=1,
                          options=LoRAGenerateConfig(), progress=False)
    assert len(out[0]) == 1


class _Interrupt(Exception):
    pass


def test_resume_mid_stage_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Stopped in the middle of the style stage (checkpoint every step), resumed: the same files as an
    uninterrupted run, with only the steps after the checkpoint run again."""
    full = recipe(_name(tiny), tmp_path / "full", steps=3, make_steps=2, mcp_schedule="cycle")
    full["runtime"]["checkpoint_every"] = 1
    ref = fit_on(full, tiny)
    original, seen = TrainLoop.__iter__, {"n": 0, "stop": 5}  # 3 content steps, then 2 of 3 style steps

    def counted(self):
        for step in original(self):
            if seen["stop"] is not None and seen["n"] >= seen["stop"]:
                raise _Interrupt
            seen["n"] += 1
            yield step

    monkeypatch.setattr(TrainLoop, "__iter__", counted)
    cut = recipe(_name(tiny), tmp_path / "cut", steps=3, make_steps=2, mcp_schedule="cycle")
    cut["runtime"]["checkpoint_every"] = 1
    with pytest.raises(_Interrupt):
        fit_on(cut, tiny)
    seen.update(n=0, stop=None)
    resumed = fit_on(cut, tiny, resume=True)
    assert seen["n"] == 3  # the last style step and the two make steps
    for rel, tensors in ref.files.items():
        assert all(torch.equal(tensors[k], resumed.files[rel][k]) for k in tensors), rel
