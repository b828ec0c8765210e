"""Switti backbone: official key layout, loading, teacher forcing, cached generation, hooks, learned tokens."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cstoolkit.backbone import AttentionCall, AttentionEdit, ScaleTargets, StepCall, StepEdit
from cstoolkit.backbones.switti import (
    PRESETS,
    SwittiBackbone,
    SwittiConfig,
    TransformerConfig,
    Weights,
    add_preset,
    build_transformer,
    build_vqvae,
    filter_logits,
    save_transformer,
    save_vqvae,
)
from cstoolkit.backbones.switti.backbone import _weight_sources
from cstoolkit.backbones.switti.presets import preset_row
from cstoolkit.errors import UserError
from cstoolkit.registry import get_backbone

ROOT = Path(__file__).resolve().parents[1]
STYLE_IMAGE = ROOT / "examples" / "style_watercolor.png"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny() -> SwittiBackbone:
    backbone = SwittiBackbone.from_config(SwittiConfig(preset="tiny"))
    backbone.freeze()
    return backbone


def _image(backbone: SwittiBackbone) -> torch.Tensor:
    from PIL import Image

    return backbone.preprocess([Image.open(STYLE_IMAGE).convert("RGB")])


def _non_ar(tiny: SwittiBackbone) -> SwittiBackbone:
    """The tiny backbone with the same weights and Switti's within-scale attention (use_ar=False)."""
    tr = build_transformer(dataclasses.replace(tiny.transformer.cfg, use_ar=False), seed=None)
    tr.load_state_dict(tiny.transformer.state_dict(), strict=False)
    return SwittiBackbone(tiny.config, tr.reset_buffers().eval(), tiny.vae, tiny.text_encoder,
                          resolution=tiny.resolution, weight_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# official layout
# ---------------------------------------------------------------------------------------------
def _documented_keys(reso: int) -> dict[str, tuple[int, ...]]:
    """SwittiHF(depth=30, reso) as documented (notes/switti.md + models/switti.py), written out by hand."""
    c, ctx, L, s = 1920, 2048, {512: 2240, 1024: 9451}[reso], {512: 10, 1024: 14}[reso]
    keys = {
        "word_embed.weight": (c, 32), "word_embed.bias": (c,), "text_pooler.weight": (c, 1280),
        "text_pooler.bias": (c,), "pos_start": (1, 1, c), "lvl_embed.weight": (s, c),
        "crop_embed.weight": (c // 8,), "crop_proj.weight": (c, c), "crop_proj.bias": (c,),
        "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (4096, c), "head.bias": (4096,),
    }
    for i in range(30):
        p = f"blocks.{i}."
        keys.update({
            p + "attn.to_qkv.weight": (3 * c, c), p + "attn.to_qkv.bias": (3 * c,),
            p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
            p + "cross_attn.to_q.weight": (c, c), p + "cross_attn.to_q.bias": (c,),
            p + "cross_attn.to_kv.weight": (2 * c, ctx), p + "cross_attn.to_kv.bias": (2 * c,),
            p + "cross_attn.proj.weight": (c, c), p + "cross_attn.proj.bias": (c,),
            p + "ffn.up_proj.weight": (5120, c), p + "ffn.gate_proj.weight": (5120, c),
            p + "ffn.down_proj.weight": (c, 5120),
            p + "self_attention_norm1.weight": (c,), p + "self_attention_norm2.weight": (c,),
            p + "cross_attention_norm1.weight": (c,), p + "cross_attention_norm2.weight": (c,),
            p + "ffn_norm1.weight": (c,), p + "ffn_norm2.weight": (c,), p + "attention_y_norm.weight": (ctx,),
            p + "ada_lin.1.weight": (6 * c, c), p + "ada_lin.1.bias": (6 * c,), p + "crop_cond_scales": (1, c),
        })
    return keys


@pytest.mark.parametrize("preset,reso", [("switti-512", 512), ("switti-ar", 512), ("switti-1024", 1024)])
def test_full_presets_on_meta_have_the_official_keys_and_shapes(preset, reso):
    model = build_transformer(preset=preset, device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _documented_keys(reso)
    assert all(p.is_meta for p in model.parameters())
    assert 2.4e9 < sum(p.numel() for p in model.parameters()) < 2.5e9
    cfg = model.cfg
    assert TransformerConfig.from_official(cfg.to_official()) == cfg  # config.json of SwittiHF round trip
    assert cfg.use_ar == (preset == "switti-ar")


def _documented_vqvae_keys() -> set[str]:
    """VAR's VQ-VAE (ch 160, ch_mult 1,1,2,2,4, 2 res blocks, attention in the last level + middle)."""
    mult, ch, keys = (1, 1, 2, 2, 4), 160, set()

    def p(name, *leaves):
        keys.update(f"{name}.{leaf}" for leaf in leaves or ("weight", "bias"))

    def res(name, cin, cout):
        for sub in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if cin != cout else ()):
            p(f"{name}.{sub}")

    def attn(name):
        for sub in ("norm", "qkv", "proj_out"):
            p(f"{name}.{sub}")

    p("encoder.conv_in")
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i == 4:
                attn(f"encoder.down.{i}.attn.{j}")
        if i < 4:
            p(f"encoder.down.{i}.downsample.conv")
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.block_1", 640, 640), attn(f"{part}.mid.attn_1"), res(f"{part}.mid.block_2", 640, 640)
        p(f"{part}.norm_out"), p(f"{part}.conv_out")
    p("decoder.conv_in")
    cin = 640
    for i in reversed(range(5)):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == 4:
                attn(f"decoder.up.{i}.attn.{j}")
        if i > 0:
            p(f"decoder.up.{i}.upsample.conv")
    p("quant_conv"), p("post_quant_conv"), p("quantize.embedding", "weight")
    for i in range(4):
        p(f"quantize.quant_resi.qresi_ls.{i}")
    return keys | {"quantize.ema_vocab_hit_SV"}


def test_vqvae_on_meta_has_the_official_module_tree():
    vae = build_vqvae("switti-ar", device="meta")
    sd = vae.state_dict()
    assert set(sd) == _documented_vqvae_keys()
    assert tuple(sd["quantize.embedding.weight"].shape) == (4096, 32)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 640, 3, 3)
    assert vae.stride == 16


def test_registered_with_presets_and_schedules(tiny):
    cls = get_backbone("switti")
    assert cls is SwittiBackbone and {"tiny", "switti-512", "switti-1024", "switti-ar"} <= set(cls.presets)
    assert cls.family == "scalewise" and set(PRESETS) == set(cls.presets)
    assert tiny.scale_schedule() == [(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert tiny.image_size() == (128, 128) and tiny.transformer.cfg.use_ar
    assert tiny.text_encoders() == {"clip_l": 32, "clip_g": 64}
    with pytest.raises(UserError, match="no Switti scale schedule"):
        tiny.scale_schedule(100)
    # random_weights: a full preset reads no file
    sources = _weight_sources(SwittiConfig(preset="switti-ar", random_weights=True), preset_row("switti-ar"))
    assert set(sources.values()) == {None}
    assert _weight_sources(SwittiConfig(preset="switti-ar"), preset_row("switti-ar"))["transformer"] == \
        "yresearch/Switti-AR"


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_official_layout_round_trip(tiny, tmp_path):
    folder = tmp_path / "switti"
    save_transformer(tiny.transformer, folder)
    save_vqvae(tiny.vae, folder / "vqvae")
    tiny.text.save_pretrained(folder / "text_encoder", folder / "text_encoder_2")
    stored = load_file(str(folder / "model.safetensors"))
    assert set(stored) == set(tiny.transformer.state_dict())  # buffers included
    assert torch.equal(stored["lvl_1L"], tiny.transformer.lvl_1L)
    config = json.loads((folder / "config.json").read_text())
    assert config["cstoolkit"]["use_ar"] is True and "depth" not in config  # tiny: not a SwittiHF config

    kw = dict(cfg=3.0, seed=5, top_k=50, top_p=0.9)
    prompts = ["a watercolor fox", "x"]
    want = tiny.generate_codes(prompts, **kw).codes
    loaded = SwittiBackbone.from_config(SwittiConfig(preset="tiny", seed=123, pretrained=str(folder)))
    assert torch.equal(loaded.generate_codes(prompts, **kw).codes, want)
    assert torch.allclose(loaded.decode(want), tiny.decode(want))
    fresh = SwittiBackbone.from_config(SwittiConfig(preset="tiny", seed=123))
    assert not torch.equal(fresh.generate_codes(prompts, **kw).codes, want)

    # a file without the mask buffers still loads (they are rebuilt), parts named one by one
    del stored["attn_bias_for_masking"], stored["lvl_1L"]
    save_file(stored, str(tmp_path / "model.safetensors"))
    parts = SwittiConfig(preset="tiny", seed=7, transformer=str(tmp_path / "model.safetensors"),
                         vae=str(folder / "vqvae"), text_encoder=str(folder / "text_encoder"),
                         text_encoder_2=str(folder / "text_encoder_2"))
    again = SwittiBackbone.from_config(parts)
    assert torch.equal(again.transformer.attn_bias_for_masking, tiny.transformer.attn_bias_for_masking)
    assert torch.equal(again.generate_codes(prompts, **kw).codes, want)

    # a preset row that names saved weights (how a trained `world` preset is added)
    row = dataclasses.replace(preset_row("tiny"), description="tiny, saved weights",
                              weights=Weights(str(folder), str(folder / "vqvae"), str(folder / "text_encoder"),
                                              str(folder / "text_encoder_2")))
    add_preset("tiny-saved-test", row)
    try:
        assert "tiny-saved-test" in SwittiBackbone.presets
        saved = SwittiBackbone.from_config(SwittiConfig(preset="tiny-saved-test", seed=99))
        assert torch.equal(saved.generate_codes(prompts, **kw).codes, want)
    finally:
        PRESETS.pop("tiny-saved-test"), SwittiBackbone.presets.pop("tiny-saved-test")


def test_loading_refuses_other_architectures(tiny, tmp_path):
    nar = _non_ar(tiny)
    save_transformer(nar.transformer, tmp_path / "nar")
    with pytest.raises(UserError, match="use_ar=False"):
        SwittiBackbone.from_config(SwittiConfig(preset="tiny", transformer=str(tmp_path / "nar")))
    sd = {k: v.clone() for k, v in tiny.transformer.state_dict().items()}
    sd["head.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="head.weight has shape"):
        SwittiBackbone.from_config(SwittiConfig(preset="tiny", transformer=str(tmp_path / "model.safetensors")))
    with pytest.raises(UserError, match="file not found"):
        SwittiBackbone.from_config(SwittiConfig(preset="tiny", vae=str(tmp_path / "missing.safetensors")))


# ---------------------------------------------------------------------------------------------
# targets and training
# ---------------------------------------------------------------------------------------------
def test_targets_follow_vars_residual_quantisation(tiny):
    targets = tiny.image_to_targets(_image(tiny))
    assert [t.shape for t in targets.targets[:3]] == [(1, 1), (1, 4), (1, 9)] and targets.targets[-1].shape == (1, 256)
    assert targets.inputs.shape == (1, 679, 32)
    pns = [h for h, _ in targets.schedule]
    vae = tiny.vae
    # scale 0: the code nearest to the area-mean of the features; input of scale 1 = area(f_hat, 2)
    f = vae.quant_conv(vae.encoder(_image(tiny))).float()
    assert targets.targets[0].item() == vae.quantize.nearest(f.mean((2, 3))).item()
    f_hat, _ = vae.next_input(0, pns, torch.zeros_like(f), vae.embed(targets.targets[0], 1))
    assert torch.allclose(targets.inputs[:, :4], F.interpolate(f_hat, size=(2, 2), mode="area").flatten(2).mT)
    # the last scale quantises the residual of everything before it, on the full grid
    before = 0
    for si, pn in enumerate(pns[:-1]):
        before = before + vae.quantize.upsampled(vae.embed(targets.targets[si], pn), si, len(pns), (16, 16))
    residual = (f - before).permute(0, 2, 3, 1).reshape(-1, 32)
    assert torch.equal(targets.targets[-1][0], vae.quantize.nearest(residual))


def test_loss_is_token_mean_cross_entropy_and_trains_learned_tokens(tiny):
    targets = tiny.image_to_targets(_image(tiny))
    placeholder = {"<s>": {k: v.clone().requires_grad_(True) for k, v in tiny.word_embeddings("watercolor").items()}}
    text = tiny.encode_text(["a painting in <s> style"], learned=placeholder)
    logits = tiny.teacher_forcing_logits(text, targets)
    loss = tiny.teacher_forcing_loss(logits, targets)
    ref = F.cross_entropy(torch.cat(logits, 1)[0], torch.cat(targets.targets, 1)[0])
    assert torch.allclose(loss, ref, atol=1e-5)
    first3 = tiny.teacher_forcing_loss(logits, targets, scale_weights=[1.0] * 3 + [0.0] * 7)
    ref3 = F.cross_entropy(torch.cat(logits[:3], 1)[0], torch.cat(targets.targets[:3], 1)[0], reduction="sum") / 680
    assert torch.allclose(first3, ref3, atol=1e-5)
    first3.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in placeholder["<s>"].values())
    assert all(p.grad is None for p in tiny.parameters())


def test_teacher_forcing_loss_decreases(tiny):
    backbone = copy.deepcopy(tiny)
    backbone.transformer.requires_grad_(True)
    schedule = backbone.scale_schedule()[:4]  # the first 4 scales are enough to fit
    targets = backbone.image_to_targets(_image(backbone))
    targets = ScaleTargets(targets.targets[:4], targets.inputs[:, : sum(h * w for h, w in schedule) - 1], schedule)
    text = backbone.encode_text(["a watercolor painting"])
    opt = torch.optim.Adam(backbone.transformer.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = backbone.teacher_forcing_loss(backbone.teacher_forcing_logits(text, targets), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_learned_tokens_splice_into_both_encoders(tiny):
    words = tiny.word_embeddings("watercolor fox")
    assert set(words) == {"clip_l", "clip_g"} and words["clip_l"].shape[1] == 32 and words["clip_g"].shape[1] == 64
    spliced = tiny.encode_text(["a <c> on a boat", "<c>"], learned={"<c>": words})
    plain = tiny.encode_text(["a watercolor fox on a boat", "watercolor fox"])
    assert torch.allclose(spliced.tokens, plain.tokens, atol=1e-5)
    assert torch.equal(spliced.mask, plain.mask) and torch.allclose(spliced.pooled, plain.pooled, atol=1e-5)
    assert plain.tokens.shape == (2, 77, 96) and plain.pooled.shape == (2, 64)
    # whole input embeddings (one table per encoder), with gradients
    text = tiny.text
    embeds = {}
    for key, model, tok in (("clip_l", text.clip_l, text.tokenizer_l), ("clip_g", text.clip_g, text.tokenizer_g)):
        ids = tok(["a cat"], max_length=77, padding="max_length", return_tensors="pt").input_ids
        embeds[key] = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    ctx = tiny.encode_text(["a cat"], input_embeds=embeds)
    assert torch.allclose(ctx.tokens, tiny.encode_text(["a cat"]).tokens, atol=1e-5)
    ctx.pooled[:, 0].sum().backward()  # (a plain sum is constant: LayerNorm with unit weight, zero bias)
    assert embeds["clip_g"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def test_generation_is_deterministic_and_rows_are_independent(tiny):
    kw = dict(cfg=4.0, top_k=100, top_p=0.9)
    a = tiny.generate(["a cat", "a dog"], seed=7, progress=False, **kw)
    b = tiny.generate(["a cat", "a dog"], seed=7, progress=False, **kw)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b] and a[0].size == (128, 128)
    assert tiny.generate(["a cat"], seed=8, progress=False, **kw)[0].tobytes() != a[0].tobytes()
    pair = tiny.generate_codes(["a cat", "a dog"], seed=7, **kw)
    alone = tiny.generate_codes(["a dog"], seed=[8], **kw)  # row 1 of the pair used seed 7 + 1
    assert all(torch.equal(x[1], y[0]) for x, y in zip(pair.labels, alone.labels))  # the same tokens
    assert torch.allclose(alone.codes[0], pair.codes[1], atol=1e-5)
    smooth = [tiny.generate_codes(["a cat"], seed=3, more_smooth=True, smooth_start_si=2, **kw).codes
              for _ in range(2)]
    assert torch.equal(*smooth) and not torch.equal(smooth[0], pair.codes[:1])


def _forced_logits(backbone, prompts, out, hooks=()):
    schedule = backbone.scale_schedule()
    pns = [h for h, _ in schedule]
    f_hat, inputs = backbone.vae.idx_to_inputs(out.labels, pns)
    assert torch.allclose(f_hat, out.codes, atol=1e-5)
    with torch.no_grad():
        text = backbone.encode_text(prompts)
        return backbone.teacher_forcing_logits(text, ScaleTargets(out.labels, inputs, schedule), hooks=hooks)


@pytest.mark.parametrize("ar", [True, False])
def test_generation_equals_teacher_forcing(tiny, ar):
    """Switti-AR: KV-cached generation == one block-causal pass; Switti: per-scale == within-scale mask."""
    backbone = tiny if ar else _non_ar(tiny)
    logits = []
    prompts = ["a red cat", "blue"]
    out = backbone.generate_codes(prompts, cfg=0.0, seed=3, step_hooks=[lambda c: logits.append(c.logits)])
    forced = _forced_logits(backbone, prompts, out)
    for step, (a, b) in enumerate(zip(logits, forced)):
        assert torch.allclose(a, b, atol=1e-4), step
    if ar:  # the two attention patterns differ from the second scale on
        other = _forced_logits(_non_ar(tiny), prompts, out)
        assert torch.allclose(other[0], forced[0], atol=1e-5) and not torch.allclose(other[3], forced[3], atol=1e-3)


def test_kv_memory_in_block_0_matches_between_generation_and_teacher_forcing(tiny):
    """CSD-VAR's augmented K-V memory: extra keys in block 0, visible to the tokens of one scale only."""
    g = torch.Generator().manual_seed(0)
    heads, dh = tiny.transformer.cfg.heads, tiny.transformer.cfg.head_dim
    mem_k, mem_v = torch.randn(1, heads, 2, dh, generator=g), torch.randn(1, heads, 2, dh, generator=g)
    at = 4

    def memory(call: AttentionCall):
        if call.block != 0 or call.step not in (-1, at):
            return None
        b, lq = call.q.shape[0], call.q.shape[2]
        if call.step == -1:
            visible = (call.token_scales == at)[None, :, None].expand(b, lq, 2)
        else:
            visible = torch.ones(b, lq, 2, dtype=torch.bool)
        return AttentionEdit(extra_k=mem_k.expand(b, -1, -1, -1), extra_v=mem_v.expand(b, -1, -1, -1),
                             extra_mask=visible)

    logits, plain = [], []
    prompts = ["a red cat"]
    tiny.generate_codes(prompts, cfg=0.0, seed=3, step_hooks=[lambda c: plain.append(c.logits)])
    out = tiny.generate_codes(prompts, cfg=0.0, seed=3, hooks=[memory], step_hooks=[lambda c: logits.append(c.logits)])
    assert torch.equal(plain[at - 1], logits[at - 1]) and not torch.allclose(plain[at], logits[at], atol=1e-3)
    forced = _forced_logits(tiny, prompts, out, hooks=[memory])
    for step, (a, b) in enumerate(zip(logits, forced)):
        assert torch.allclose(a, b, atol=1e-4), step
    unhooked = _forced_logits(tiny, prompts, out)
    assert torch.allclose(unhooked[at - 1], forced[at - 1]) and not torch.allclose(unhooked[at], forced[at], atol=1e-4)


def test_attention_hooks_cfg_rows_and_turn_off(tiny):
    calls = []

    def spy(call: AttentionCall):
        if call.block == 0:
            calls.append((call.step, tuple(call.q.shape), tuple(call.k.shape), call.paths, call.cfg_half))

    kw = dict(cfg=3.0, seed=1, paths=["p0", "p1"], turn_off_cfg_start_si=8)
    plain = tiny.generate_codes(["a", "b"], **kw).codes
    assert torch.equal(tiny.generate_codes(["a", "b"], hooks=[spy], **kw).codes, plain)
    assert len(calls) == 10 and calls[0][3] == ["p0", "p1", "p0", "p1"]
    assert calls[0][4] == ["cond", "cond", "uncond", "uncond"]
    assert calls[7][1] == (4, 4, 100, 16) and calls[7][2] == (4, 4, 255, 16)  # KV cache of scales 0..7
    assert calls[8][1] == (2, 4, 169, 16) and calls[8][4] == ["cond", "cond"]  # guidance off: uncond rows gone
    assert calls[-1][2] == (2, 4, 680, 16)

    def hidden(call):
        e = torch.randn_like(call.k)
        return AttentionEdit(extra_k=e, extra_v=e, extra_mask=torch.zeros(e.shape[0], e.shape[2], dtype=torch.bool))

    assert torch.allclose(tiny.generate_codes(["a", "b"], hooks=[hidden], **kw).codes, plain)


def test_step_hooks_override_labels_and_drop_rows(tiny):
    targets = tiny.image_to_targets(_image(tiny))

    def force_first(call: StepCall):
        labels = call.labels.clone()
        labels[0] = targets.targets[call.step][0]
        return StepEdit(labels=labels)

    out = tiny.generate_codes(["a", "b"], cfg=3.0, seed=0, step_hooks=[force_first])
    f_hat, _ = tiny.vae.idx_to_inputs(targets.targets, [h for h, _ in targets.schedule])
    assert torch.allclose(out.codes[0], f_hat[0], atol=1e-5)

    def drop_aux(call: StepCall):
        return StepEdit(drop_paths=["aux"]) if call.step == 2 else None

    kw = dict(cfg=3.0, seed=0, paths=["aux", "main"], progress=False)
    full = tiny.generate(["a", "b"], output_paths=["main"], **kw)
    dropped = tiny.generate(["a", "b"], step_hooks=[drop_aux], **kw)
    assert full[0] is None and dropped[0] is None and dropped[1].size == (128, 128)
    kw.pop("progress")
    a, b = tiny.generate_codes(["a", "b"], **kw), tiny.generate_codes(["a", "b"], step_hooks=[drop_aux], **kw)
    assert b.rows == [1] and all(torch.equal(x[-1], y[-1]) for x, y in zip(a.labels, b.labels))  # same tokens
    assert torch.allclose(a.codes[1], b.codes[0], atol=1e-5)


def test_filter_logits_follows_the_official_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]


def test_phi_choice_follows_the_official_ticks():
    """np.linspace ticks of the official PhiPartiallyShared; scale 2 of 10 is a tie that rounding decides."""
    phis = build_vqvae("tiny", seed=0).quantize.quant_resi
    picks = {n: [list(phis.qresi_ls).index(phis.pick(si, n)) for si in range(n)] for n in (10, 14)}
    assert picks[10] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert picks[14] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_preset_is_read_from_config_json(tiny, tmp_path):
    from cstoolkit.backbones.switti.loading import infer_preset

    save_transformer(tiny.transformer, tmp_path / "t")
    assert infer_preset(str(tmp_path / "t"), "backbone.transformer") == "tiny"
    official = build_transformer("switti-1024", device="meta").cfg.to_official()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "model.safetensors").write_bytes(b"")
    (tmp_path / "o" / "config.json").write_text(json.dumps(official))
    assert infer_preset(str(tmp_path / "o"), "backbone.transformer") == "switti-1024"
    assert official == {"depth": 30, "rope": True, "rope_theta": 10000.0, "rope_size": 128.0, "use_swiglu_ffn": True,
                        "use_ar": False, "use_crop_cond": True, "reso": 1024}


def test_switti_ar_with_random_weights_reads_no_file(monkeypatch):
    import transformers

    from cstoolkit.backbones.infinity import loading as inf_loading
    from cstoolkit.backbones.switti import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a file was read")

    for cls in (transformers.CLIPTextModel, transformers.CLIPTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setattr(loading, "load_file", refuse)
    monkeypatch.setattr(inf_loading, "load_file", refuse)
    bb = SwittiBackbone.from_config(SwittiConfig(preset="switti-ar", random_weights=True), device="meta")
    assert 2.4e9 < sum(p.numel() for p in bb.transformer.parameters()) < 2.5e9 and bb.transformer.cfg.use_ar
    assert bb.text_encoders() == {"clip_l": 768, "clip_g": 1280} and bb.text.clip_g.config.num_hidden_layers == 32
    assert bb.vae.cfg.ch == 160 and bb.resolution == 512 and bb.scale_schedule()[-1] == (32, 32)
    assert bb.tokenize(["a cat"])[0].shape == (1, 77)


def test_cross_text_switch_matches_teacher_forcing(tiny):
    """CSD-VAR's inference: the cross-attention reads another text from a scale on (pooled text kept)."""
    prompts, other = ["a red cat", "blue"], tiny.encode_text(["a watercolor style", "oil"])
    logits = []
    out = tiny.generate_codes(prompts, cfg=0.0, seed=3, cross_text=[(0, other)],
                              step_hooks=[lambda c: logits.append(c.logits)])
    schedule = tiny.scale_schedule()
    _, inputs = tiny.vae.idx_to_inputs(out.labels, [h for h, _ in schedule])
    with torch.no_grad():
        forced = tiny.teacher_forcing_logits(tiny.encode_text(prompts), ScaleTargets(out.labels, inputs, schedule),
                                             cross_text=other)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(logits, forced))
    plain = []
    tiny.generate_codes(prompts, cfg=0.0, seed=3, step_hooks=[lambda c: plain.append(c.logits)])
    assert not torch.allclose(plain[0], logits[0], atol=1e-4)
    # a switch at scale 4 with CFG keeps the uncond half and changes nothing before scale 4
    calls = {}
    for key, cross in (("plain", ()), ("switched", [(4, other)])):
        calls[key] = []
        tiny.generate_codes(prompts, cfg=3.0, seed=3, cross_text=cross,
                            step_hooks=[lambda c, k=key: calls[k].append(c.logits)])
    assert torch.equal(calls["plain"][3], calls["switched"][3])
    assert not torch.allclose(calls["plain"][4], calls["switched"][4], atol=1e-4)
