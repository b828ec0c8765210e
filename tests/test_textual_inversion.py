"""Textual inversion on the tiny SDXL and the tiny scale-wise backbones: what trains, files other tools load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, ROOT, fit_on

from cstoolkit import Decomposer, Decomposition
from cstoolkit.errors import UserError
from cstoolkit.registry import backbones as registered_backbones

RECIPE = ROOT / "recipes" / "textual_inversion.yaml"
SCALEWISE = [n for n in ("infinity", "switti") if n in registered_backbones()]


def recipe(tmp_path: Path, backbone: str = "sdxl", **params) -> dict:
    return {
        "method": "textual_inversion",
        "backbone": {"name": backbone, "preset": "tiny"},
        "inputs": {"image": str(EXAMPLE), "content": "balloon", "style": "flat illustration"},
        "params": {"steps": 2, **params},
        "generate": {"content": ["A <c> on the beach"], "num_images": 1,
                     **({"steps": 2} if backbone == "sdxl" else {})},
        "runtime": {"output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu", "seed": 0},
    }


def test_sdxl_trains_only_the_tokens_and_diffusers_loads_the_files(tmp_path, backbone, single_thread):
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    dec = fit_on(recipe(tmp_path), backbone)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters())
    widths = backbone.text_encoders()
    for role in ("content", "style"):
        f = dec.files[f"{role}/learned_embeds.safetensors"]
        assert {k: tuple(v.shape) for k, v in f.items()} == {k: (4, w) for k, w in widths.items()}
    assert not torch.equal(dec.files["content/learned_embeds.safetensors"]["clip_l"],
                           backbone.word_embeddings("balloon")["clip_l"].mean(0, keepdim=True).repeat(4, 1))
    dec.save(tmp_path / "dec")

    # the files load with diffusers and give our prompt embeddings
    from safetensors.torch import load_file

    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    other = SDXLBackbone.from_config(SDXLConfig(preset="tiny"))  # a fresh pipeline: loading adds tokens
    pipe = other.pipeline()
    for role, token in (("content", "<c>"), ("style", "<s>")):
        state = load_file(str(tmp_path / "dec" / role / "learned_embeds.safetensors"))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    prompt = "A photo of a <c> object in <s> style"
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    loaded = Decomposition.load(tmp_path / "dec", backbone=backbone)
    learned = {"<c>": dict(loaded.files["content/learned_embeds.safetensors"]),
               "<s>": dict(loaded.files["style/learned_embeds.safetensors"])}
    with torch.no_grad():
        ours = backbone.encode_prompt([prompt], learned=learned)
    assert torch.allclose(theirs[0], ours.prompt_embeds, atol=1e-5)


def test_sdxl_generation_uses_the_learned_tokens(tmp_path, backbone, single_thread):
    dec = fit_on(recipe(tmp_path, learn=["content"]), backbone)
    assert set(dec.files) == {"content/learned_embeds.safetensors"}
    a = dec.generate("A <c> on the beach", use="content", seed=1, progress=False)
    b = dec.generate("A <c> on the beach", use="content", seed=1, progress=False)
    assert len(a) == 1 and a[0].tobytes() == b[0].tobytes()
    # several prompts are denoised in one batch; each image is the one its prompt gives alone (seed + i)
    prompts = ["A <c> on the beach", "A <c> in the snow"]
    together = dec.generate(prompts, use="content", num_images=2, seed=1, progress=False)
    alone = [im for p in prompts for im in dec.generate(p, use="content", num_images=2, seed=1, progress=False)]
    assert len(together) == 4
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2 for x, y in zip(together, alone))
    assert np.abs(np.asarray(together[0], dtype=int) - np.asarray(together[2], dtype=int)).max() > 2  # prompts differ
    with pytest.raises(UserError, match="<s> \\(the style\\) stands for nothing here"):
        dec.generate("A cat in <s> style", use="style", progress=False)


@pytest.mark.parametrize("name", SCALEWISE)
def test_scalewise_fit_save_load(tmp_path, name, single_thread):
    dec = Decomposer.from_recipe(recipe(tmp_path, backbone=name, learn=["style"])).fit()
    widths = dec.backbone.text_encoders()
    f = dec.files["style/learned_embeds.safetensors"]
    assert {k: tuple(v.shape) for k, v in f.items()} == {k: (4, w) for k, w in widths.items()}
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec", backbone=dec.backbone)
    assert all(torch.equal(v, loaded.files["style/learned_embeds.safetensors"][k]) for k, v in f.items())
    images = loaded.generate("A cat in <s> style", use="style", progress=False)
    assert len(images) == 1


def test_templates_must_hold_the_learned_placeholders(tmp_path):
    with pytest.raises(UserError, match="params.content_templates"):
        Decomposer.from_recipe(recipe(tmp_path, backbone="infinity", learn=["content"],
                                      content_templates=["a photo"])).fit()


@pytest.mark.parametrize("name", SCALEWISE)
def test_shipped_recipe_runs(tmp_path, name, single_thread):
    overrides = [f"backbone.name={name}", f"runtime.output_dir={tmp_path / 'run'}", "runtime.progress=false",
                 "params.steps=2"]
    dec = Decomposer.from_recipe(str(RECIPE), overrides=overrides).fit()
    assert set(dec.files) == {"content/learned_embeds.safetensors", "style/learned_embeds.safetensors"}


def test_scalewise_defaults_are_csd_vars_baseline_and_sdxl_keeps_gal(tmp_path, monkeypatch, single_thread):
    from cstoolkit.methods.textual_inversion import TextualInversionConfig

    cfg = TextualInversionConfig()
    assert cfg.resolved(True) == {"steps": 151, "lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.05,
                                  "warmup_steps": 50, "hflip": True}
    assert cfg.resolved(False) == {"steps": 500, "lr": 5e-3, "betas": [0.9, 0.999], "weight_decay": 0.0,
                                   "warmup_steps": 0, "hflip": False}
    made = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    dec = Decomposer.from_recipe(recipe(tmp_path, backbone="infinity", steps=1)).fit()
    assert made == [{"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.05}]
    assert dec.meta["hyper"]["steps"] == 1 and dec.meta["hyper"]["hflip"] is True
