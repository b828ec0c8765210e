"""SDXL backbone: tiny preset (offline, seeded), encoders, loss, sampling, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cstoolkit.backbone import PromptEmbeds
from cstoolkit.backbones.sdxl import (
    PRESETS,
    SDXLBackbone,
    SDXLConfig,
    build_clip_tokenizer,
    build_pipeline,
    tiny_component_configs,
)
from cstoolkit.errors import UserError

PROMPTS = ["A sks dog on the beach", "An image in isometric illustration style"]


@pytest.fixture(scope="module")
def tiny() -> SDXLBackbone:
    return SDXLBackbone.from_config(SDXLConfig(preset="tiny"))


@pytest.fixture(scope="module")
def saved_tiny(tiny: SDXLBackbone, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny.pipeline().save_pretrained(path)
    return path


def test_registered_and_presets():
    from cstoolkit import registry

    assert registry.get_backbone("sdxl") is SDXLBackbone
    assert SDXLBackbone.family == "diffusion"
    assert {"tiny", "sdxl-base", "sdxl-base-random"} <= set(PRESETS) and SDXLBackbone.presets is PRESETS


def test_tiny_build_is_deterministic(tiny: SDXLBackbone):
    other = SDXLBackbone.from_config(SDXLConfig(preset="tiny"))
    a, b = tiny.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not p.requires_grad for p in tiny.parameters())
    assert tiny.weight_dtype == torch.float32 and tiny.resolution == 128


def test_tiny_architecture(tiny: SDXLBackbone):
    cfg = tiny.unet.config
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert cfg.addition_embed_type == "text_time"
    te1, te2 = tiny.text_encoder.config, tiny.text_encoder_2.config
    assert cfg.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    assert tiny.vae_scale_factor == 8
    layers = dict(tiny.attention_layers())
    for block in ("up_blocks.0", "up_blocks.1"):
        for i in range(3):
            for attn in ("attn1", "attn2"):
                module = layers[f"{block}.attentions.{i}.transformer_blocks.0.{attn}"]
                # 10 % of a projection's output columns must be a real set of columns
                assert module.to_k.out_features // 10 >= 4
    assert not any(name.startswith("up_blocks.2") or name.startswith("down_blocks.0") for name in layers)
    assert tiny_component_configs()["unet"]["block_out_channels"] == cfg.block_out_channels


def test_tokenizers_offline(tiny: SDXLBackbone):
    tok, tok2 = tiny.tokenizers
    assert len(tok) == len(tok2) == 49408
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|endoftext|>" and tok2.pad_token == "!"
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok2(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0} and len(ids) == 77
    assert build_clip_tokenizer().model_max_length == 77


def test_encode_prompt_matches_pipeline(tiny: SDXLBackbone):
    emb = tiny.encode_prompt(PROMPTS)
    assert isinstance(emb, PromptEmbeds) and len(emb) == 2
    assert emb.prompt_embeds.shape == (2, 77, tiny.unet.config.cross_attention_dim)
    assert emb.pooled is not None and emb.pooled.shape == (2, tiny.text_encoder_2.config.projection_dim)
    assert emb.extra["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    pe, _, pooled, _ = tiny.pipeline().encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(pe, emb.prompt_embeds) and torch.equal(pooled, emb.pooled)


def test_encode_images(tiny: SDXLBackbone):
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = tiny.encode_images(images)
    assert lat.shape == (2, 4, 8, 12) and lat.dtype == torch.float32 and torch.isfinite(lat).all()
    assert torch.equal(lat, tiny.encode_images(images))  # posterior mean: deterministic
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(lat, tiny.encode_images(images, generator=g))
    assert tiny.decode_latents(lat).shape == images.shape
    with pytest.raises(ValueError):
        tiny.encode_images(torch.zeros(1, 3, 60, 64))


def test_training_loss(tiny: SDXLBackbone):
    lat = tiny.encode_images(torch.zeros(2, 3, 128, 128))
    cond = tiny.encode_prompt(PROMPTS)
    a = tiny.training_loss(lat, cond, generator=torch.Generator().manual_seed(0))
    b = tiny.training_loss(lat, cond, generator=torch.Generator().manual_seed(0))
    c = tiny.training_loss(lat, cond, generator=torch.Generator().manual_seed(1))
    assert a.ndim == 0 and torch.isfinite(a) and torch.equal(a, b) and not torch.equal(a, c)
    per = tiny.training_loss(lat, cond, generator=torch.Generator().manual_seed(0), reduction="none")
    assert per.shape == (2,) and torch.allclose(per.mean(), a)
    # given noise and timesteps replace the draws (noise first, then timesteps, from the generator)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(tiny.training_loss(lat, cond, noise=noise, timesteps=t), a)
    # fixed timesteps, and one prompt broadcast to the batch
    one = tiny.training_loss(lat, tiny.encode_prompt(PROMPTS[:1]), timesteps=500, generator=torch.Generator())
    assert torch.isfinite(one)


def test_training_loss_gradients_and_checkpointing(tiny: SDXLBackbone):
    lat = tiny.encode_images(torch.zeros(1, 3, 128, 128))
    cond = tiny.encode_prompt(PROMPTS[:1])
    ckpt = SDXLBackbone.from_config(SDXLConfig(preset="tiny", gradient_checkpointing=True))
    grads = []
    for bb in (tiny, ckpt):
        weight = bb.unet.up_blocks[0].attentions[1].transformer_blocks[0].attn2.to_k.weight
        weight.requires_grad_(True)
        try:
            bb.training_loss(lat, cond, generator=torch.Generator().manual_seed(3)).backward()
            grads.append(weight.grad.clone())
        finally:
            weight.requires_grad_(False)
            weight.grad = None
    assert ckpt.unet.is_gradient_checkpointing
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sample(tiny: SDXLBackbone):
    images = tiny.sample(PROMPTS, num_images=2, seed=3, steps=2, progress=False)
    assert len(images) == 4 and all(im.size == (128, 128) and im.mode == "RGB" for im in images)
    again = tiny.sample(PROMPTS, num_images=2, seed=3, steps=2, progress=False)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(images, again))
    other = tiny.sample(PROMPTS[:1], num_images=1, seed=4, steps=2, progress=False)
    assert not np.array_equal(np.array(other[0]), np.array(images[0]))
    small = tiny.sample(PROMPTS[:1], steps=2, height=64, width=96, progress=False)
    assert small[0].size == (96, 64)


def test_sample_batches_across_prompts(tiny: SDXLBackbone):
    """One batch mixes prompts (64 images at 128 px, 4 at 1024 px); an image is the same as denoised alone."""
    assert tiny.sample_batch() == 64 and tiny.sample_batch(1024, 1024) == 4 and tiny.sample_batch(512, 512) == 16
    batched = tiny.sample(PROMPTS, num_images=2, seed=3, steps=2, progress=False)
    tiny.config.sample_batch_size = 1
    try:
        alone = tiny.sample(PROMPTS, num_images=2, seed=3, steps=2, progress=False)
        assert tiny.sample_batch() == 1
    finally:
        tiny.config.sample_batch_size = None
    for x, y in zip(batched, alone):  # the same noise and prompt per image; float rounding only
        assert np.abs(np.array(x, dtype=int) - np.array(y, dtype=int)).max() <= 2


def test_pipeline_shares_modules(tiny: SDXLBackbone):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe is tiny.pipeline()
    assert pipe.unet is tiny.unet and pipe.vae is tiny.vae and pipe.text_encoder_2 is tiny.text_encoder_2
    assert isinstance(build_pipeline("tiny"), StableDiffusionXLPipeline)


def test_save_pretrained_round_trip(tiny: SDXLBackbone, saved_tiny):
    loaded = SDXLBackbone.from_config(SDXLConfig(pretrained=str(saved_tiny)))
    assert loaded.resolution == 128 and loaded.tokenizer_2.pad_token == "!"
    a, b = tiny.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lat = tiny.encode_images(torch.zeros(1, 3, 128, 128))
    cond = tiny.encode_prompt(PROMPTS[:1])
    assert torch.equal(tiny.training_loss(lat, cond, generator=torch.Generator().manual_seed(0)),
                       loaded.training_loss(lat, loaded.encode_prompt(PROMPTS[:1]),
                                            generator=torch.Generator().manual_seed(0)))
    x = tiny.sample(PROMPTS[:1], seed=7, steps=3, progress=False)[0]
    y = loaded.sample(PROMPTS[:1], seed=7, steps=3, progress=False)[0]
    assert np.array_equal(np.array(x), np.array(y))
    # a separate VAE directory (here the pipeline's own vae/)
    with_vae = SDXLBackbone.from_config(SDXLConfig(pretrained=str(saved_tiny), vae=str(saved_tiny / "vae")))
    assert torch.equal(with_vae.encode_images(torch.zeros(1, 3, 64, 64)), tiny.encode_images(torch.zeros(1, 3, 64, 64)))


def test_bad_pretrained_is_a_user_error(tmp_path, saved_tiny):
    with pytest.raises(UserError) as err:
        SDXLBackbone.from_config(SDXLConfig(pretrained=str(tmp_path / "no-such-dir")))
    assert err.value.where == "backbone.pretrained" and "no such directory" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        SDXLBackbone.from_config(SDXLConfig(pretrained=str(tmp_path / "empty")))
    assert err.value.where == "backbone.pretrained" and "unet/" in str(err.value)
    with pytest.raises(UserError) as err:
        SDXLBackbone.from_config(SDXLConfig(pretrained=str(saved_tiny), vae=str(tmp_path / "empty")))
    assert err.value.where == "backbone.vae"
    with pytest.raises(UserError) as err:
        SDXLBackbone.from_config(SDXLConfig())
    assert err.value.where == "backbone.preset"


def test_resolution_and_mixed_dtypes():
    bb = SDXLBackbone.from_config(SDXLConfig(preset="tiny", resolution=64, dtype="bfloat16", vae_dtype="float32"))
    assert bb.resolution == 64 and bb.unet.dtype == torch.bfloat16 and bb.vae.dtype == torch.float32
    emb = bb.encode_prompt(PROMPTS[:1])
    assert emb.prompt_embeds.dtype == torch.bfloat16 and emb.extra["time_ids"][0, 0] == 64
    assert bb.encode_images(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.float32
    # bf16 UNet latents decoded by the fp32 VAE inside the diffusers pipeline
    images = bb.sample(PROMPTS[:1], steps=2, progress=False)
    assert images[0].size == (64, 64)
    lat = bb.encode_images(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(bb.training_loss(lat, emb, generator=torch.Generator()))


def test_config_parses_strictly():
    from cstoolkit.config import from_dict

    cfg = from_dict(SDXLConfig, {"name": "sdxl", "preset": "tiny", "vae_dtype": "float32"}, "backbone")
    assert cfg.preset == "tiny" and cfg.vae_dtype == "float32" and not cfg.gradient_checkpointing
    with pytest.raises(UserError) as err:
        from_dict(SDXLConfig, {"name": "sdxl", "vae_dtpye": "float32"}, "backbone")
    assert err.value.where == "backbone.vae_dtpye" and "vae_dtype" in str(err.value)


def test_pretrained_paths_resolve_but_hub_ids_stay(tmp_path):
    from cstoolkit.config import from_dict

    (tmp_path / "models" / "sdxl").mkdir(parents=True)
    data = {"name": "sdxl", "pretrained": "models/sdxl", "vae": "madebyollin/sdxl-vae-fp16-fix"}
    cfg = from_dict(SDXLConfig, data, "backbone", tmp_path)
    assert cfg.pretrained == str(tmp_path / "models" / "sdxl")
    assert cfg.vae == "madebyollin/sdxl-vae-fp16-fix"


def test_tokenizer_from_files_matches():
    from cstoolkit.backbones.sdxl.tokenizer import _clip_tokenizer_from_files

    text = ["a sks dog, in <s> style!!  café 12", "x" * 400]
    for pad in ("<|endoftext|>", "!"):
        a, b = build_clip_tokenizer(pad), _clip_tokenizer_from_files(pad, 77)
        kw = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert a(text, **kw).input_ids == b(text, **kw).input_ids and b.pad_token == pad


def test_from_pipeline_shares_modules(tiny: SDXLBackbone):
    wrapped = SDXLBackbone.from_pipeline(tiny.pipeline())
    assert wrapped.unet is tiny.unet and wrapped.pipeline() is tiny.pipeline() and wrapped.resolution == 128


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SDXLBackbone.from_config(SDXLConfig(preset="tiny"))
    assert torch.equal(torch.rand(3), expected)
