"""The ``world`` presets: tiny backbones trained on the synthetic world (cstoolkit world train).

* Always: files written by the trainer's save functions load back through the presets' real
  loaders (diffusers ``from_pretrained`` / Infinity's official-layout loader), bit for bit at
  fp16; the frozen text encoders are rebuilt from their seeds; missing files are a UserError.
* With the shipped weights (world/weights/<backbone>/): the presets load, every file is at most
  24 MB, and samples of held-out pairs are recognised by the oracles (target >= 90 % content and
  style, the issue's bar; a small CPU sample, so the tolerance is stated per test).
"""

from __future__ import annotations

import pytest
import torch

from cstoolkit.backbones._world import ENV, world_weights_dir
from cstoolkit.backbones.infinity import InfinityBackbone, InfinityConfig
from cstoolkit.backbones.infinity.backbone import WORLD_FILES as INFINITY_FILES
from cstoolkit.backbones.sdxl import WORLD_FILES as SDXL_FILES
from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig
from cstoolkit.errors import UserError

LIMIT_BYTES = 24e6
#: The issue's bar for held-out pairs is 0.90 content and style: met by SDXL (docs/world.md).
#: What the shipped weights measurably do on the CPU samples below (floors one image of 20 under the value
#: measured on 2026-12-06; chance is 0.10). They guard against regressions of the presets and their loading and
#: are raised as better weights ship (docs/world.md has the GPU evaluation on 80 images per group).
# measured values less one image; Infinity's content with the v2 oracle (reject class, novel classes: two blobs the
# old oracle read as the asked shape are now read as no object / a novel shape): 0.60, was 0.70 with the old oracle
FLOORS = {"sdxl": {"content": 0.95, "style": 0.85}, "infinity": {"content": 0.55, "style": 0.95},
          "switti": {"content": 0.80, "style": 0.95}}


def _shipped(backbone: str, files: tuple[str, ...]) -> bool:
    return all((world_weights_dir(backbone) / f).is_file() for f in files)


def _oracle_shipped() -> bool:
    try:
        from cstoolkit.world.oracle import load_oracle

        load_oracle()
    except Exception:
        return False
    return True


needs_sdxl = pytest.mark.skipif(not _shipped("sdxl", SDXL_FILES),
                                reason="world/weights/sdxl/ not shipped yet (made on the GPU by world/train_gpu.sh)")
needs_infinity = pytest.mark.skipif(not _shipped("infinity", INFINITY_FILES),
                                    reason="world/weights/infinity/ not shipped yet (made by world/train_gpu.sh)")
needs_oracle = pytest.mark.skipif(not _oracle_shipped(), reason="world/weights/oracle.safetensors not shipped yet")


def _same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return all(torch.equal(own[k].float(), v.float()) for k, v in state.items())


def _fp16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ real loading path
def test_sdxl_world_round_trip(tmp_path, monkeypatch):
    from cstoolkit.world.train import save_sdxl_parts

    src = SDXLBackbone.from_config(SDXLConfig(preset="tiny"))
    with torch.no_grad():  # make the weights differ from the tiny preset's, and the config
        for p in src.unet.parameters():
            p.add_(0.01)
    src.vae.register_to_config(scaling_factor=3.25)
    sizes = save_sdxl_parts(src.unet, src.vae, tmp_path / "sdxl")
    assert max(sizes.values()) <= LIMIT_BYTES
    monkeypatch.setenv(ENV, str(tmp_path))
    bb = SDXLBackbone.from_config(SDXLConfig(preset="world"))
    assert _same_state(bb.unet, _fp16_state(src.unet)) and _same_state(bb.vae, _fp16_state(src.vae))
    assert bb.vae.config.scaling_factor == 3.25 and bb.resolution == 128
    # the frozen CLIPs are the tiny preset's, rebuilt from their seeds (nothing of them is shipped)
    assert _same_state(bb.text_encoder, src.text_encoder.state_dict())
    assert _same_state(bb.text_encoder_2, src.text_encoder_2.state_dict())


def test_infinity_world_round_trip(tmp_path, monkeypatch):
    from cstoolkit.backbones.infinity import T5TextEncoder, build_transformer, build_vae
    from cstoolkit.world.train import save_infinity_parts

    tr = build_transformer("world", seed=3)
    vae = build_vae("world", seed=4)
    sizes = save_infinity_parts(tr, vae, tmp_path / "infinity")
    assert max(sizes.values()) <= LIMIT_BYTES
    monkeypatch.setenv(ENV, str(tmp_path))
    bb = InfinityBackbone.from_config(InfinityConfig(preset="world", seed=7))
    assert _same_state(bb.transformer, _fp16_state(tr)) and _same_state(bb.vae, _fp16_state(vae))
    assert bb.resolution == 128 and len(bb.scale_schedule()) == 7
    # the T5 is the one the transformer was trained on, whatever backbone.seed says
    assert _same_state(bb.text_encoder, T5TextEncoder.tiny(0).state_dict())


def test_infinity_world_trained_text_encoder_round_trip(tmp_path, monkeypatch):
    """A T5 trained with the world transformer is saved as text_encoder/ and loaded in place of the seeded one."""
    from cstoolkit.backbones.infinity import T5TextEncoder, build_transformer, build_vae
    from cstoolkit.world.train import save_infinity_parts

    text = T5TextEncoder.tiny(0)
    with torch.no_grad():
        for p in text.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained": no longer the seed's weights
    sizes = save_infinity_parts(build_transformer("world", seed=3), build_vae("world", seed=4), tmp_path / "infinity",
                                text)
    assert 0 < sizes["text_encoder"] <= LIMIT_BYTES
    monkeypatch.setenv(ENV, str(tmp_path))
    bb = InfinityBackbone.from_config(InfinityConfig(preset="world"))
    assert _same_state(bb.text_encoder, _fp16_state(text))
    assert not _same_state(bb.text_encoder, T5TextEncoder.tiny(0).state_dict())
    prompt = ["a circle in stripes style"]
    assert torch.equal(bb.text_encoder.tokenize(prompt)[0], text.tokenize(prompt)[0])  # the byte-level tokenizer


def test_switti_world_round_trip(tmp_path, monkeypatch):
    from dataclasses import replace

    from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig, build_transformer, build_vqvae, presets
    from cstoolkit.backbones.switti.loading import REBUILT_BUFFERS
    from cstoolkit.backbones.switti.text import DualCLIPText
    from cstoolkit.world.train import save_switti_parts

    row = presets.preset_row("world")
    tr = build_transformer(row.transformer, seed=3)
    vq = build_vqvae(row.vqvae, seed=4)
    sizes = save_switti_parts(tr, vq, tmp_path / "switti")
    assert max(sizes.values()) <= LIMIT_BYTES
    # the row names world/weights/switti/ (computed at import): point it at the files just written
    monkeypatch.setitem(presets.PRESETS, "world", replace(row, weights=presets.Weights(
        transformer=str(tmp_path / "switti" / "transformer"), vqvae=str(tmp_path / "switti" / "vqvae"))))
    bb = SwittiBackbone.from_config(SwittiConfig(preset="world"))
    def trained(module: torch.nn.Module) -> dict[str, torch.Tensor]:  # rebuilt buffers are neither saved nor read
        return {k: v for k, v in _fp16_state(module).items() if k not in REBUILT_BUFFERS}

    assert _same_state(bb.transformer, trained(tr)) and _same_state(bb.vae, trained(vq))
    assert bb.resolution == 128
    text = DualCLIPText.random(row.text.clip_l_config, row.text.clip_g_config, 0, row.text.max_length)
    assert _same_state(bb.text_encoder, text.state_dict())


def test_missing_world_weights_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(UserError, match="no trained weights"):
        SDXLBackbone.from_config(SDXLConfig(preset="world"))
    with pytest.raises(UserError, match="no trained weights"):
        InfinityBackbone.from_config(InfinityConfig(preset="world"))
    from dataclasses import replace

    from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig, presets

    row = presets.preset_row("world")
    monkeypatch.setitem(presets.PRESETS, "world", replace(row, weights=presets.Weights(
        transformer=str(tmp_path / "switti" / "transformer"), vqvae=str(tmp_path / "switti" / "vqvae"))))
    with pytest.raises(UserError, match="not found"):
        SwittiBackbone.from_config(SwittiConfig(preset="world"))


# ------------------------------------------------------------------------------ shipped weights
def test_shipped_files_within_limit():
    files = [p for b in ("sdxl", "infinity", "switti") for p in world_weights_dir(b).rglob("*.safetensors")]
    if not files:
        pytest.skip("no world weights shipped yet (world/weights/<backbone>/)")
    sizes = {str(p): p.stat().st_size for p in files}
    assert all(s <= LIMIT_BYTES for s in sizes.values()), sizes


def _held_out_accuracy(images: list, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    from cstoolkit.world.oracle import load_oracle

    res = load_oracle().classify(images)
    content = sum(r["content"] == c for r, (c, _) in zip(res, pairs)) / len(pairs)
    style = sum(r["style"] == s for r, (_, s) in zip(res, pairs)) / len(pairs)
    return content, style


@needs_sdxl
@needs_oracle
def test_sdxl_world_draws_held_out_pairs():
    """10 held-out pairs x 2 seeds, Euler 20 steps, CFG 4 on the CPU: measured 1.00 content / 0.90 style
    (the GPU evaluation on 80 images: 0.99 / 0.86, docs/world.md)."""
    from cstoolkit.world.generator import HELD_OUT, caption

    bb = SDXLBackbone.from_config(SDXLConfig(preset="world"))
    pairs = [p for p in HELD_OUT for _ in range(2)]
    images = []
    for c, s in HELD_OUT:
        images += bb.sample(caption(c, s), num_images=2, seed=0, steps=20, guidance_scale=4.0, progress=False)
    content, style = _held_out_accuracy(images, pairs)
    assert content >= FLOORS["sdxl"]["content"] and style >= FLOORS["sdxl"]["style"], (content, style)


@needs_sdxl
def test_sdxl_world_vae_draws_no_top_right_dot():
    """#17 item 5: the world SDXL's decoder drew a coloured dot in every sample's top-right corner (one-channel
    GroupNorm groups: a spike that sets the output level). The shipped VAE (16 groups, rebuilt and trained on the
    UNet's latents too) reconstructs 24 dark renders with a top-right 16 px error no larger than the other corners'
    (measured 0.99x; the old decoder 2.68x: 0.0725 against 0.025-0.029)."""
    from cstoolkit.world.train.sdxl import dark_renders, decoder_artifacts, dot_ratio

    vae = SDXLBackbone.from_config(SDXLConfig(preset="world")).vae.float().eval()
    m = decoder_artifacts(vae, dark_renders())
    assert dot_ratio(m) <= 1.25, m
    assert vae.config.norm_num_groups == 16


@needs_infinity
@needs_oracle
def test_infinity_world_draws_held_out_pairs():
    """10 held-out pairs x 2 seeds, CFG 3 on the CPU: measured 0.60 content with the v2 oracle (0.70 with the old
    one; the Infinity world model draws the styles; the shapes of a few held-out pairs are still blobs; chance is
    0.08) and 1.00 style (weights of run 9)."""
    from cstoolkit.world.generator import HELD_OUT, caption

    bb = InfinityBackbone.from_config(InfinityConfig(preset="world"))
    pairs = list(HELD_OUT) * 2  # two seeds per pair: row i draws from seed i
    images = bb.generate([caption(c, s) for c, s in pairs], cfg=3.0, seed=0, progress=False)
    content, style = _held_out_accuracy(images, pairs)
    assert content >= FLOORS["infinity"]["content"] and style >= FLOORS["infinity"]["style"], (content, style)


def _switti_shipped() -> bool:
    root = world_weights_dir("switti")
    return all((root / d / f).is_file() for d in ("transformer", "vqvae") for f in ("config.json", "model.safetensors"))


@pytest.mark.skipif(not _switti_shipped(), reason="world/weights/switti/ not shipped yet (made by world/train_gpu.sh)")
@needs_oracle
def test_switti_world_draws_held_out_pairs():
    """10 held-out pairs x 2 seeds, CFG 3 on the CPU: measured 0.85 content / 1.00 style (weights of run 7; the
    GPU evaluation on 80 images: 0.80 / 0.975 at CFG 3, 0.84 / 0.975 at CFG 6)."""
    from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig
    from cstoolkit.world.generator import HELD_OUT, caption

    bb = SwittiBackbone.from_config(SwittiConfig(preset="world"))
    pairs = list(HELD_OUT) * 2  # two seeds per pair: row i draws from seed i
    images = bb.generate([caption(c, s) for c, s in pairs], cfg=3.0, seed=0, progress=False)
    content, style = _held_out_accuracy(images, pairs)
    assert content >= FLOORS["switti"]["content"] and style >= FLOORS["switti"]["style"], (content, style)


@needs_sdxl
@needs_oracle
def test_neutral_words_do_not_already_score_as_the_novel_concepts():
    """#17 item 3: the bench gives a method 'object' / 'pattern' for a novel content / style, so the plain
    prompt with the neutral word must not already score: on the world SDXL (3 pairs of each novel kind x 2
    images, 20 steps) the oracle names the pair's novel concept for none of them (measured: 'a object in
    {s} style' draws a heart in s; 'a {c} in pattern style' draws c in neon or mosaic)."""
    from cstoolkit.world.bench import NEUTRAL_CONTENT, NEUTRAL_STYLE, WorldItem, kind_pairs
    from cstoolkit.world.oracle import load_oracle

    bb = SDXLBackbone.from_config(SDXLConfig(preset="world"))
    oracle = load_oracle()
    hits = {"content": [], "style": [], "both": []}
    for kind in ("novel_content", "novel_style", "novel_both"):
        for c, s in kind_pairs(kind)[:3]:
            it = WorldItem("x", c, s, 0, 0, kind)
            assert (it.content_word == NEUTRAL_CONTENT) == (kind != "novel_style")
            assert (it.style_word == NEUTRAL_STYLE) == (kind != "novel_content")
            images = bb.sample(f"a {it.content_word} in {it.style_word} style", num_images=2, seed=0, steps=20,
                               guidance_scale=4.0, progress=False)
            for r in oracle.classify(images):
                if it.content_word == NEUTRAL_CONTENT:
                    hits["content"].append(r["content"] == c)
                if it.style_word == NEUTRAL_STYLE:
                    hits["style"].append(r["style"] == s)
                hits["both"].append(r["content"] == c and r["style"] == s)
    assert len(hits["content"]) == len(hits["style"]) == 12 and len(hits["both"]) == 18
    rates = {k: sum(v) / len(v) for k, v in hits.items()}
    assert rates["content"] <= 1 / 6 and rates["style"] <= 1 / 6 and rates["both"] == 0, rates
