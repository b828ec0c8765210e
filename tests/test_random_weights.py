"""``backbone.random_weights: true`` (issue 9 item 5): every full-size preset builds from a seed, reading no files.

Built on the ``meta`` device (shapes only, no memory): the full SDXL and Infinity-2B with all their
text encoders, checked by parameter counts, while every way of reading weights is made to fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit import registry
from cstoolkit.backbone import BackboneConfig
from cstoolkit.recipe import load_recipe


@pytest.fixture
def no_files(monkeypatch):
    """Any attempt to load weights or tokenizer files fails the test."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"random_weights read files: {args[:2]}")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel,
                transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel, transformers.AutoTokenizer,
                transformers.CLIPTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    from cstoolkit.backbones.infinity import loading

    monkeypatch.setattr(loading, "load_file", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_backbone_config_has_the_option():
    for name, cls in registry.backbones().items():
        assert issubclass(cls.Config, BackboneConfig), name
        assert "random_weights" in {f.name for f in dataclasses.fields(cls.Config)}, name
    help_text = {f.name: f for f in dataclasses.fields(BackboneConfig)}["random_weights"].metadata["help"]
    assert "reading no files" in help_text


def test_sdxl_full_size_random(no_files):
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    bb = SDXLBackbone.from_config(SDXLConfig(preset="sdxl-base", random_weights=True), device="meta")
    assert _params(bb.unet) == 2_567_463_684  # SDXL 1.0 base UNet
    assert bb.text_encoder.config.hidden_size == 768 and bb.text_encoder_2.config.num_hidden_layers == 32
    assert bb.vae.config.block_out_channels == (128, 256, 512, 512) and bb.resolution == 1024
    assert bb.unet.device.type == "meta"
    alias = SDXLBackbone.from_config(SDXLConfig(preset="sdxl-base-random"), device="meta")
    assert _params(alias.unet) == _params(bb.unet)


def test_infinity_2b_random_with_a_full_size_t5(no_files):
    from cstoolkit.backbones.infinity.backbone import InfinityBackbone, InfinityConfig

    bb = InfinityBackbone.from_config(InfinityConfig(preset="infinity-2b", random_weights=True), device="meta")
    assert 2.1e9 < _params(bb.transformer) < 2.3e9
    t5 = bb.text.model.config
    assert (t5.d_model, t5.num_layers, t5.d_ff, t5.num_heads, t5.vocab_size) == (2048, 24, 5120, 32, 32128)
    assert 1.2e9 < _params(bb.text.model) < 1.25e9  # flan-t5-xl's encoder
    assert bb.text.tokenizer(["a cat"]).input_ids == [[100, 35, 102, 100, 119, 1]]  # offline, byte-level


def test_recipe_accepts_the_option():
    recipe = load_recipe({"method": "dreambooth_lora",
                          "backbone": {"name": "sdxl", "preset": "sdxl-base", "random_weights": True},
                          "inputs": {"content_images": [str(EXAMPLE)], "content": "balloon", "style": "flat"}})
    assert recipe.backbone.random_weights is True and recipe.to_dict()["backbone"]["random_weights"] is True
