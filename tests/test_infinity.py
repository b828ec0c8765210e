"""Infinity backbone: official key layout, loading, teacher forcing, generation, hooks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cstoolkit.backbone import AttentionCall, AttentionEdit, ScaleTargets, StepCall, StepEdit
from cstoolkit.backbones.infinity import (
    InfinityBackbone,
    InfinityConfig,
    build_transformer,
    build_vae,
    sample_bits,
    scale_schedule,
)
from cstoolkit.backbones.infinity.loading import load_file
from cstoolkit.backbones.infinity.quantizer import accumulate, bits_to_codes, resize_up
from cstoolkit.backbones.infinity.schedule import rope_positions
from cstoolkit.backbones.infinity.transformer import AttentionContext, KVCache
from cstoolkit.errors import UserError
from cstoolkit.registry import get_backbone

ROOT = Path(__file__).resolve().parents[1]
STYLE_IMAGE = ROOT / "examples" / "style_watercolor.png"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny() -> InfinityBackbone:
    return InfinityBackbone.from_config(InfinityConfig(preset="tiny"))


def _image(backbone: InfinityBackbone) -> torch.Tensor:
    from PIL import Image

    return backbone.preprocess([Image.open(STYLE_IMAGE).convert("RGB")])


# ---------------------------------------------------------------------------------------------
# official layout
# ---------------------------------------------------------------------------------------------
def _documented_2b_keys() -> dict[str, tuple[int, ...]]:
    """The key set of infinity_2b_reg.pth as documented (notes/infinity.md), written out by hand."""
    c, t5, heads = 2048, 2048, 16
    keys = {
        "cfg_uncond": (512, t5), "text_norm.weight": (t5,), "pos_start": (1, 1, c), "lvl_embed.weight": (15, c),
        "text_proj_for_sos.ca.mat_q": (1, 16, 128), "text_proj_for_sos.ca.mat_kv.weight": (2 * c, t5),
        "text_proj_for_sos.ca.v_bias": (c,), "text_proj_for_sos.ca.zero_k_bias": (c,),
        "text_proj_for_sos.ca.proj.weight": (c, c), "text_proj_for_sos.ca.proj.bias": (c,),
        "text_proj_for_ca.0.weight": (c, t5), "text_proj_for_ca.0.bias": (c,),
        "text_proj_for_ca.2.weight": (c, c), "text_proj_for_ca.2.bias": (c,),
        "word_embed.weight": (c, 32), "word_embed.bias": (c,),
        "shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (64, c), "head.bias": (64,),
    }
    for i in range(32):
        p = f"block_chunks.{i // 4}.module.{i % 4}."
        keys.update({
            p + "ada_gss": (1, 1, 6, c),
            p + "sa.mat_qkv.weight": (3 * c, c), p + "sa.q_bias": (c,), p + "sa.v_bias": (c,),
            p + "sa.zero_k_bias": (c,), p + "sa.scale_mul_1H11": (1, heads, 1, 1),
            p + "sa.proj.weight": (c, c), p + "sa.proj.bias": (c,),
            p + "ca.mat_q.weight": (c, c), p + "ca.mat_q.bias": (c,), p + "ca.mat_kv.weight": (2 * c, c),
            p + "ca.v_bias": (c,), p + "ca.zero_k_bias": (c,), p + "ca.proj.weight": (c, c), p + "ca.proj.bias": (c,),
            p + "ca_norm.weight": (c,), p + "ca_norm.bias": (c,),
            p + "ffn.fc1.weight": (4 * c, c), p + "ffn.fc1.bias": (4 * c,),
            p + "ffn.fc2.weight": (c, 4 * c), p + "ffn.fc2.bias": (c,),
        })
    return keys


def test_2b_on_meta_has_the_documented_keys_and_shapes():
    model = build_transformer(preset="infinity-2b", device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _documented_2b_keys()
    assert all(p.is_meta for p in model.parameters())
    assert 2.1e9 < sum(p.numel() for p in model.parameters()) < 2.3e9


def _documented_vae_keys() -> set[str]:
    """d32 BSQ-VAE: base 128, ch_mult 1,2,4,4,4, 2 res blocks, stride 16, .conv./.norm. wrappers."""
    mult, ch, keys = (1, 2, 4, 4, 4), 128, set()

    def conv(p):
        keys.update({p + ".conv.weight", p + ".conv.bias"})

    def norm(p):
        keys.update({p + ".norm.weight", p + ".norm.bias"})

    def res(p, cin, cout):
        norm(p + ".norm1"), conv(p + ".conv1"), norm(p + ".norm2"), conv(p + ".conv2")
        if cin != cout:
            conv(p + ".nin_shortcut")

    conv("encoder.conv_in")
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i < 4:
            conv(f"encoder.down.{i}.downsample.conv")
    res("encoder.mid.block_1", cin, cin), res("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out"), conv("encoder.conv_out")
    conv("decoder.conv_in"), res("decoder.mid.block_1", 512, 512), res("decoder.mid.block_2", 512, 512)
    cin = 512
    for i in reversed(range(5)):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i >= 1:
            conv(f"decoder.up.{i}.upsample.conv")
    norm("decoder.norm_out"), conv("decoder.conv_out")
    return keys | {"quantizer.lfq.mask"}


def test_d32_vae_on_meta_has_the_official_module_tree():
    vae = build_vae("infinity-2b", device="meta")
    sd = vae.state_dict()
    assert set(sd) == _documented_vae_keys()
    assert tuple(sd["encoder.conv_out.conv.weight"].shape) == (32, 512, 3, 3)
    assert tuple(sd["decoder.conv_in.conv.weight"].shape) == (512, 32, 3, 3)


def test_schedules_follow_the_official_templates(tiny):
    s1024 = scale_schedule(1024)
    assert [h for h, _ in s1024] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert sum(h * w for h, w in s1024) == 10521
    assert scale_schedule(512)[-1] == (32, 32) and len(scale_schedule(512)) == 10
    assert scale_schedule(256)[-1] == (16, 16) and len(scale_schedule(256)) == 7
    assert scale_schedule(1024, aspect_ratio=0.5)[-1] == (45, 90)
    assert tiny.scale_schedule() == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
    assert tiny.image_size() == (128, 128)
    pos = rope_positions([(1, 1), (2, 2), (4, 4)])  # measured on the 64-grid of the full template
    assert pos[:5].tolist() == [[0, 0], [0, 0], [0, 32], [32, 0], [32, 32]]


def test_registered_with_presets():
    cls = get_backbone("infinity")
    assert cls is InfinityBackbone and set(cls.presets) == {"tiny", "infinity-2b", "world"}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_official_file_layout_round_trip(tiny, tmp_path):
    torch.save(tiny.transformer.state_dict(), tmp_path / "transformer.pth")
    vae_sd = tiny.vae.state_dict()
    unwrapped = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
                 .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in vae_sd.items()}
    assert set(unwrapped) != set(vae_sd)
    torch.save({"vae": unwrapped}, tmp_path / "vae.pth")  # keys without the wrappers load too
    tiny.text_encoder.save_pretrained(tmp_path / "t5")
    config = InfinityConfig(preset="tiny", seed=123, transformer=str(tmp_path / "transformer.pth"),
                            vae=str(tmp_path / "vae.pth"), text_encoder=str(tmp_path / "t5"))
    loaded = InfinityBackbone.from_config(config)
    fresh = InfinityBackbone.from_config(InfinityConfig(preset="tiny", seed=123))
    kw = dict(cfg=3.0, tau=1.0, seed=5, progress=False)
    prompts = ["a watercolor fox", "x"]
    want = tiny.generate_codes(prompts, **kw).codes
    assert torch.equal(loaded.generate_codes(prompts, **kw).codes, want)
    assert not torch.equal(fresh.generate_codes(prompts, **kw).codes, want)
    assert torch.allclose(loaded.decode(want), tiny.decode(want))
    # the official folder layout through `pretrained:`
    folder = tmp_path / "weights"
    folder.mkdir()
    (tmp_path / "transformer.pth").rename(folder / "infinity_2b_reg.pth")
    (tmp_path / "vae.pth").rename(folder / "infinity_vae_d32reg.pth")
    (tmp_path / "t5").rename(folder / "flan-t5-xl")
    from_folder = InfinityBackbone.from_config(InfinityConfig(preset="tiny", seed=123, pretrained=str(folder)))
    assert torch.equal(from_folder.generate_codes(prompts, **kw).codes, want)


def test_loading_refuses_files_that_run_code_and_wrong_shapes(tiny, tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"weights": _Evil()}, bad)
    with pytest.raises(UserError, match="would run code"):
        load_file(bad, "backbone.transformer")
    sd = dict(tiny.transformer.state_dict())
    sd["head.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="head.weight has shape"):
        InfinityBackbone.from_config(InfinityConfig(preset="tiny", transformer=str(tmp_path / "wrong.pth")))
    with pytest.raises(UserError, match="file not found"):
        InfinityBackbone.from_config(InfinityConfig(preset="tiny", vae=str(tmp_path / "missing.pth")))


# ---------------------------------------------------------------------------------------------
# training path
# ---------------------------------------------------------------------------------------------
def test_teacher_forcing_loss_decreases_on_one_image(tiny):
    backbone = copy.deepcopy(tiny)  # trained below; the shared fixture stays as built
    full = backbone.image_to_targets(_image(backbone))
    assert full.targets[-1].shape == (1, 256, 16)
    assert full.inputs.shape == (1, sum(h * w for h, w in full.schedule) - 1, 16)
    schedule = backbone.scale_schedule(48)  # 4 scales, 1 ... 6: a few steps are enough to fit them
    targets = backbone.image_to_targets(_image(backbone), schedule)
    text = backbone.encode_text(["a watercolor painting"])
    opt = torch.optim.Adam(backbone.transformer.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = backbone.teacher_forcing_loss(backbone.teacher_forcing_logits(text, targets), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_targets_reconstruct_the_accumulated_features(tiny):
    targets = tiny.image_to_targets(_image(tiny))
    acc = accumulate(targets.targets, targets.schedule)
    # teacher-forcing inputs are the running sums, resized to the next scale
    first = resize_up(bits_to_codes(targets.targets[0], 1, 1), (16, 16))
    assert torch.allclose(targets.inputs[:, :4], resize_up(first, (2, 2)).flatten(2).transpose(1, 2))
    assert acc.shape == (1, 16, 16, 16)


def test_bitwise_self_correction_corrupts_the_history_and_targets_correct_it(tiny):
    """Infinity's BSC (training only): flipped bits enter the accumulated inputs; each scale's targets are the
    true bits of the residual against that corrupted history; strength 0 is the plain teacher forcing."""
    from cstoolkit.backbones.infinity.quantizer import multiscale_targets, quantize, resize_area

    features = tiny.vae.encode(_image(tiny))
    schedule = tiny.scale_schedule()
    clean_bits, clean_inputs = multiscale_targets(features, schedule)
    bits, inputs = multiscale_targets(features, schedule, self_correction=0.0, generator=torch.Generator())
    assert torch.equal(inputs, clean_inputs) and all(torch.equal(a, b) for a, b in zip(bits, clean_bits))
    runs = [multiscale_targets(features, schedule, self_correction=0.3, generator=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert torch.equal(runs[0][1], runs[1][1])  # deterministic with the generator's seed
    noisy_bits, noisy_inputs = runs[2]
    assert torch.equal(noisy_bits[0], clean_bits[0])  # the first scale's targets are the true bits
    assert not torch.equal(noisy_inputs[:, :4], clean_inputs[:, :4])  # (seed 2) scale 0's code was flipped ...
    assert not torch.equal(noisy_bits[1], clean_bits[1])  # ... so scale 1's targets differ from the clean ones
    # later targets are the bits of the residual against the corrupted history: re-quantising the features minus
    # the corrupted running sum at scale 1 gives them back
    h, w = schedule[1]
    acc0 = noisy_inputs[:, :h * w].transpose(1, 2).reshape(1, -1, h, w)  # the corrupted sum after scale 0, at 2x2

    expected = quantize(resize_area(features.float() - resize_up(acc0, tuple(features.shape[-2:])), (h, w)))[1]
    assert torch.equal(noisy_bits[1], expected)


def test_text_from_token_embeddings_matches_prompts_and_has_gradients(tiny):
    ids, mask = tiny.tokenize(["a cat", "a much longer prompt"])
    embeds = tiny.token_embeddings()(ids).detach().requires_grad_(True)
    ctx = tiny.encode_text(input_embeds=embeds, attention_mask=mask)
    ref = tiny.encode_text(["a cat", "a much longer prompt"])
    assert torch.allclose(ctx.tokens, ref.tokens, atol=1e-5) and torch.equal(ctx.mask, ref.mask)
    targets = tiny.image_to_targets(torch.zeros(2, 3, 128, 128))
    logits = tiny.teacher_forcing_logits(ctx, targets)
    loss = tiny.teacher_forcing_loss(logits, targets, scale_weights=[1] * 3 + [0] * 4)
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def test_generation_is_deterministic_and_rows_are_independent(tiny):
    kw = dict(cfg=3.0, tau=1.0, top_p=0.9, progress=False)
    a = tiny.generate(["a cat", "a dog"], seed=7, **kw)
    b = tiny.generate(["a cat", "a dog"], seed=7, **kw)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    c = tiny.generate(["a cat", "a dog"], seed=8, **kw)
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].size == (128, 128)
    kw.pop("progress")
    pair = tiny.generate_codes(["a cat", "a dog"], seed=7, **kw).codes
    alone = tiny.generate_codes(["a dog"], seed=[8], **kw).codes  # row 1 of the pair used seed 7 + 1
    assert torch.equal(alone[0], pair[1])


def test_kv_cache_generation_equals_teacher_forcing(tiny):
    logits = []
    out = tiny.generate_codes(["a red cat", "blue"], cfg=1.0, seed=3, step_hooks=[lambda c: logits.append(c.logits)])
    schedule = tiny.scale_schedule()
    acc, inputs = 0, []
    for si, (h, w) in enumerate(schedule):
        acc = acc + resize_up(bits_to_codes(out.labels[si], h, w), schedule[-1])
        if si + 1 < len(schedule):
            inputs.append(resize_up(acc, schedule[si + 1]).flatten(2).transpose(1, 2))
    targets = ScaleTargets(out.labels, torch.cat(inputs, 1), schedule)
    with torch.no_grad():
        forced = tiny.teacher_forcing_logits(tiny.encode_text(["a red cat", "blue"]), targets)
    for step, (a, b) in enumerate(zip(logits, forced)):
        assert torch.allclose(a, b, atol=1e-4), step
    assert torch.allclose(out.codes, acc)


def test_attention_hooks_see_every_call_and_edits_stay_out_of_the_cache(tiny):
    calls = []

    def spy(call: AttentionCall):
        calls.append((call.step, call.block, tuple(call.q.shape), tuple(call.k.shape), call.paths, call.cfg_half))

    kw = dict(cfg=2.0, seed=1, paths=["p0", "p1"])
    plain = tiny.generate_codes(["a", "b"], **kw).codes
    spied = tiny.generate_codes(["a", "b"], hooks=[spy], **kw).codes
    assert torch.equal(plain, spied)
    assert len(calls) == 7 * 4 and calls[0][4] == ["p0", "p1", "p0", "p1"]
    assert calls[0][5] == ["cond", "cond", "uncond", "uncond"]
    assert calls[-1][2] == (4, 4, 256, 16) and calls[-1][3] == (4, 4, 521, 16)

    # extra keys visible to no row change nothing; visible ones do
    def hidden(call):
        e = torch.randn_like(call.k)
        return AttentionEdit(extra_k=e, extra_v=e, extra_mask=torch.zeros(e.shape[0], e.shape[2], dtype=torch.bool))

    def shown(call):
        e = torch.randn_like(call.k) if call.step == 1 else None
        return AttentionEdit(extra_k=e, extra_v=e) if e is not None else None

    assert torch.allclose(tiny.generate_codes(["a", "b"], hooks=[hidden], **kw).codes, plain)
    assert not torch.equal(tiny.generate_codes(["a", "b"], hooks=[shown], **kw).codes, plain)

    # a hook replacing k/v does not write into the cache
    cache = KVCache(1, 1, 2, 8, 4, torch.float32, "cpu")
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    ctx = AttentionContext(step=0, cache=cache, hooks=[lambda c: AttentionEdit(k=torch.zeros_like(c.k))],
                           paths=[""], cfg_half=["cond"])
    ctx.attend(0, q, k, v)
    assert torch.equal(cache.k[0][:, :, :3], k)


def test_step_hooks_override_labels_and_drop_rows(tiny):
    targets = tiny.image_to_targets(_image(tiny))

    def force_first(call: StepCall):
        labels = call.labels.clone()
        labels[0] = targets.targets[call.step][0]
        return StepEdit(labels=labels)

    out = tiny.generate_codes(["a", "b"], cfg=3.0, seed=0, step_hooks=[force_first])
    assert torch.allclose(out.codes[0], accumulate(targets.targets, targets.schedule)[0])

    def drop_aux(call: StepCall):
        return StepEdit(drop_paths=["aux"]) if call.step == 2 else None

    kw = dict(cfg=3.0, seed=0, paths=["aux", "main"], progress=False)
    full = tiny.generate(["a", "b"], output_paths=["main"], **kw)  # decodes the "main" row only
    dropped = tiny.generate(["a", "b"], step_hooks=[drop_aux], **kw)
    assert full[0] is None and dropped[0] is None
    assert dropped[1].tobytes() == full[1].tobytes()


def test_sample_bits_follows_top_k_and_top_p():
    logits = torch.tensor([[[[0.0, 5.0], [0.0, 0.1], [3.0, 0.0]]]])  # p(1) = 0.993, 0.525, 0.047
    noise = torch.tensor([[[0.999, 0.5, 0.01]]])
    assert sample_bits(logits, noise).tolist() == [[[0, 1, 1]]]
    assert sample_bits(logits, noise, top_p=0.9).tolist() == [[[1, 1, 0]]]
    assert sample_bits(logits, noise, top_k=1).tolist() == [[[1, 1, 0]]]
