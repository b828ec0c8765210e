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
                      progress=False)
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
                        progress=False)
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
    score prefers the item's own instance to another instance of the same class (same pose)."""
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
        assert a["identity"] > 0.99 and b["identity"] < a["identity"] - 0.03, (a, b)
        assert a["identity_gain"] > b["identity_gain"]


def test_world_bench_recipes_per_backbone():
    """--backbones runs a method on each listed backbone it supports, with the preset and steps set."""
    from cstoolkit.world.bench import RECIPES_DIR, _method_recipes

    rec = _method_recipes(["textual_inversion", "unziplora"], ["sdxl", "infinity"], "tiny", 3, 2, RECIPES_DIR)
    assert list(rec) == ["textual_inversion-sdxl", "textual_inversion-infinity", "unziplora-sdxl"]
    assert rec["textual_inversion-infinity"]["backbone"] == {"name": "infinity", "preset": "tiny"}
    assert rec["unziplora-sdxl"]["params"]["steps"] == 3 and rec["unziplora-sdxl"]["generate"]["steps"] == 2


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
