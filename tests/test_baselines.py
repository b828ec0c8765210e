"""The SDXL baselines on the tiny preset: DreamBooth-LoRA, B-LoRA, ZipLoRA (trained LoRAs and LoRAs fed in)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, fit_on

from cstoolkit.backbones.sdxl import build_pipeline
from cstoolkit.errors import UserError
from cstoolkit.lora import lora_state_dict_to_layers
from cstoolkit.methods.dreambooth_lora import DreamBoothLoRA, DreamBoothLoRAInputs

EX = ROOT / "examples"
LORA = "pytorch_lora_weights.safetensors"
RUNTIME = {"progress": False, "device": "cpu", "seed": 0}


fit = fit_on


def recipe(method, out, inputs, **params):
    return {"method": method, "backbone": {"name": "sdxl", "preset": "tiny"}, "inputs": inputs, "params": params,
            "runtime": {"output_dir": str(out), **RUNTIME}}


def layers(state):
    return set(lora_state_dict_to_layers(state))



@pytest.fixture(scope="module")
def dreambooth(backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("db")
    dec = fit(recipe("dreambooth_lora", tmp / "run", {"content_images": [str(EX / "balloon.png")],
                                                      "content": "balloon", "style": "flat illustration"},
                     rank=4, lr=1e-3, steps=3), backbone)
    dec.save(tmp / "dec")
    return dec, tmp / "dec"


@pytest.fixture(scope="module")
def blora(backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bl")
    dec = fit(recipe("b_lora", tmp / "run", {"image": str(EX / "style_watercolor.png")}, rank=4, lr=1e-3, steps=3),
              backbone)
    dec.save(tmp / "run" / "decomposition")  # as `cstoolkit run` leaves it
    return dec, tmp / "run" / "decomposition"


# ---------------------------------------------------------------------------------- DreamBooth-LoRA
def test_dreambooth_trains_two_separate_loras(dreambooth, backbone):
    dec, _ = dreambooth
    assert dec.meta["training_prompts"] == {"content": "A sks balloon",
                                            "style": "A sks balloon in flat illustration style"}
    content, style = dec.files[f"content/{LORA}"], dec.files[f"style/{LORA}"]
    n_attn = sum(1 for _ in backbone.attention_layers())
    assert len(layers(content)) == len(layers(style)) == 4 * n_attn
    assert any(not torch.equal(content[k], style[k]) for k in content)
    key = next(k for k in content if k.endswith("lora_B.weight"))
    assert content[key].abs().sum() > 0  # the up projection started at 0 and trained


def test_dreambooth_prompts_with_separate_style_images():
    method = DreamBoothLoRA()
    one = DreamBoothLoRAInputs(content_images=["c.png"], content="dog", style="watercolor")
    two = DreamBoothLoRAInputs(content_images=["c.png"], content="dog", style="watercolor", style_images=["s.png"],
                               style_subject="flower")
    assert method.training_prompts(one)["style"] == "A sks dog in watercolor style"  # UnZipLoRA's baseline
    assert method.training_prompts(two)["style"] == "A flower in watercolor style"


def test_dreambooth_loras_load_and_generate(dreambooth):
    dec, folder = dreambooth
    pipe = build_pipeline("tiny")
    pipe.load_lora_weights(str(folder / "content"), adapter_name="content")
    pipe.load_lora_weights(str(folder / "style"), adapter_name="style")
    pipe.set_adapters(["content", "style"], [1.0, 1.0])
    both = dec.generate("A <c> in <s> style", use="both", seed=3, steps=2, progress=False)
    assert both[0].tobytes() == dec.generate("A <c> in <s> style", use="both", seed=3, steps=2,
                                             progress=False)[0].tobytes()


# ---------------------------------------------------------------------------------------- B-LoRA
def test_blora_splits_one_lora_by_block(blora, backbone):
    dec, folder = blora
    content, style = layers(dec.files[f"content/{LORA}"]), layers(dec.files[f"style/{LORA}"])
    assert content and style and not content & style
    assert all(n.startswith("up_blocks.0.attentions.0.") for n in content)
    assert all(n.startswith("up_blocks.0.attentions.1.") for n in style)
    assert dec.placeholders == {"<c>": "[v]", "<s>": "[v]"} and dec.meta["training_prompt"] == "A [v]"
    pipe = build_pipeline("tiny")
    pipe.load_lora_weights(str(folder / "style"), adapter_name="style")  # only its block gets an adapter
    assert hasattr(pipe.unet.get_submodule("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"), "lora_A")
    assert not hasattr(pipe.unet.get_submodule("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), "lora_A")
    images = {use: dec.generate("A <c> in <s> style", use=use, seed=0, steps=2, progress=False)[0].tobytes()
              for use in ("content", "style", "both")}
    assert len(set(images.values())) == 3


def test_blora_rejects_a_block_without_attention(tmp_path, backbone):
    data = recipe("b_lora", tmp_path, {"image": str(EX / "balloon.png")}, steps=1,
                  content_blocks=["up_blocks.2.attentions.0"])
    with pytest.raises(UserError, match=r"params.content_blocks\[0\]"):
        fit(data, backbone)


# --------------------------------------------------------------------------------------- ZipLoRA
def test_ziplora_trains_then_zips(tmp_path, backbone):
    dec = fit(recipe("ziplora", tmp_path, {"content_images": [str(EX / "content_cube.png")], "content": "cube",
                                           "style_images": [str(EX / "style_watercolor.png")], "style": "watercolor"},
                     steps=3, lora_rank=4, lora_lr=1e-3, lora_steps=2), backbone)
    assert dec.meta["sources"] == {"content": "trained", "style": "trained"}
    assert dec.placeholders == {"<c>": "sks cube", "<s>": "watercolor"}
    mergers = dec.files["ziplora/mergers.safetensors"]
    assert any(not torch.all(m == 1) for m in mergers.values())  # the mergers moved
    _check_zipped(dec)


def _check_zipped(dec):
    """zipped/<role> = the input LoRA with its merger folded into the up projection (m ⊙ B)."""
    assert dec.meta["loras"]["both"] == [f"zipped/content/{LORA}", f"zipped/style/{LORA}"]
    for role in ("content", "style"):
        given, zipped = dec.files[f"{role}/{LORA}"], dec.files[f"zipped/{role}/{LORA}"]
        assert given.keys() == zipped.keys()
        for k, v in given.items():
            if k.endswith("lora_A.weight"):
                assert torch.equal(zipped[k], v)
            else:
                m = (zipped[k] * v).sum(-1) / (v * v).sum(-1).clamp_min(1e-30)  # each row scaled by its merger
                assert torch.allclose(zipped[k], v * m.unsqueeze(-1), atol=1e-7)


def test_ziplora_merges_loras_from_other_decompositions(tmp_path, backbone, dreambooth, blora):
    (db, db_dir), (bl, bl_dir) = dreambooth, blora
    dec = fit(recipe("ziplora", tmp_path, {"content_images": [str(EX / "balloon.png")],
                                           "style_images": [str(EX / "style_watercolor.png")],
                                           "content_lora": str(db_dir), "style_lora": str(bl_dir.parent)},
                     steps=2), backbone)
    assert dec.meta["sources"] == {"content": str(db_dir), "style": str(bl_dir)}
    assert dec.placeholders == {"<c>": db.placeholders["<c>"], "<s>": bl.placeholders["<s>"]}
    assert dec.meta["training_prompts"]["content"] == db.meta["training_prompts"]["content"]
    for role, src in (("content", db.files[f"content/{LORA}"]), ("style", bl.files[f"style/{LORA}"])):
        mine = dec.files[f"{role}/{LORA}"]
        assert mine.keys() == src.keys() and all(torch.equal(mine[k], src[k]) for k in src)  # unchanged
    _check_zipped(dec)  # B-LoRA's style covers one block only: the zipped style too
    both = dec.generate("A <c> in <s> style", use="both", seed=0, steps=2, progress=False)
    assert both[0].size == (128, 128)


def test_ziplora_input_errors(tmp_path, backbone):
    base = {"content_images": [str(EX / "content_cube.png")], "style_images": [str(EX / "style_watercolor.png")],
            "content": "cube", "style": "watercolor"}
    with pytest.raises(UserError, match="inputs.content_lora"):
        fit(recipe("ziplora", tmp_path, {**base, "content_lora": str(tmp_path / "nope")}, steps=1), backbone)
    with pytest.raises(UserError, match="inputs.style"):
        fit(recipe("ziplora", tmp_path, {**base, "style": ""}, steps=1, lora_steps=1), backbone)


def test_negative_prompt_reaches_the_sdxl_guidance(dreambooth):
    """`generate --negative-prompt` (issue 19, item 13): the SDXL sampler's unconditional branch."""
    dec, _ = dreambooth
    plain = dec.generate("A <c> in <s> style", use="both", seed=3, steps=2, progress=False)[0].tobytes()
    neg = dec.generate("A <c> in <s> style", use="both", seed=3, steps=2, negative_prompt="blurry",
                       progress=False)[0].tobytes()
    empty = dec.generate("A <c> in <s> style", use="both", seed=3, steps=2, negative_prompt=None,
                         progress=False)[0].tobytes()
    assert neg != plain and empty == plain


def test_negative_prompt_is_refused_on_the_scalewise_backbones():
    from cstoolkit.errors import UserError
    from cstoolkit.methods._learned_tokens import scalewise_sample_options
    from cstoolkit.methods.textual_inversion import TextualInversionGenerate

    assert scalewise_sample_options(TextualInversionGenerate(cfg=3.0)) == {"cfg": 3.0}
    with pytest.raises(UserError, match="^generate.negative_prompt: the scale-wise backbones take no negative"):
        scalewise_sample_options(TextualInversionGenerate(negative_prompt="blurry"))
