"""UnZipLoRA on the tiny SDXL: masks, what trains, diffusers round trip, generation, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit import Decomposer, Decomposition
from cstoolkit.lora import LoRASet
from cstoolkit.methods._sdxl_lora import image_latents, target_linears
from cstoolkit.methods.unziplora import (
    ADAPTERS,
    MERGERS_FILE,
    ColumnMasks,
    UnZipLoRAConfig,
    UnZipLoRATrainer,
    block_of,
    separated_prompts,
)
from cstoolkit.runtime import TrainLoop

N_ROUNDS = 3


def recipe(out, **params):
    return {
        "method": "unziplora",
        "backbone": {"name": "sdxl", "preset": "tiny"},
        "inputs": {"image": str(EXAMPLE), "content": "balloon", "style": "flat illustration"},
        "params": {"rank": 4, "lr": 1e-3, "steps": 6, "warmup_steps": 2, "recalibrate_every": 2, **params},
        "generate": {"both": ["A <c> in <s> style in a boat"], "steps": 2, "num_images": 1},
        "runtime": {"output_dir": str(out), "progress": False, "device": "cpu", "seed": 0},
    }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uz")
    decomposer = Decomposer.from_recipe(recipe(tmp / "run"))
    before = {k: v.clone() for k, v in decomposer.backbone.state_dict().items()}
    dec = decomposer.fit()
    dec.save(tmp / "dec")
    return decomposer, dec, before, tmp


def test_frozen_base_does_not_move_and_layers_are_restored(fitted):
    decomposer, dec, before, _ = fitted
    after = decomposer.backbone.state_dict()
    assert before.keys() == after.keys()  # LoRA wrappers removed after training
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_both_loras_cover_every_attention_projection(fitted):
    decomposer, dec, _, _ = fitted
    content = dec.files["content/pytorch_lora_weights.safetensors"]
    style = dec.files["style/pytorch_lora_weights.safetensors"]
    names = {k.rsplit(".lora_", 1)[0] for k in content}
    assert names == {k.rsplit(".lora_", 1)[0] for k in style}
    n_attn = sum(1 for _ in decomposer.backbone.attention_layers())
    assert len(names) == 4 * n_attn
    assert any(".attn2.to_k" in n for n in names) and any(n.startswith("unet.up_blocks.1") for n in names)
    a = content["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert a.shape[0] == 4 and a.dtype.is_floating_point  # dtype: runtime.lora_dtype


def test_column_masks_grow_to_n_percent_and_stay_disjoint(fitted):
    _, dec, _, _ = fitted
    masks = dec.files["unziplora/masks.safetensors"]
    assert dec.meta["mask_rounds"] == N_ROUNDS
    banks = {k.split(".")[0] for k in masks if k.endswith(".mask")}
    assert banks
    both_masked = 0
    for key in banks:
        mc, ms = masks[f"{key}.content.mask"], masks[f"{key}.style.mask"]
        fc, fs = masks[f"{key}.content.full"] > 0, masks[f"{key}.style.full"] > 0
        out = mc.shape[1]
        per_round = max(1, round(out * 0.30 / N_ROUNDS))
        assert torch.all(mc.sum(1)[~fc] == N_ROUNDS * per_round)  # N % of the columns after 3 rounds
        assert torch.all(ms.sum(1)[~fs] == N_ROUNDS * per_round)
        assert torch.all(mc.sum(1)[fc] == 0) and torch.all(ms.sum(1)[fs] == 0)  # all-column LoRAs take no mask
        rows = ~fc & ~fs
        both_masked += int(rows.sum())
        assert torch.all(mc[rows] * ms[rows] == 0)  # where both are masked, style never takes a content column
    assert both_masked > 0


def test_block_separated_layers_let_the_masked_lora_pick_any_column(backbone):
    """Where one LoRA uses every column (block separation) it excludes nothing: the masked LoRA takes its most
    important columns, even those the other LoRA would score highest (official code)."""
    cfg = UnZipLoRAConfig(rank=2)
    names = [n for n in target_linears(backbone) if n.endswith("attn1.to_q")]
    loras = LoRASet(backbone.unet, names, 2, ADAPTERS)
    masks = ColumnMasks(loras, cfg, torch.device("cpu"))
    for key, bank in loras.banks.items():
        ramp = torch.linspace(1.0, 0.0, bank.out_features).expand(len(bank.names), -1)
        for a in ADAPTERS:  # both LoRAs rank the same columns first
            masks.buffers[f"{key}.{a}.importance"].copy_(ramp)
    masks.recalibrate(loras)
    seen = set()
    for key, bank in loras.banks.items():
        k = max(1, round(bank.out_features * cfg.column_fraction / cfg.rounds))
        top = torch.zeros(bank.out_features)
        top[:k] = 1
        for i, name in enumerate(bank.names):
            block = block_of(name)
            mc, ms = masks.buffers[f"{key}.content.mask"][i], masks.buffers[f"{key}.style.mask"][i]
            if block in cfg.content_blocks:  # content uses every column: style picks the top columns freely
                assert torch.equal(ms, top) and mc.sum() == 0
                seen.add("content-full")
            elif block in cfg.style_blocks:
                assert torch.equal(mc, top) and ms.sum() == 0
                seen.add("style-full")
            else:  # both masked: content first, style from the rest
                assert torch.equal(mc, top) and (mc * ms).sum() == 0 and ms.sum() == k
                seen.add("both")
    assert seen == {"content-full", "style-full", "both"}


def test_merger_gradient_stays_inside_the_overlap_by_default(backbone):
    cfg = UnZipLoRAConfig(rank=2, warmup_steps=1)
    latents = image_latents(backbone, str(EXAMPLE), "inputs.image")
    conds = [backbone.encode_prompt([p]) for p in ("A sks balloon in flat style", "A sks balloon", "flat style")]
    trainer = UnZipLoRATrainer(backbone, cfg, latents, *conds, lora_generator=torch.Generator().manual_seed(0))
    masks = trainer.masks
    keys = {k.rsplit(".", 1)[0] for k in masks.mergers}
    try:
        trainer.step(0)  # warm-up, then the first masks
        trainer.step(1)  # a masked step: its merger gradients stay on .grad
        inside = 0.0
        for key in keys:
            overlap = masks.columns(key, "content") * masks.columns(key, "style")
            for a in ADAPTERS:
                grad = masks.mergers[f"{key}.{a}"].grad
                assert torch.all(grad[overlap == 0] == 0)  # official code: only where both LoRAs use the column
                inside += grad[overlap > 0].abs().sum().item()
        assert inside > 0  # the overlap: a masked LoRA's columns in the other's block-separated layers
        # merger_update: mask -> every column of each LoRA's own mask passes (ours before: not the default)
        masks.config = UnZipLoRAConfig(rank=2, merger_update="mask")
        for merger in masks.mergers.values():
            merger.grad = torch.ones_like(merger)
        masks.mask_merger_grads()
        outside = 0.0
        for key in keys:
            overlap = masks.columns(key, "content") * masks.columns(key, "style")
            for a in ADAPTERS:
                grad = masks.mergers[f"{key}.{a}"].grad
                assert torch.equal(grad, masks.columns(key, a))
                outside += grad[overlap == 0].sum().item()
        assert outside > 0
    finally:
        trainer.loras.remove()


def test_loras_load_in_diffusers_alone_and_together(fitted):
    from cstoolkit.backbones.sdxl import build_pipeline

    _, dec, _, tmp = fitted
    pipe = build_pipeline("tiny")
    pipe.load_lora_weights(str(tmp / "dec" / "content"), adapter_name="content")
    pipe.load_lora_weights(str(tmp / "dec" / "style"), adapter_name="style")
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    layer = pipe.unet.get_submodule(name)
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    w0 = layer.base_layer.weight
    files = {r: dec.files[f"{r}/pytorch_lora_weights.safetensors"] for r in ("content", "style")}

    def delta(role):
        f = files[role]
        return (x @ f[f"unet.{name}.lora_A.weight"].float().t()) @ f[f"unet.{name}.lora_B.weight"].float().t()

    with torch.no_grad():
        pipe.set_adapters(["content"])
        assert torch.allclose(layer(x), x @ w0.t() + delta("content"), atol=1e-5)
        pipe.set_adapters(["content", "style"], [1.0, 1.0])
        assert torch.allclose(layer(x), x @ w0.t() + delta("content") + delta("style"), atol=1e-5)


def test_single_files_carry_masks_and_the_mergers_are_saved_by_layer(fitted):
    _, dec, _, _ = fitted
    content = dec.files["content/pytorch_lora_weights.safetensors"]
    mergers = dec.files[MERGERS_FILE]
    layers = {k.rsplit(".lora_", 1)[0] for k in content}
    assert set(mergers) == {f"{n}.merger_{a}" for n in layers for a in ADAPTERS}
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in mergers.values())
    assert dec.meta["mergers_folded"] is False
    assert any(float(v.min()) < 1.0 for v in mergers.values())  # some mergers trained ...
    # ... but the single files hold up ⊙ mask only (official code): unchanged by the mergers
    masks = dec.files["unziplora/masks.safetensors"]
    assert any(k.endswith(".mask") for k in masks)


def test_separated_prompts_follow_the_official_inference_prompts():
    ph = {"<c>": "sks rose", "<s>": "pop art"}
    x, x_c, x_s = separated_prompts("a <c> on a skateboard in <s> style", ph, "rose")
    assert (x, x_c, x_s) == ("a sks rose on a skateboard in pop art style", "a sks rose on a skateboard",
                             "a rose on a skateboard in pop art style")


def test_both_mode_separate_switches_the_sampling(fitted):
    _, dec, _, _ = fitted
    prompt = "A <c> in <s> style in a boat"
    merged = dec.generate(prompt, use="both", seed=1, steps=2)
    sep = dec.generate(prompt, use="both", seed=1, steps=2, both_mode="separate")
    again = dec.generate(prompt, use="both", seed=1, steps=2, both_mode="separate")
    assert sep[0].size == (128, 128) and sep[0].tobytes() == again[0].tobytes()
    assert sep[0].tobytes() != merged[0].tobytes()
    assert dec.generate(prompt, use="both", seed=1, steps=2)[0].tobytes() == merged[0].tobytes()  # layers removed


def test_our_lora_layers_sample_what_diffusers_adapters_sample(fitted):
    import numpy as np

    from cstoolkit.method import GenerateConfig
    from cstoolkit.methods._sdxl_lora import generate_with_loras

    _, dec, _, _ = fitted
    prompt = "A <c> in <s> style in a boat"
    ours = dec.generate(prompt, use="both", seed=1, steps=2)[0]  # LoRASet layers from the saved files
    peft = generate_with_loras(dec.backbone, dec, [prompt], "both", seed=1, progress=False,
                               options=GenerateConfig(steps=2))[0][0]  # diffusers load_lora_weights + set_adapters
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(peft, dtype=np.int16))
    assert diff.max() <= 2, diff.max()


def test_run_writes_phases(tmp_path):
    import json

    data = recipe(tmp_path / "run")
    Decomposer.from_recipe(data).run()
    phases = json.loads((tmp_path / "run" / "phases.json").read_text())
    names = [p["phase"] for p in phases["phases"]]
    for name in ("build", "fit/setup", "fit/warmup", "fit/train", "fit/recalibrate", "fit", "save", "sample/both",
                 "write/both"):
        assert name in names, (name, names)
    assert phases["total_s"] >= sum(p["seconds"] for p in phases["phases"] if p["depth"] == 0) > 0


def test_generate_both_is_deterministic_and_loads_back(fitted):
    _, dec, _, tmp = fitted
    a = dec.generate("A <c> in <s> style in a boat", use="both", seed=1, steps=2)
    b = dec.generate("A <c> in <s> style in a boat", use="both", seed=1, steps=2)
    assert a[0].size == (128, 128) and a[0].tobytes() == b[0].tobytes()
    content_only = dec.generate("A <c> in <s> style in a boat", use="content", seed=1, steps=2)
    assert content_only[0].tobytes() != a[0].tobytes()
    loaded = Decomposition.load(tmp / "dec")
    c = loaded.generate("A <c> in <s> style in a boat", use="both", seed=1, steps=2)
    assert c[0].tobytes() == a[0].tobytes()


def test_resume_gives_bit_identical_loras(tmp_path, monkeypatch):
    full = recipe(tmp_path / "full")
    full["runtime"]["checkpoint_every"] = 3
    reference = Decomposer.from_recipe(full).fit()
    part = recipe(tmp_path / "part")
    part["runtime"]["checkpoint_every"] = 3
    original = TrainLoop.log

    def crash(self, **metrics):
        original(self, **metrics)
        if self._step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLoop, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        Decomposer.from_recipe(part).fit()
    monkeypatch.setattr(TrainLoop, "log", original)
    resumed = Decomposer.from_recipe(part, resume=True).fit()
    for rel in ("content/pytorch_lora_weights.safetensors", "style/pytorch_lora_weights.safetensors",
                "unziplora/masks.safetensors"):
        for k, v in reference.files[rel].items():
            assert torch.equal(v, resumed.files[rel][k]), (rel, k)


def test_column_cache_follows_every_mask_change(backbone):
    """columns() / other_columns() / merger_grad_filter() are computed once per mask: the same tensor while the
    mask stands, new values after an in-place change (a recalibration, a resumed checkpoint) or a new buffer."""
    cfg = UnZipLoRAConfig(rank=2)
    names = [n for n in target_linears(backbone) if n.endswith("attn1.to_q")]
    loras = LoRASet(backbone.unet, names, 2, ADAPTERS)
    masks = ColumnMasks(loras, cfg, torch.device("cpu"), blocks=False)
    key = next(iter(loras.banks))
    cols = masks.columns(key, "content")
    assert masks.columns(key, "content") is cols and cols.sum() == 0
    masks.buffers[f"{key}.content.mask"][0, :3] = 1.0  # in place
    assert masks.columns(key, "content")[0, :3].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(masks.other_columns(key, "content"), 1 - masks.columns(key, "content"))
    masks.buffers[f"{key}.style.mask"] = masks.buffers[f"{key}.content.mask"].clone()  # a new buffer
    assert torch.equal(masks.merger_grad_filter(key, "style"), masks.buffers[f"{key}.content.mask"])
    masks.config = UnZipLoRAConfig(rank=2, merger_update="mask")
    assert masks.merger_grad_filter(key, "content") is masks.columns(key, "content")
