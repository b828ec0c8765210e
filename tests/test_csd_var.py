"""CSD-VAR on the tiny scale-wise backbones: what trains, scale groups, SVD, K-V memory, files, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE, ROOT, fit_on

from cstoolkit import Decomposer, Decomposition
from cstoolkit.errors import UserError
from cstoolkit.methods import csd_var
from cstoolkit.methods.csd_var import (
    CSDVAR,
    content_loss,
    load_subconcepts,
    rectify,
    scale_groups,
    style_loss,
    style_word_kept,
    subconcept_projector,
    subconcept_projectors,
    variation_projectors,
    variation_prompts,
)
from cstoolkit.registry import backbones as registered_backbones
from cstoolkit.runtime import TrainLoop

RECIPE = ROOT / "recipes" / "csd_var.yaml"
SCALEWISE = [n for n in ("infinity", "switti") if n in registered_backbones()]


def recipe(tmp_path: Path, backbone: str = "infinity", **params) -> dict:
    return {
        "method": "csd_var",
        "backbone": {"name": backbone, "preset": "tiny"},
        "inputs": {"image": str(EXAMPLE), "content": "balloon", "style": "flat illustration"},
        "params": {"steps": 4, **params},
        "generate": {"content": ["A <c> on the beach"], "style": ["A robot in <s> style"],
                     "both": ["A <c> in <s> style"], "num_images": 1},
        "runtime": {"output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu", "seed": 0},
    }


@pytest.fixture(scope="module")
def infinity(single_thread):
    from cstoolkit.backbones.infinity import InfinityBackbone, InfinityConfig

    bb = InfinityBackbone.from_config(InfinityConfig(preset="tiny"))
    bb.freeze()
    return bb


# ------------------------------------------------------------------------------ pure functions
def test_scale_groups_follow_the_paper_and_scale_with_the_schedule():
    assert scale_groups(10) == ([0, 1, 2], list(range(3, 10)))  # Switti-512: paper's groups
    assert scale_groups(13) == ([0, 1, 2, 3], list(range(4, 13)))  # Infinity-2B 1024²
    assert scale_groups(7) == ([0, 1], list(range(2, 7)))  # tiny Infinity
    assert scale_groups(7, style=[0], content=[5, 6]) == ([0], [5, 6])
    with pytest.raises(UserError, match="params.style_scales"):
        scale_groups(7, style=[9])


def test_eq8_eq9_weights_scale_groups():
    schedule = [(1, 1), (2, 2), (3, 3), (4, 4)]
    losses = {k: torch.tensor(float(k + 1)) for k in range(4)}
    # content group {2, 3}: token mean (9 * 3 + 16 * 4) / 25
    assert content_loss(losses, schedule, [2, 3]).item() == pytest.approx((9 * 3 + 16 * 4) / 25)
    style = (1 * 1 + 4 * 2) / 5
    assert style_loss(losses, schedule, [0, 1], [2, 3], 0.0).item() == pytest.approx(style)
    assert style_loss(losses, schedule, [0, 1], [2, 3], 0.1).item() == pytest.approx(style + 0.1 * 91 / 25)


def test_svd_projector_has_rank_r_and_rectified_style_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(40, 64, generator=g)
    p = subconcept_projector(e, 10)
    assert torch.allclose(p, p.T, atol=1e-5)
    assert torch.allclose(p @ p, p, atol=1e-5)  # a projector
    assert torch.linalg.matrix_rank(p).item() == 10
    assert p.trace().item() == pytest.approx(10, abs=1e-4)
    e_s = torch.randn(4, 64, generator=g)
    rect = rectify(e_s, p)
    _, _, vt = torch.linalg.svd(e.double(), full_matrices=False)
    assert (rect.double() @ vt[:10].T).abs().max().item() < 1e-4  # orthogonal to the sub-concept span
    assert not torch.allclose(rect, e_s)


def test_style_word_kept_measures_what_rectification_removes(infinity):
    own = subconcept_projectors(infinity, "watercolor", 10, None)  # a "content" subspace holding the word itself
    assert style_word_kept(infinity, "watercolor", own)["t5"] < 0.3  # generic templates: "a {} ..."
    assert style_word_kept(infinity, "watercolor", {}) == {}  # svd off: nothing to measure
    width = infinity.text_encoders()["t5"]
    assert style_word_kept(infinity, "watercolor", {"t5": torch.zeros(width, width)})["t5"] == pytest.approx(1.0)


def test_rectification_that_removes_the_style_word_is_warned(tmp_path, infinity, caplog):
    sub = tmp_path / "sub.yaml"
    sub.write_text("balloon: [flat illustration, a flat illustration, flat illustrations]\n")
    with caplog.at_level("WARNING", logger="cstoolkit.methods.csd_var"):
        fit_on(recipe(tmp_path, steps=1, kv_memory=False, svd_mode="embedding", subconcepts_file=str(sub)), infinity)
    assert "SVD rectification keeps only" in caplog.text and "params.svd_rank" in caplog.text


def test_subconcepts_builtin_fallback_and_user_file(tmp_path):
    dog = load_subconcepts("dog")
    assert "golden retriever" in dog and len(dog) > 10
    generic = load_subconcepts("zorblax")
    assert len(generic) >= 20 and all("zorblax" in s for s in generic)
    f = tmp_path / "sub.yaml"
    f.write_text("balloon: [hot air balloon, party balloon, blimp]\n")
    assert load_subconcepts("balloon", str(f)) == ["hot air balloon", "party balloon", "blimp"]
    lines = tmp_path / "sub.txt"
    lines.write_text("red kite\nbox kite\n\n")
    assert load_subconcepts("kite", str(lines)) == ["red kite", "box kite"]
    with pytest.raises(UserError, match="subconcepts_file"):
        load_subconcepts("cat", str(f))


# ------------------------------------------------------------------------------ fit on tiny Infinity
def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_trains_only_tokens_and_memories(tmp_path, infinity):
    before = _snapshot(infinity)
    dec = fit_on(recipe(tmp_path), infinity)
    after = infinity.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen backbone bit-identical
    assert not any(p.requires_grad for p in infinity.parameters())
    width = infinity.text_encoders()["t5"]
    assert set(dec.files) == {"content/learned_embeds.safetensors", "style/learned_embeds.safetensors",
                              "content/kv_memory.safetensors", "style/kv_memory.safetensors",
                              "style/svd_basis.safetensors"}
    for role in ("content", "style"):
        assert list(dec.files[f"{role}/learned_embeds.safetensors"]) == ["t5"]
        assert dec.files[f"{role}/learned_embeds.safetensors"]["t5"].shape == (4, width)
        mem = dec.files[f"{role}/kv_memory.safetensors"]
        c = infinity.transformer.cfg.width
        assert set(mem) == {"block.0.k", "block.0.v"} and mem["block.0.k"].shape == (1, c)
    # both memories trained (they start as uniform draws in ±sqrt(6 / (3 L + C)) from the run's generator seed + 7)
    from cstoolkit.methods.csd_var import KVMemory

    total = sum(h * w for h, w in infinity.scale_schedule())
    g = torch.Generator().manual_seed(7)
    init = {(r, kind): KVMemory.xavier(1, c, g, torch.device("cpu"), total).detach()
            for r in ("content", "style") for kind in ("k", "v")}
    for (role, kind), t in init.items():
        assert not torch.equal(dec.files[f"{role}/kv_memory.safetensors"][f"block.0.{kind}"], t), (role, kind)
    assert dec.file_metadata["content/kv_memory.safetensors"]["first_scale"] == "2"  # content group start (7 scales)
    assert dec.file_metadata["style/kv_memory.safetensors"]["first_scale"] == "0"
    # the saved basis is P = V_rᵀ V_r of the text features of the generated variation prompts of "balloon"
    p = variation_projectors(infinity, variation_prompts("balloon"), 10)["t5"]
    assert torch.allclose(dec.files["style/svd_basis.safetensors"]["t5"], p, atol=1e-5)
    assert dec.meta["svd_mode"] == "hidden" and "200 generated variation prompts" in dec.meta["svd_source"]


def test_embedding_mode_rectifies_the_saved_style_vectors(tmp_path, infinity):
    dec = fit_on(recipe(tmp_path, steps=2, kv_memory=False, svd_mode="embedding"), infinity)
    assert "style/svd_basis.safetensors" not in dec.files
    p = subconcept_projectors(infinity, "balloon", 10, None)["t5"]
    e_s = dec.files["style/learned_embeds.safetensors"]["t5"]
    assert (e_s @ p).abs().max().item() < 1e-4  # orthogonal to the sub-concept subspace of "balloon"


def test_alternating_steps_read_the_right_prompts_and_scales(tmp_path, infinity, monkeypatch):
    seen_prompts: list[list[str]] = []
    seen_scales: list[list[int]] = []
    encode = type(infinity).encode_text
    per_scale = csd_var.per_scale_losses

    def spy_encode(self, prompts=None, **kw):
        seen_prompts.append(list(prompts))
        return encode(self, prompts, **kw)

    def spy_scales(backbone, logits, targets, scales):
        seen_scales.append(list(scales))
        return per_scale(backbone, logits, targets, scales)

    monkeypatch.setattr(type(infinity), "encode_text", spy_encode)
    monkeypatch.setattr(csd_var, "per_scale_losses", spy_scales)
    fit_on(recipe(tmp_path, steps=2, kv_memory=False, caption_dropout=0.0), infinity)
    full = "A balloon <c> in flat illustration <s> style"  # official captions.csv: words beside the placeholders
    # step 0: style step (style prompt as context, every scale: style group + λ content group)
    # step 1: content step (content prompt, only the content scales 2..6 of the 7-scale schedule)
    assert seen_prompts[-4:] == [["A balloon in flat illustration <s> style"], [full],
                                 ["A balloon <c> in flat illustration style"], [full]]
    assert seen_scales == [list(range(7)), [2, 3, 4, 5, 6]]


def _fit_tokens(tmp_path, infinity, **params):
    """Vectors before and after a fit (initial values: the words' embeddings)."""
    dec = fit_on(recipe(tmp_path, **params), infinity)
    emb = infinity.word_embeddings
    init_c = emb("balloon")["t5"][:1].repeat(4, 1)  # official: first sub-token of the one word, repeated
    flat, illustration = emb("flat")["t5"][0], emb("illustration")["t5"][0]
    init_s = torch.stack([flat, illustration, flat, illustration])  # one first sub-token a word (cycled)
    return dec, init_c, init_s


def test_init_takes_the_first_subtoken_of_each_word(infinity):
    from cstoolkit.methods._learned_tokens import init_vectors

    ids = infinity.text.word_ids("balloon")
    table = infinity.token_embeddings().weight
    one = init_vectors(infinity, "balloon", 4, "inputs.content")["t5"]
    assert len(ids) > 1 and torch.equal(one, table[ids[0]][None].repeat(4, 1).float())
    four = init_vectors(infinity, "rainbow_flowing_smoke_wave", 4, "inputs.style")["t5"]  # official folder words
    firsts = [infinity.text.word_ids(w)[0] for w in ("rainbow", "flowing", "smoke", "wave")]
    assert torch.equal(four, table[firsts].float())
    mean = init_vectors(infinity, "balloon", 4, "inputs.content", mode="mean")["t5"]
    assert torch.allclose(mean, table[ids].float().mean(0, keepdim=True).repeat(4, 1))


def test_one_style_step_moves_only_the_style_token_with_per_role_adam(tmp_path, infinity):
    dec, init_c, init_s = _fit_tokens(tmp_path, infinity, steps=1, svd=False, optimizer="adam_per_role")
    assert torch.equal(dec.files["content/learned_embeds.safetensors"]["t5"], init_c)
    assert not torch.equal(dec.files["style/learned_embeds.safetensors"]["t5"], init_s)


def test_official_optimiser_is_one_adamw_over_everything_every_step(tmp_path, infinity, monkeypatch):
    made = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        opt = real(params, **kw)
        made.append(opt)
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    dec, init_c, init_s = _fit_tokens(tmp_path, infinity, steps=1, svd=False, caption_dropout=0.0)
    (opt,) = made
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.05
    assert sum(p.numel() for p in group["params"]) == 2 * 4 * 64 + 4 * infinity.transformer.cfg.width
    # a style step moves the content token too (gradient through the full prompt, one optimiser)
    assert not torch.equal(dec.files["content/learned_embeds.safetensors"]["t5"], init_c)
    assert not torch.equal(dec.files["style/learned_embeds.safetensors"]["t5"], init_s)


def test_official_lr_schedule():
    from cstoolkit.methods._learned_tokens import warmup_lr

    assert warmup_lr(0, 1e-2, 50) == pytest.approx(1e-2 * 0.005)  # wp0
    assert warmup_lr(25, 1e-2, 50) == pytest.approx(1e-2 * (0.005 + 0.995 * 0.5))
    assert warmup_lr(50, 1e-2, 50, total=200) == warmup_lr(199, 1e-2, 50, total=200) == 1e-2  # wpe 1: constant
    # lin0 with an end ratio: flat for 5 % of the rest, then linear to the end ratio at the last step
    assert warmup_lr(55, 1.0, 50, end_ratio=0.1, total=151) == 1.0
    assert warmup_lr(150, 1.0, 50, end_ratio=0.1, total=151) == pytest.approx(0.1)


def test_flips_and_caption_dropout_draw_from_the_run_generator(tmp_path, infinity, monkeypatch):
    seen_prompts: list[str] = []
    seen_targets: list[int] = []
    encode = type(infinity).encode_text
    tf = type(infinity).teacher_forcing_logits

    def spy_encode(self, prompts=None, **kw):
        seen_prompts.extend(prompts)
        return encode(self, prompts, **kw)

    def spy_tf(self, text, targets, **kw):
        seen_targets.append(id(targets))
        return tf(self, text, targets, **kw)

    monkeypatch.setattr(type(infinity), "encode_text", spy_encode)
    monkeypatch.setattr(type(infinity), "teacher_forcing_logits", spy_tf)
    fit_on(recipe(tmp_path, steps=16, kv_memory=False, svd=False, caption_dropout=0.5), infinity)
    assert "" in seen_prompts  # the full prompt dropped to "" on some steps (official uncond_proba)
    assert len(set(seen_targets)) == 2  # the image and its mirror image


def test_ablation_switches(tmp_path, infinity):
    # without alternation (joint TI) one step moves both tokens
    dec, init_c, init_s = _fit_tokens(tmp_path / "a", infinity, steps=1, alternating=False, svd=False)
    assert not torch.equal(dec.files["content/learned_embeds.safetensors"]["t5"], init_c)
    assert not torch.equal(dec.files["style/learned_embeds.safetensors"]["t5"], init_s)
    # without K-V memory: no memory files; without SVD: the style embedding keeps its content component
    dec = fit_on(recipe(tmp_path / "b", steps=2, kv_memory=False, svd=False), infinity)
    assert not any("kv_memory" in rel for rel in dec.files)
    assert dec.meta["svd_rank"] == 0
    p = subconcept_projectors(infinity, "balloon", 10, None)["t5"]
    assert (dec.files["style/learned_embeds.safetensors"]["t5"] @ p).abs().max().item() > 1e-3


def test_joint_ablation_without_memory_survives_a_dropped_caption(tmp_path, infinity):
    """alternating: false + kv_memory: false: a step whose caption is dropped reads no learned tensor (its loss
    has no gradient); it must not crash and must leave the tokens where they were."""
    dec, init_c, init_s = _fit_tokens(tmp_path, infinity, steps=3, alternating=False, kv_memory=False, svd=False,
                                      caption_dropout=1.0)
    assert torch.equal(dec.files["content/learned_embeds.safetensors"]["t5"], init_c)
    assert torch.equal(dec.files["style/learned_embeds.safetensors"]["t5"], init_s)


def test_save_load_round_trip_and_generation(tmp_path, infinity):
    dec = fit_on(recipe(tmp_path), infinity)
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec", backbone=infinity)
    from safetensors.torch import load_file

    for rel, tensors in dec.files.items():
        disk = load_file(str(tmp_path / "dec" / rel))
        for k, v in tensors.items():
            assert torch.equal(v, loaded.files[rel][k]) and torch.equal(v, disk[k])
    method = CSDVAR(copy.deepcopy(dec.method_impl.config))
    a = method.generate(infinity, dec, ["A <c> in <s> style"], "both", seed=3, progress=False)[0][0]
    b = method.generate(infinity, loaded, ["A <c> in <s> style"], "both", seed=3, progress=False)[0][0]
    assert a.tobytes() == b.tobytes()
    c = method.generate(infinity, loaded, ["A <c> on the beach"], "content", seed=3, progress=False)[0][0]
    assert c.size == a.size
    with pytest.raises(UserError, match="<s>"):
        method.generate(infinity, loaded, ["A robot"], "style", progress=False)


def test_seeded_fits_are_identical(tmp_path, infinity):
    a = fit_on(recipe(tmp_path / "a", steps=2), infinity)
    b = fit_on(recipe(tmp_path / "b", steps=2), infinity)
    for rel, tensors in a.files.items():
        for k, v in tensors.items():
            assert torch.equal(v, b.files[rel][k]), (rel, k)


def test_resume_is_bit_identical(tmp_path, monkeypatch, single_thread):
    full = recipe(tmp_path / "full")
    full["runtime"]["checkpoint_every"] = 2
    reference = Decomposer.from_recipe(full).fit()
    part = recipe(tmp_path / "part")
    part["runtime"]["checkpoint_every"] = 2
    original = TrainLoop.log

    def crash(self, **metrics):
        original(self, **metrics)
        if self._step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLoop, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        Decomposer.from_recipe(part).fit()
    monkeypatch.setattr(TrainLoop, "log", original)
    resumed = Decomposer.from_recipe(part, resume=True).fit()
    for rel, tensors in reference.files.items():
        for k, v in tensors.items():
            assert torch.equal(v, resumed.files[rel][k]), (rel, k)


@pytest.mark.parametrize("name", SCALEWISE)
def test_shipped_recipe_runs_on_each_scalewise_backbone(tmp_path, name, single_thread):
    overrides = [f"backbone.name={name}", f"runtime.output_dir={tmp_path / 'run'}", "runtime.progress=false",
                 "params.steps=2", "generate.num_images=1"]
    dec = Decomposer.from_recipe(str(RECIPE), overrides=overrides).fit()
    assert set(dec.files) >= {"content/learned_embeds.safetensors", "style/learned_embeds.safetensors"}
    widths = dec.backbone.text_encoders()
    assert set(dec.files["content/learned_embeds.safetensors"]) == set(widths)
    images = dec.generate("A <c> in <s> style", use="both", progress=False)
    assert len(images) == 1 and images[0].size[0] > 0


def test_kv_memory_visibility_in_teacher_forcing_and_generation():
    from cstoolkit.backbone import AttentionCall
    from cstoolkit.methods.csd_var import KVMemory

    assert KVMemory.init_bound(1, 1536, 2240) == pytest.approx((6 / (3 * 2240 + 1536)) ** 0.5)  # official, Switti-512
    g = torch.Generator().manual_seed(0)
    k = {f"{r}.block.0": KVMemory.xavier(1, 8, g, torch.device("cpu")) for r in ("style", "content")}
    v = {f"{r}.block.0": KVMemory.xavier(1, 8, g, torch.device("cpu")) for r in ("style", "content")}
    assert all(t.abs().max() <= (6 / 9) ** 0.5 for t in k.values())  # Xavier bound sqrt(6 / (1 + 8))
    mem = KVMemory(k, v, {"style": 0, "content": 2}, [0], heads=2)
    q = torch.zeros(3, 2, 5, 4)
    scales = torch.tensor([0, 1, 1, 2, 2])
    edit = mem(AttentionCall(step=-1, block=0, q=q, k=q, v=q, paths=[""] * 3, cfg_half=["cond"] * 3,
                             token_scales=scales))
    assert edit.extra_k.shape == (3, 2, 2, 4)  # style + content memory, split into 2 heads of 4
    assert edit.extra_mask[0, :, 0].tolist() == [True] * 5  # style memory: every scale
    assert edit.extra_mask[0, :, 1].tolist() == [False, False, False, True, True]  # content: scales >= 2
    assert torch.equal(edit.extra_k[0, :, 0], k["style.block.0"].view(2, 4))
    assert mem(AttentionCall(step=-1, block=1, q=q, k=q, v=q, paths=[], cfg_half=[], token_scales=scales)) is None
    early = mem(AttentionCall(step=1, block=0, q=q[:, :, :1], k=q, v=q, paths=[], cfg_half=[]))
    assert early.extra_k.shape[2] == 1  # generation at scale 1: only the style memory
    late = mem(AttentionCall(step=2, block=0, q=q[:, :, :1], k=q, v=q, paths=[], cfg_half=[]))
    assert late.extra_k.shape[2] == 2


def test_style_context_switches_the_early_scales(tmp_path, infinity):
    from cstoolkit.methods.csd_var import CSDVARGenerate

    dec = fit_on(recipe(tmp_path, steps=1, kv_memory=False), infinity)
    method = dec.method_impl
    plain = method.generate(infinity, dec, ["A <c> in <s> style"], "both", seed=0, progress=False)[0][0]
    same = method.generate(infinity, dec, ["A <c> in <s> style"], "both", seed=0, progress=False,
                           options=CSDVARGenerate(style_context="A <c> in <s> style"))[0][0]
    other = method.generate(infinity, dec, ["A <c> in <s> style"], "both", seed=0, progress=False,
                            options=CSDVARGenerate(style_context="A painting in <s> style", style_scale_end=3))[0][0]
    assert plain.tobytes() == same.tobytes()  # the prompt itself as style context changes nothing
    assert plain.tobytes() != other.tobytes()


def test_cross_combination_with_a_textual_inversion_style(tmp_path, single_thread):
    from cstoolkit.combine import combine

    content = Decomposer.from_recipe(recipe(tmp_path / "c", steps=1)).fit()
    content.save(tmp_path / "c" / "dec")
    ti = recipe(tmp_path / "s", steps=1)
    ti["method"] = "textual_inversion"
    ti["params"] = {"steps": 1, "learn": ["style"]}
    ti["generate"] = {"style": ["A cat in <s> style"], "num_images": 1}
    style = Decomposer.from_recipe(ti).fit()
    style.save(tmp_path / "s" / "dec")
    joined = combine(tmp_path / "c" / "dec", tmp_path / "s" / "dec", device="cpu")
    assert torch.equal(joined.files["style/learned_embeds.safetensors"]["t5"],
                       style.files["style/learned_embeds.safetensors"]["t5"])
    assert "content/kv_memory.safetensors" in joined.files and "style/kv_memory.safetensors" not in joined.files
    images = joined.generate("A <c> in <s> style", use="both", progress=False)
    assert len(images) == 1


def test_variation_prompts_are_200_distinct_and_name_the_content():
    prompts = variation_prompts("heart")
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert all("heart" in p for p in prompts) and prompts[:2] == ["a small heart", "a large heart"]
    from cstoolkit.world.generator import STYLES

    assert not any(s in p for p in prompts for s in STYLES)  # no style word of the world in the basis


def test_hidden_rectification_edits_only_the_style_positions(infinity):
    from cstoolkit.methods.csd_var import style_hidden_edit

    width = infinity.text_encoders()["t5"]
    vec = {"t5": torch.randn(2, width)}
    learned = {"<c>": vec, "<s>": vec}
    p = variation_projectors(infinity, variation_prompts("balloon"), 10)
    plain = infinity.encode_text(["a <c> in <s> style"], learned=learned).tokens[0]
    edited = infinity.encode_text(["a <c> in <s> style"], learned=learned, hidden_edit=style_hidden_edit(p)).tokens[0]
    slots: list = []
    infinity.text.embed_with_learned(["a <c> in <s> style"], {k: v["t5"] for k, v in learned.items()}, slots)
    style_pos = [i for i, ph in slots[0] if ph == "<s>"]
    others = [i for i in range(plain.shape[0]) if i not in style_pos]
    assert torch.equal(plain[others], edited[others])  # <c> and the words untouched
    assert torch.allclose(edited[style_pos], plain[style_pos] - plain[style_pos] @ p["t5"], atol=1e-5)
    assert (edited[style_pos] @ p["t5"]).abs().max() < 1e-4  # orthogonal to the content subspace


def test_generation_writes_the_words_before_the_placeholders(tmp_path, infinity, monkeypatch):
    from cstoolkit.methods.csd_var import CSDVARGenerate, with_words

    assert with_words("a <c> in <s> style", {"<c>": "heart", "<s>": "neon"}) == "a heart <c> in neon <s> style"
    dec = fit_on(recipe(tmp_path, steps=1, kv_memory=False), infinity)
    seen: list[str] = []
    encode = type(infinity).encode_text

    def spy(self, prompts=None, **kw):
        seen.extend(prompts)
        assert "hidden_edit" in kw  # the saved basis rectifies <s> at sampling too (official inference)
        return encode(self, prompts, **kw)

    monkeypatch.setattr(type(infinity), "encode_text", spy)
    dec.method_impl.generate(infinity, dec, ["A <c> in <s> style"], "both", progress=False)
    assert seen == ["A balloon <c> in flat illustration <s> style"]
    seen.clear()
    dec.method_impl.generate(infinity, dec, ["A <c> in <s> style"], "both", progress=False,
                             options=CSDVARGenerate(words=False))
    assert seen == ["A <c> in <s> style"]


@pytest.mark.skipif("switti" not in SCALEWISE, reason="no switti backbone")
def test_switti_hidden_edit_touches_only_style_slots_of_both_clips_and_not_the_pooled(single_thread):
    from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig
    from cstoolkit.methods.csd_var import style_hidden_edit

    bb = SwittiBackbone.from_config(SwittiConfig(preset="tiny"))
    bb.freeze()
    widths = bb.text_encoders()
    feats = bb.text_features(variation_prompts("balloon", 20))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {k: (20, w) for k, w in widths.items()}
    p = {k: subconcept_projector(f, 10) for k, f in feats.items()}
    learned = {"<c>": {k: torch.randn(2, w) for k, w in widths.items()},
               "<s>": {k: torch.randn(2, w) for k, w in widths.items()}}
    plain = bb.encode_text(["a <c> in <s> style"], learned=learned)
    edited = bb.encode_text(["a <c> in <s> style"], learned=learned, hidden_edit=style_hidden_edit(p))
    assert torch.equal(plain.pooled, edited.pooled)  # pooled before the edit (official models/clip.py)
    changed = (plain.tokens[0] != edited.tokens[0]).any(-1).nonzero().flatten().tolist()
    assert len(changed) == 2  # the two <s> slots, in both encoders' halves of the context
    cl = widths["clip_l"]
    for key, part in (("clip_l", slice(0, cl)), ("clip_g", slice(cl, None))):
        h = plain.tokens[0, changed, part]
        assert torch.allclose(edited.tokens[0, changed, part], h - h @ p[key], atol=1e-5)


def test_the_log_says_where_the_svd_basis_came_from(tmp_path, infinity, caplog):
    var = tmp_path / "variation_content.txt"
    var.write_text("A Classic Balloon\nA Striped Balloon\nA Giant Balloon\n")
    with caplog.at_level("INFO", logger="cstoolkit.notes"):
        fit_on(recipe(tmp_path / "a", steps=1, kv_memory=False), infinity)
        fit_on(recipe(tmp_path / "b", steps=1, kv_memory=False, variations_file=str(var)), infinity)
    assert "SVD basis (rank 10, hidden mode): 200 generated variation prompts of 'balloon'" in caplog.text
    assert f"3 variation prompts from {var}" in caplog.text
