"""The synthetic world: generator, oracles (shipped weights), CLI, world bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cstoolkit.cli import main
from cstoolkit.world.generator import (
    CONTENTS,
    HELD_OUT,
    STYLES,
    caption,
    render,
    render_array,
    sample_batch,
    train_pairs,
)


def test_generator_api_and_split():
    assert len(CONTENTS) >= 10 and len(STYLES) >= 10
    assert len(set(CONTENTS)) == len(CONTENTS) and len(set(STYLES)) == len(STYLES)
    # held-out pairs cover every content and every style once and never appear in training
    assert sorted(c for c, _ in HELD_OUT) == sorted(CONTENTS)
    assert sorted(s for _, s in HELD_OUT) == sorted(STYLES)
    assert not set(HELD_OUT) & set(train_pairs())
    assert len(train_pairs()) + len(HELD_OUT) == len(CONTENTS) * len(STYLES)
    assert caption("star", "neon") == "a star in neon style"
    assert caption("star", "neon", "content") == "a star"
    assert caption("star", "neon", "style") == "an image in neon style"


def test_render_deterministic_and_distinct():
    a = np.asarray(render("house", "striped", seed=3, size=64))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(render("house", "striped", seed=3, size=64)))
    assert not np.array_equal(a, np.asarray(render("house", "striped", seed=4, size=64)))
    assert render("fish", "neon", size=128).size == (128, 128)
    # the same instance keeps its identity details across styles, another instance differs
    from cstoolkit.world.generator import content_mask

    m1 = content_mask("house", seed=1, size=64, instance=7)
    assert np.array_equal(m1, content_mask("house", seed=1, size=64, instance=7))
    assert np.abs(m1 - content_mask("house", seed=1, size=64, instance=8)).mean() > 0.005
    # styles of one object differ clearly from each other, contents in one style too
    imgs = {s: render_array("star", s, seed=0, size=64) for s in STYLES}
    for i, s in enumerate(STYLES):
        for t in STYLES[i + 1:]:
            assert np.abs(imgs[s] - imgs[t]).mean() > 0.05, (s, t)
    masks = {c: content_mask(c, seed=0, size=64) for c in CONTENTS}
    for i, c in enumerate(CONTENTS):
        for d in CONTENTS[i + 1:]:
            assert np.abs(masks[c] - masks[d]).mean() > 0.05, (c, d)


def test_sample_batch():
    x, caps, ci, si = sample_batch(12, seed=0, size=32, kinds=("both", "content"))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert len(caps) == 12 and ci.shape == si.shape == (12,)
    for cap, c, s in zip(caps, ci.tolist(), si.tolist()):
        assert cap in (caption(CONTENTS[c], STYLES[s]), caption(CONTENTS[c], STYLES[s], "content"))
        assert (CONTENTS[c], STYLES[s]) not in HELD_OUT
    x2, caps2, _, _ = sample_batch(12, seed=0, size=32, kinds=("both", "content"))
    assert torch.equal(x, x2) and caps == caps2


def test_oracle_held_out_accuracy_and_invariance():
    from cstoolkit.world.oracle import load_oracle

    oracle = load_oracle()
    # a small held-out sample with fresh seeds (never used in training or in the shipped evaluation)
    images, cs, ss = [], [], []
    for k, (c, s) in enumerate(HELD_OUT):
        for j in range(3):
            images.append(render(c, s, seed=777_000 + 10 * k + j, size=(64, 96, 128)[j]))
            cs.append(c)
            ss.append(s)
    res = oracle.classify(images)
    content_acc = np.mean([r["content"] == c for r, c in zip(res, cs)])
    style_acc = np.mean([r["style"] == s for r, s in zip(res, ss)])
    assert content_acc >= 0.99 and style_acc >= 0.99, (content_acc, style_acc)
    # invariance: one object instance in every style -> one content answer; one style on every content
    for c in ("house", "fish"):
        got = {r["content"] for r in oracle.classify([render(c, s, seed=4242, size=64) for s in STYLES])}
        assert got == {c}
    for s in ("mosaic", "outline"):
        got = {r["style"] for r in oracle.classify([render(c, s, seed=4243, size=64) for c in CONTENTS])}
        assert got == {s}


def test_cli_render_classify(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["world", "render", "--content", "moon", "--style", "checkered", "--out", str(a)]) == 0
    assert main(["world", "render", "--content", "boat", "--style", "pixel art", "--size", "96", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["world", "classify", "--json", str(a), str(b)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["content"], x["style"]) for x in lines] == [("moon", "checkered"), ("boat", "pixel art")]
    assert all(0 < x["content_prob"] <= 1 and 0 < x["style_prob"] <= 1 for x in lines)


@pytest.mark.parametrize("args, where", [
    (["--content", "stra", "--style", "neon"], "--content: unknown content 'stra' (did you mean 'star'?)"),
    (["--content", "star", "--style", "van gogh"], "--style: unknown style 'van gogh'"),
])
def test_cli_unknown_names(tmp_path, capsys, args, where):
    out = tmp_path / "x.png"
    assert main(["world", "render", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cstoolkit: error: " + where) and err.count("\n") == 1
    assert not out.exists()


def test_cli_classify_missing_file(tmp_path, capsys):
    assert main(["world", "classify", str(tmp_path / "nope.png")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_world_bench_end_to_end(tmp_path, single_thread, monkeypatch):
    from PIL import Image

    from cstoolkit.world.bench import METRICS, world_bench

    monkeypatch.chdir(tmp_path)  # a relative --out (as a user types it) must not resolve against recipes/
    res = world_bench(["dreambooth_lora"], Path("b"), items=1, preset="tiny", steps=1, sample_steps=1,
                      num_images=1, progress=False)
    m = res.means["dreambooth_lora"]
    assert m["n"] == 1 and m["failed"] == 0
    for k in ("content_acc", "style_acc", "content_leak", "style_leak", "identity", "both_acc"):
        assert isinstance(m[k], float), k
        assert -1 <= m[k] <= 1
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(METRICS) <= set(data["methods"]["dreambooth_lora"])
    row = data["rows"][0]
    assert row["content_samples"] == len(STYLES) - 1 and row["style_samples"] == len(CONTENTS) - 1
    assert "| dreambooth_lora |" in (tmp_path / "b" / "table.md").read_text()
    assert Image.open(tmp_path / "b" / "plot.png").size[0] >= 200
    # a rerun skips the finished unit
    again = world_bench(["dreambooth_lora"], tmp_path / "b", items=1, preset="tiny", steps=1, sample_steps=1,
                        num_images=1, progress=False)
    assert again.rows[0].get("skipped") is True


def test_world_bench_errors(tmp_path, capsys):
    assert main(["world", "bench", "--methods", "nosuch", "--out", str(tmp_path / "o"), "--preset", "tiny"]) == 2
    assert "no recipe for 'nosuch'" in capsys.readouterr().err
    assert main(["world", "bench", "--methods", "dreambooth_lora", "--out", str(tmp_path / "o"),
                 "--preset", "nosuch"]) == 2
    assert "has no preset 'nosuch'" in capsys.readouterr().err


def _fake_run(run_dir, it, *, same_instance: bool):
    """A run folder whose samples are true renders: what a perfect decomposition would draw."""
    from cstoolkit.io import save_image, slugify
    from cstoolkit.world.bench import BOTH_PROMPT, content_prompt, style_prompt

    inst = it.instance if same_instance else it.instance + 50
    for s in STYLES:
        save_image(render(it.content, s, seed=it.seed, size=128, instance=inst),  # the input's pose
                   run_dir / "samples" / "content" / slugify(content_prompt(s)) / "0.png")
    for c in CONTENTS:
        save_image(render(c, it.style, seed=it.seed + 2, size=128),
                   run_dir / "samples" / "style" / slugify(style_prompt(c)) / "0.png")
    save_image(render(it.content, it.style, seed=it.seed + 3, size=128, instance=inst),
               run_dir / "samples" / "both" / slugify(BOTH_PROMPT) / "0.png")


def test_world_scorer_on_perfect_samples(tmp_path):
    """The scorer gives a perfect decomposition (true renders) full marks and no leak, and its identity
    gain prefers the item's own instance to another instance of the same class (same pose)."""
    from cstoolkit.bench import BenchItem
    from cstoolkit.world.bench import make_scorer, world_items

    items = world_items(2)
    score = make_scorer({it.name: it for it in items}, 128)
    for it in items:
        own, other = tmp_path / it.name / "own", tmp_path / it.name / "other"
        _fake_run(own, it, same_instance=True)
        _fake_run(other, it, same_instance=False)
        bi = BenchItem(it.name, [], it.content, it.style)
        a, b = score(own, bi), score(other, bi)
        assert a["content_acc"] >= 0.88 and a["style_acc"] >= 0.88 and a["both_acc"] == 1.0, a
        assert a["content_leak"] <= 0.12 and a["style_leak"] <= 0.12 and a["new_style"] >= 0.88, a
        assert a["identity"] > 0.8, a  # silhouette IoU with its own instance drawn in the asked style
        assert a["identity_gain"] > 0.02 and a["identity_gain"] > b["identity_gain"] + 0.02, (a, b)
        assert a["rejected"] == 0 and a["content_samples"] == len(STYLES) - 1 and a["both_samples"] == 1


def test_identity_gain_tells_the_own_instance_from_others_in_other_styles():
    """#17 item 4: on fresh renders of all 13 contents in other styles and new poses, identity_gain (v4)
    separates an item's own instance from another instance of its class with AUC >= 0.9, and better than
    v3 on the same renders (22 pairs here: v4 0.905, v3 0.837; over 5 draws of 117 pairs v4 0.923-0.945,
    docs/world.md)."""
    from cstoolkit.world.identity import identity_auc, identity_draw, identity_scores_v3

    items, styles = identity_draw(1), ("polka dot", "outline")
    rep = identity_auc(items, styles, seed0=404_000)
    assert rep["pairs"] == 2 * len(items) - sum(s0 in styles for _, s0, _, _ in items)
    old = identity_auc(items, styles, seed0=404_000, score_fn=lambda *a: identity_scores_v3(*a)[1])
    assert rep["auc"] >= 0.9 and rep["auc"] > old["auc"], (rep["auc"], old["auc"])


def test_identity_scorer_fits_the_pose_and_prefers_the_own_instance():
    """The v4 scorer recovers the generator's pose of a render, scores the own instance near 1 in any
    style (another instance lower, gain 0 for a typical other instance), and a blank image scores 0."""
    from cstoolkit.world.generator import pose_of, render_array
    from cstoolkit.world.identity import (
        OTHER_INSTANCES,
        fit_pose,
        foreground,
        gain_of,
        identity_references,
        identity_scores,
        instance_template,
    )

    assert gain_of([1.0, 0.6, 0.6]) == pytest.approx(1.0) and gain_of([0.6, 0.6, 0.6]) == pytest.approx(0.0)
    im = render_array("house", "striped", seed=31, size=128, instance=12)
    pose, fit = fit_pose(instance_template("house", 12, "striped", 5), foreground(im))
    ang, scale, x, y = pose_of("house", 31)
    assert abs(pose[0] - ang) <= 2 and abs(pose[1] / scale - 1) < 0.05, (pose, (ang, scale))
    assert abs(pose[2] - x) * 64 < 1 and abs(pose[3] - y) * 64 < 1 and fit > 0.85, (pose, (x, y), fit)
    for style in ("outline", "neon", "pixel art"):
        refs = identity_references("star", style, range(7, 8 + OTHER_INSTANCES), seed=3, size=128)
        own, gain = identity_scores(render_array("star", style, seed=44, instance=7), "star", style, 7, 3, refs)
        other, ogain = identity_scores(render_array("star", style, seed=44, instance=99), "star", style, 7, 3, refs)
        assert own > 0.85 and own > other and gain > 0.3 and gain > ogain, (style, own, other, gain, ogain)
    blank = np.ones((64, 64, 3), np.float32)
    assert identity_scores(blank, "star", "striped", 7, 3) == (0.0, 0.0)


def test_world_bench_recipes_per_backbone():
    """--backbones runs a method on each listed backbone it supports, with the preset and steps set."""
    from cstoolkit.world.bench import RECIPES_DIR, _method_recipes

    rec = _method_recipes(["textual_inversion", "unziplora"], ["sdxl", "infinity"], "tiny", 3, 2, RECIPES_DIR)
    # UnZipLoRA runs on the scale-wise backbones too (issue 20)
    assert list(rec) == ["textual_inversion-sdxl", "textual_inversion-infinity", "unziplora-sdxl", "unziplora-infinity"]
    assert rec["textual_inversion-infinity"]["backbone"] == {"name": "infinity", "preset": "tiny"}
    assert rec["unziplora-sdxl"]["params"]["steps"] == 3 and rec["unziplora-sdxl"]["generate"]["steps"] == 2
    # on another family a method takes its recipe for that family (recipes/unziplora-switti.yaml), named per backbone
    rec = _method_recipes(["unziplora", "csd_var"], ["switti", "infinity"], "world", None, None, RECIPES_DIR)
    assert list(rec) == ["unziplora-switti", "unziplora-infinity", "csd_var-switti", "csd_var-infinity"]
    assert rec["unziplora-infinity"]["params"]["scale_separation"] is True
    assert rec["unziplora-infinity"]["backbone"] == {"name": "infinity", "preset": "world"}
    one = _method_recipes(["unziplora"], ["infinity"], "world", None, None, RECIPES_DIR)
    assert list(one) == ["unziplora-infinity"]


def test_fit_loop_trains_averages_and_respects_a_zero_budget(tmp_path):
    """world.train.fit: the one training loop of every world trainer (tokenizers and generators)."""
    from cstoolkit.world.train import Log, fit

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    module = torch.nn.Linear(4, 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    log = Log(tmp_path, "t", every=1e9)

    def loss_fn(step: int):
        return torch.nn.functional.mse_loss(module(x), y), ""

    assert fit(module, loss_fn, seconds=0, lr=1e-2, warmup=1, log=log, tag="t").step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    start = float(loss_fn(0)[0])
    calls: list[int] = []
    clock = fit(module, loss_fn, seconds=0.3, lr=1e-2, warmup=1, log=log, tag="t", ema=0.9, after_step=calls.append)
    assert clock.step > 5 and calls == list(range(clock.step))
    assert float(loss_fn(0)[0]) < start  # the EMA weights copied in are trained ones
    assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_balanced_scale_weights_give_every_scale_the_same_share():
    from cstoolkit.world.train import balanced_scale_weights

    schedule = [(1, 1), (2, 2), (4, 4), (8, 8)]
    areas = [h * w for h, w in schedule]
    shares = [a / sum(areas) for a in areas]  # Switti's official loss: every token the same
    weights = balanced_scale_weights(schedule, shares)
    assert [round(w * s, 12) for w, s in zip(weights, shares)] == [0.25] * 4


def test_cli_train_bad_options_are_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["world", "train", "sdxl", "--init-from", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(["world", "train", "all", "--backbones", "sdxl,nosuch", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--backbones" in err and "nosuch" in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------ world bench v2 (issue 17)
def test_novel_concepts_are_drawn_and_unseen_by_every_backbone():
    """The novel contents/styles are drawn distinctly, and no backbone's training data names them."""
    from cstoolkit.world.generator import NOVEL_CONTENTS, NOVEL_HELD_OUT, NOVEL_STYLES, content_mask
    from cstoolkit.world.train import caption_table

    assert NOVEL_CONTENTS == ("kite", "key", "anchor") and NOVEL_STYLES == ("zigzag", "brick", "concentric")
    assert not set(NOVEL_CONTENTS) & set(CONTENTS) and not set(NOVEL_STYLES) & set(STYLES)
    words = {w for name in NOVEL_CONTENTS + NOVEL_STYLES for w in name.split()}
    assert all(c in CONTENTS and s in STYLES for c, s in train_pairs())
    captions, _ = caption_table()
    assert not [c for c in captions if words & set(c.split())]
    masks = {c: content_mask(c, seed=0, size=64) for c in CONTENTS + NOVEL_CONTENTS}
    for c in NOVEL_CONTENTS:
        for d in masks:
            assert d == c or np.abs(masks[c] - masks[d]).mean() > 0.05, (c, d)
        assert np.abs(content_mask(c, seed=1, size=64, instance=7)
                      - content_mask(c, seed=1, size=64, instance=8)).mean() > 0.005  # instance jitter
    imgs = {s: render_array("house", s, seed=0, size=64) for s in STYLES + NOVEL_STYLES}
    for s in NOVEL_STYLES:
        for t in imgs:
            assert t == s or np.abs(imgs[s] - imgs[t]).mean() > 0.05, (s, t)
    assert all(c in NOVEL_CONTENTS or s in NOVEL_STYLES for ps in NOVEL_HELD_OUT.values() for c, s in ps)


def test_world_list_names_the_novel_concepts(capsys):
    assert main(["world", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["novel_contents"] == ["kite", "key", "anchor"]
    assert data["novel_styles"] == ["zigzag", "brick", "concentric"]
    assert main(["world", "list"]) == 0
    assert "novel contents (no backbone saw them): kite, key, anchor" in capsys.readouterr().out


def test_oracle_rejects_non_objects_and_knows_novel_concepts():
    """Shipped oracle: noise, shuffled renders, smooth fields, blank images, bare textures are rejected
    (>= 95 %; the CI sample is small, so the floor here is 0.9 per kind); novel renders are named."""
    from cstoolkit.world.generator import NOVEL_HELD_OUT
    from cstoolkit.world.oracle import STYLELESS, evaluate_non_objects, load_oracle

    oracle = load_oracle()
    rep = evaluate_non_objects(oracle, per_kind=30, seed0=31_337)
    trained = _shipped_oracle_kinds() - {"all"}  # a kind newer than the shipped weights is not asserted here
    for kind, row in rep.items():
        if kind in trained:
            assert row["content_rejected"] >= 0.9, (kind, row)
            assert row.get("style_rejected", 1) >= 0.9 if kind in STYLELESS else row["style_acc"] >= 0.8, (kind, row)
    assert np.mean([rep[k]["content_rejected"] for k in trained]) >= 0.95  # every kind has per_kind images
    pairs = [p for ps in NOVEL_HELD_OUT.values() for p in ps]
    res = oracle.classify([render(c, s, seed=555_000 + k, size=(64, 128)[k % 2]) for k, (c, s) in enumerate(pairs)])
    right = np.mean([r["content"] == c and r["style"] == s for r, (c, s) in zip(res, pairs)])
    assert right >= 0.95, right




def _shipped_oracle_kinds() -> set[str]:
    """The non-object kinds the shipped oracle was trained and evaluated on (its ``oracle.json``)."""
    from cstoolkit.world.oracle import WEIGHTS_DIR

    return set(json.loads((WEIGHTS_DIR / "oracle.json").read_text()).get("non_objects", {}))


def test_blobs_are_no_world_shape():
    """#17: soft irregular blobs (what a failed embedding method draws) were read as the novel kite/key. The
    blob non-objects are none of the 13 shapes (best IoU with a real content mask <= BLOB_MAX_IOU), of an
    object's size, inside the frame, and deterministic."""
    from cstoolkit.world.generator import content_mask
    from cstoolkit.world.oracle import BLOB_MAX_IOU, blob_mask, shape_iou

    masks = [blob_mask("blob", 77_000 + k, size=(64, 128)[k % 2]) for k in range(26)]
    assert np.array_equal(masks[0], blob_mask("blob", 77_000, size=64))
    assert all(shape_iou(m)[0] <= BLOB_MAX_IOU and 0.08 <= m.mean() <= 0.6 for m in masks)
    assert len({m.tobytes() for m in masks}) == len(masks)
    best, name = shape_iou(content_mask("heart", seed=3, size=64))  # a real shape is close to its class
    assert best > BLOB_MAX_IOU and name == "heart"
    with pytest.raises(ValueError, match="blob kind"):
        blob_mask("cloud", 0)


@pytest.mark.skipif("blob" not in _shipped_oracle_kinds(), reason="the shipped oracle was not trained on blobs "
                    "(docs/world.md: oracle v3 candidates)")
def test_shipped_oracle_rejects_blobs_and_keeps_their_style():
    from PIL import Image

    from cstoolkit.world.generator import ALL_STYLES, style_array
    from cstoolkit.world.oracle import blob_mask, load_oracle

    styles = [ALL_STYLES[k % len(ALL_STYLES)] for k in range(26)]
    images = [Image.fromarray((style_array(blob_mask("blob", 78_000 + k), s, seed=k) * 255).astype(np.uint8))
              for k, s in enumerate(styles)]
    res = load_oracle().classify(images)
    assert np.mean([r["rejected"] for r in res]) >= 0.9, [r["content"] for r in res]
    assert np.mean([r["style"] == s for r, s in zip(res, styles)]) >= 0.8

def test_cli_classify_reports_rejection_and_reads_16_bit_and_tiny_images(tmp_path, capsys):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (200, 30, 60)).save(blank)
    grey8, grey16 = tmp_path / "g8.png", tmp_path / "g16.png"
    g = render("boat", "checkered", seed=3, size=96).convert("L")
    g.save(grey8)
    Image.fromarray(np.asarray(g, np.uint16) * 257).save(grey16)  # 16-bit greyscale PNG
    assert Image.open(grey16).mode.startswith("I")
    capsys.readouterr()
    assert main(["world", "classify", "--json", str(blank), str(grey8), str(grey16)]) == 0
    b, a8, a16 = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert b["content"] is None and b["rejected"] is True and b["style_rejected"] is True
    assert a8["rejected"] is False
    assert (a16["content"], a16["style"]) == (a8["content"], a8["style"])
    assert abs(a16["content_prob"] - a8["content_prob"]) < 0.02
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    assert main(["world", "classify", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cstoolkit: error: ") and "1x1 px" in err and err.count("\n") == 1


def test_bench_items_of_every_kind_use_neutral_words_for_novel_concepts(capsys):
    from cstoolkit.world.bench import KINDS, parse_kinds, world_items

    assert parse_kinds("all") == KINDS and parse_kinds("novel_style,held_out_pair") == ("novel_style", "held_out_pair")
    assert main(["world", "bench", "--methods", "textual_inversion", "--out", "x", "--kinds", "novel"]) == 2
    assert "--kinds: unknown kind 'novel'" in capsys.readouterr().err
    items = world_items(10, kinds=KINDS)
    assert len(items) == 40 and len({i.name for i in items}) == 40 and len({i.seed for i in items}) == 40
    words = {i.kind: (i.content_word, i.style_word) for i in reversed(items)}  # the first item of each kind
    assert words["held_out_pair"] == ("star", "gradient")
    assert words["novel_content"] == ("object", words["novel_content"][1]) and words["novel_content"][1] in STYLES
    assert words["novel_style"][1] == "pattern" and words["novel_both"] == ("object", "pattern")


def test_bootstrap_intervals_respect_items_and_samples():
    from cstoolkit.world.bench import bootstrap_interval, summarise, table_markdown

    one = bootstrap_interval([0.5], [8])  # one item: only its 8 samples vary
    assert one[0] < 0.5 < one[1] and one[1] - one[0] > 0.4
    many = bootstrap_interval([0.5] * 10, [8] * 10)
    assert many[0] < 0.5 < many[1] and many[1] - many[0] < one[1] - one[0]
    # items that disagree widen the interval beyond what the samples alone give
    spread = bootstrap_interval([0.0, 1.0] * 5, [8] * 10)
    assert spread[1] - spread[0] > many[1] - many[0]
    assert bootstrap_interval([0.3], None) is None  # identity of one item: no interval
    rows = [{"method": "m", "status": "done", "kind": "held_out_pair", "content_acc": v, "content_samples": 9}
            for v in (0.2, 0.4, 0.6)]
    means = summarise(rows, ["m"], ["held_out_pair"])
    lo, hi = means["m"]["ci95"]["content_acc"]
    assert lo < means["m"]["content_acc"] == 0.4 < hi
    assert f"0.40 [{lo:.2f}, {hi:.2f}]" in table_markdown(means)


# ------------------------------------------------------------------------------ shape gate (#17 item 1)
def _blob_images(seed0: int, n: int) -> list:
    from PIL import Image

    from cstoolkit.world.generator import ALL_STYLES, style_array
    from cstoolkit.world.oracle import blob_mask

    return [Image.fromarray((style_array(blob_mask("blob", seed0 + k, size=(64, 96, 128)[k % 3]),
                                         ALL_STYLES[k % len(ALL_STYLES)], seed=seed0 + k) * 255 + 0.5).astype(np.uint8))
            for k in range(n)]


def test_shape_gate_keeps_renders_of_every_content_and_rejects_blobs(single_thread):
    """#17 item 1: the weight-free shape gate (world/shape_gate.py) keeps renders of each of the 13 contents in
    3 styles (every style once or more) and rejects most fresh blobs, which the v2 oracle names a class (this
    draw of 39: the oracle alone rejects 0, oracle + gate 35; the gate is off by default: it does not meet the
    issue's bar of 95 % with the backbones' samples kept, docs/world.md "Shape gate")."""
    from cstoolkit.world.generator import ALL_CONTENTS, ALL_STYLES
    from cstoolkit.world.oracle import load_oracle
    from cstoolkit.world.shape_gate import apply_gate, gate_passes

    n = len(ALL_STYLES)
    renders = [(c, ALL_STYLES[(i + 4 * k) % n], 64 + 64 * (k % 2)) for i, c in enumerate(ALL_CONTENTS)
               for k in range(3)]
    assert {s for _, s, _ in renders} == set(ALL_STYLES)
    images = [render(c, s, seed=81_000 + j, size=size) for j, (c, s, size) in enumerate(renders)]
    passes = gate_passes(images, [ALL_CONTENTS.index(c) for c, _, _ in renders])
    assert all(ok for ok, _ in passes), [(r, m) for r, (ok, m) in zip(renders, passes) if not ok]
    blobs = _blob_images(79_000, 39)
    res = load_oracle().classify(blobs)
    before = sum(r["rejected"] for r in res)
    styles = [r["style"] for r in res]
    apply_gate(res, blobs)
    assert sum(r["rejected"] for r in res) >= 34 > before, [(r["content"], r["shape_margin"]) for r in res]
    assert [r["style"] for r in res] == styles  # the style verdict stands
    assert all(r["content"] is None for r in res if r["gate_rejected"])


def test_cli_classify_gate(tmp_path, capsys):
    """``world classify --gate`` reports a gated blob as the oracle's own rejection (content null, rejected
    true, style kept); ``--no-gate`` gives the raw oracle, which names a class for it."""
    blob, ok = tmp_path / "blob.png", tmp_path / "fish.png"
    _blob_images(79_000, 1)[0].save(blob)
    render("fish", "neon", seed=5, size=96).save(ok)
    capsys.readouterr()
    assert main(["world", "classify", "--json", "--gate", str(blob), str(ok)]) == 0
    b, f = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert b["content"] is None and b["rejected"] is True and b["gate_rejected"] is True and b["shape_margin"] < 0
    assert b["style"] is not None and b["style_rejected"] is False
    assert f["content"] == "fish" and f["rejected"] is False and f["gate_rejected"] is False
    assert main(["world", "classify", "--json", "--no-gate", str(blob)]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["content"] is not None and raw["rejected"] is False and "gate_rejected" not in raw


def test_world_scorer_with_gate(tmp_path):
    """The gated scorer has its own id (a finished unit scored without the gate is rescored) and still gives
    true renders full marks."""
    from cstoolkit.bench import BenchItem
    from cstoolkit.world.bench import make_scorer, world_items

    items = world_items(1)
    plain, gated = (make_scorer({it.name: it for it in items}, 128, gate=g) for g in (False, True))
    assert plain.scorer_id.startswith("world-oracle-v2:") and gated.scorer_id.startswith("world-oracle-v2+gate-v1:")
    it = items[0]
    _fake_run(tmp_path, it, same_instance=True)
    a = gated(tmp_path, BenchItem(it.name, [], it.content, it.style))
    assert a["content_acc"] >= 0.88 and a["both_acc"] == 1.0 and a["rejected"] == 0, a
