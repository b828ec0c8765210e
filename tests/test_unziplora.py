"""UnZipLoRA on the tiny SDXL: masks, what trains, diffusers round trip, generation, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit import Decomposer, Decomposition
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
    assert a.shape[0] == 4 and a.dtype == torch.float32


def test_column_masks_grow_to_n_percent_and_stay_disjoint(fitted):
    _, dec, _, _ = fitted
    masks = dec.files["unziplora/masks.safetensors"]
    assert dec.meta["mask_rounds"] == N_ROUNDS
    banks = {k.split(".")[0] for k in masks if k.endswith(".mask")}
    assert banks
    for key in banks:
        mc, ms = masks[f"{key}.content.mask"], masks[f"{key}.style.mask"]
        out = mc.shape[1]
        per_round = max(1, round(out * 0.30 / N_ROUNDS))
        assert torch.all(mc.sum(1) == N_ROUNDS * per_round)  # N % of the columns after 3 rounds
        assert torch.all(ms.sum(1) == N_ROUNDS * per_round)
        assert torch.all(mc * ms == 0)  # style never takes a content column


def test_block_separation_frees_the_sensitive_blocks(fitted):
    decomposer, dec, _, _ = fitted
    masks = dec.files["unziplora/masks.safetensors"]
    content = dec.files["content/pytorch_lora_weights.safetensors"]
    # the exported up-projection is zero outside the mask, except where block separation frees it
    key_c = "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"  # content block
    key_m = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"  # masked for both
    assert (content[key_c].abs().sum(1) > 0).all()
    zero_rows = (content[key_m].abs().sum(1) == 0).float().mean().item()
    assert zero_rows == pytest.approx(0.7, abs=0.1)
    full = [k for k in masks if k.endswith(".content.full")]
    assert sum(masks[k].sum().item() for k in full) > 0


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
        return (x @ f[f"unet.{name}.lora_A.weight"].t()) @ f[f"unet.{name}.lora_B.weight"].t()

    with torch.no_grad():
        pipe.set_adapters(["content"])
        assert torch.allclose(layer(x), x @ w0.t() + delta("content"), atol=1e-5)
        pipe.set_adapters(["content", "style"], [1.0, 1.0])
        assert torch.allclose(layer(x), x @ w0.t() + delta("content") + delta("style"), atol=1e-5)


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
