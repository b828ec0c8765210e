"""Evaluation: metric models (official layouts, definitions), `cstoolkit eval`, reports, `cstoolkit bench`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLE, ROOT, toy_recipe
from PIL import Image

from cstoolkit.bench import BenchItem, load_bench_recipes, load_items, load_prompts, run_items
from cstoolkit.cli import main
from cstoolkit.errors import UserError
from cstoolkit.io import labeled_grid, load_image
from cstoolkit.metrics import METRICS, MetricModels
from cstoolkit.metrics.models import CLIPEncoder, CSDEncoder, DINOEncoder

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def tiny_models() -> MetricModels:
    return MetricModels("tiny", device="cpu")


# ------------------------------------------------------------------------------ metric models
def test_tiny_models_load_from_official_layouts(tmp_path, tiny_models):
    """Each tiny model saved in its official file layout loads through the real weights path."""
    from safetensors.torch import save_file

    from cstoolkit.metrics.models import PRESETS

    specs = PRESETS["tiny"]
    x = tiny_models.model("clip").preprocess([load_image(EXAMPLE)])
    # CSD: learn2phoenix's checkpoint: {'model_state_dict': {'module.*'}, 'args': Namespace}, backbone.proj unused
    csd = CSDEncoder(specs["csd"].arch, None, seed=7)
    state = {f"module.{k}": v for k, v in csd.state_dict().items()}
    state["module.backbone.proj"] = torch.zeros(64, 48)
    torch.save({"model_state_dict": state, "args": argparse.Namespace(arch="vit_large"), "epoch": 3},
               tmp_path / "checkpoint.pth")
    # CLIP: open_clip's hub layout (open_clip_model.safetensors); DINO: the official .pth (a flat state dict)
    clip = CLIPEncoder(specs["clip"].arch, None, seed=8)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    dino = DINOEncoder(specs["dino"].arch, None, seed=9)
    torch.save(dino.model.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")

    loaded = MetricModels("tiny", {"csd": str(tmp_path / "checkpoint.pth"), "clip": str(tmp_path / "clip.safetensors"),
                                   "dino": str(tmp_path / "dino_deitsmall16_pretrain.pth")}, device="cpu")
    with torch.no_grad():
        for a, b in zip(csd(x), loaded.model("csd")(x)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(clip.encode_images(x), loaded.model("clip").encode_images(x))
        torch.testing.assert_close(clip.encode_texts(["a dog"]), loaded.model("clip").encode_texts(["a dog"]))
        torch.testing.assert_close(dino(x), loaded.model("dino")(x))
        # and differ from the preset's own random weights, so the file really was read
        assert not torch.allclose(loaded.model("dino")(x), tiny_models.model("dino")(x))


class NotAllowed:
    """A class outside the allow-list: unpickling it would import and run code."""


def test_weights_that_run_code_or_do_not_fit_are_refused(tmp_path):
    torch.save({"model_state_dict": {}, "obj": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="would run code"):
        MetricModels("tiny", {"csd": str(tmp_path / "evil.pth")}, device="cpu").model("csd")
    torch.save({"model_state_dict": {"module.backbone.conv1.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="do not fit"):
        MetricModels("tiny", {"csd": str(tmp_path / "bad.pth")}, device="cpu").model("csd")
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        MetricModels("tiyn")


def test_an_image_scores_one_against_itself(tiny_models):
    im = load_image(EXAMPLE)
    other = load_image(EXAMPLES / "style_neon.png")
    same, diff = tiny_models.score([im, other], [im], ["a balloon", "a balloon"])
    for m in ("csd_c", "clip_i", "csd_s", "dino"):
        assert same[m] == pytest.approx(1.0, abs=1e-5)
        assert diff[m] < 0.999
    assert -1.0 <= same["clip_t"] <= 1.0 and same["clip_t"] != diff["clip_t"]


def test_batched_and_single_scores_agree(tiny_models):
    refs = [load_image(EXAMPLE)]
    ims = [load_image(p) for p in sorted(EXAMPLES.glob("*.png"))[:4]]
    texts = ["a balloon", "a cube", "a house", "a painting"][: len(ims)]
    batched = tiny_models.score(ims, refs, texts)
    for im, t, row in zip(ims, texts, batched):
        single = tiny_models.score([im], refs, [t])[0]
        for m in METRICS:
            assert single[m] == pytest.approx(row[m], abs=1e-5)


def test_png_and_jpeg_of_one_image_score_alike(tmp_path, tiny_models):
    im = load_image(EXAMPLES / "style_watercolor.png")
    im.save(tmp_path / "a.png")
    im.save(tmp_path / "a.jpg", quality=95)
    rgba = im.convert("RGBA")
    rgba.save(tmp_path / "a_rgba.png")  # pixel values in [0, 255] whatever the mode
    ref = [load_image(EXAMPLE)]
    png, jpg, rgba_png = tiny_models.score([load_image(tmp_path / n) for n in ("a.png", "a.jpg", "a_rgba.png")], ref,
                                           ["a watercolor"] * 3)
    for m in METRICS:
        assert jpg[m] == pytest.approx(png[m], abs=0.02)
        assert rgba_png[m] == pytest.approx(png[m], abs=1e-6)


# ------------------------------------------------------------------------------ eval + report
@pytest.fixture
def toy_run(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    data = toy_recipe(tmp_path)
    data["generate"]["style"] = ["A cat in <s> style"]
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 0
    return tmp_path / "run"


def test_eval_writes_metrics_and_report(toy_run, capsys):
    assert (toy_run / "report.html").is_file()  # every run writes one
    assert (toy_run / "logs" / "scalars.jsonl").is_file()
    capsys.readouterr()
    assert main(["eval", str(toy_run), "--metrics-preset", "tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CSD-C" in out and "CLIP-T" in out
    metrics = json.loads((toy_run / "metrics.json").read_text())
    assert all(isinstance(metrics[m], float) for m in METRICS)
    assert len(metrics["images"]) == 6  # 3 prompts x 2 images: every image counted
    uses = {r["use"] for r in metrics["images"]}
    assert uses == {"content", "style", "both"}
    content = [r for r in metrics["images"] if r["use"] == "content"]
    assert metrics["csd_c"] == pytest.approx(sum(r["csd_c"] for r in content) / len(content))
    by_use = metrics["by_use"]
    assert metrics["clip_t"] == pytest.approx(sum(by_use[u]["clip_t"] for u in by_use) / len(by_use))
    assert content[0]["text"] == "A balloon on the beach"  # CLIP-T reads the words, not the placeholders
    page = (toy_run / "report.html").read_text()
    assert "CSD-S" in page and "A cat in &lt;s&gt; style" in page and "toy/loss" in page
    assert "src='data:image/jpeg;base64," in page and "src='samples" not in page  # self-contained


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--metrics-preset", "tiny"]) == 2
    assert "has no recipe.yaml" in capsys.readouterr().err


def test_grid_labels_and_input_column():
    rows = [[Image.new("RGB", (64, 64), (0, 0, 255))] * 2, [Image.new("RGB", (64, 64), (0, 255, 0))]]
    inp = Image.new("RGB", (64, 64), (255, 0, 0))
    grid = labeled_grid(rows, ["content: A <c> on the beach", "style: A cat in <s> style"], [inp, None])
    assert grid.size == (4 + 3 * 68, 4 + 2 * (64 + 16 + 4))
    assert grid.getpixel((4 + 32, 4 + 16 + 32)) == (255, 0, 0)  # the input first
    assert grid.getpixel((4 + 68 + 32, 4 + 16 + 32)) == (0, 0, 255)
    label = grid.crop((4, 4, 200, 18)).convert("L")
    assert label.getextrema()[0] < 100  # text was drawn


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _images_in_browser(page: Path, tmp_path: Path) -> tuple[int, int]:
    """(images, broken images) of a page after load in headless Chromium."""
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.dataset.imgs=im.length;"
             "document.body.dataset.broken=im.filter(i=>!(i.complete&&i.naturalWidth>0)).length})</script>")
    check = tmp_path / f"check-{page.parent.name}.html"
    check.write_text(page.read_text().replace("</body>", probe + "</body>"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
           "--dump-dom", check.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    import re

    m = re.search(r'<body[^>]*data-imgs="(\d+)"[^>]*data-broken="(\d+)"', dom)
    assert m, f"no result in the dumped DOM: {dom[:300]}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed")
def test_report_renders_in_chromium(toy_run, tmp_path):
    main(["eval", str(toy_run), "--metrics-preset", "tiny", "--device", "cpu"])
    n, broken = _images_in_browser(toy_run / "report.html", tmp_path)
    assert n == 1 + 6 and broken == 0  # the input and every sample
    # the probe does see a broken image
    bad = tmp_path / "bad" / "report.html"
    bad.parent.mkdir()
    broken = "<h2>Input</h2><img src='data:image/png;base64,AAAA'>"
    bad.write_text((toy_run / "report.html").read_text().replace("<h2>Input</h2>", broken))
    assert _images_in_browser(bad, tmp_path) == (n + 1, 1)


# ------------------------------------------------------------------------------------ bench
def test_items_prompts_and_recipe_overrides(tmp_path):
    for name, src in (("balloon+flat_illustration", "balloon.png"), ("cube+water_color", "content_cube.png")):
        (tmp_path / "test" / name).mkdir(parents=True)
        shutil.copy(EXAMPLES / src, tmp_path / "test" / name / "00.jpg")
    items = load_items(tmp_path)  # finds test/
    assert [(i.name, i.content, i.style) for i in items] == [
        ("balloon+flat_illustration", "balloon", "flat illustration"), ("cube+water_color", "cube", "water color")]
    listing = tmp_path / "items.yaml"
    listing.write_text(yaml.safe_dump([{"name": "b", "image": str(EXAMPLE), "content": "balloon", "style": "flat"}]))
    assert load_items(listing)[0].images == [EXAMPLE]
    protocol = load_prompts()
    assert len(protocol["content"]) == 25 and len(protocol["style"]) == 21
    assert protocol["num_images"] == 10 and protocol["seed"] == 42
    assert all("<c>" in p for p in protocol["content"]) and all("<s>" in p for p in protocol["style"])
    recipes = load_bench_recipes([ROOT / "recipes" / "style_share.yaml", ROOT / "recipes" / "unziplora.yaml"],
                                 ["unziplora:params.steps=3", "runtime.seed=5"])
    assert recipes[1].data["params"]["steps"] == 3 and "steps" not in recipes[0].data["params"]
    assert recipes[0].data["runtime"]["seed"] == 5
    with pytest.raises(UserError, match="names no recipe"):
        load_bench_recipes([ROOT / "recipes" / "style_share.yaml"], ["nope:params.steps=3"])


def test_run_items_skips_finished_units(tmp_path):
    items = [BenchItem("a", [EXAMPLE], "balloon", "flat"), BenchItem("b", [EXAMPLES / "content_cube.png"], "cube", "x")]
    recipe = toy_recipe(tmp_path)
    calls = []

    def score(run_dir, item):
        calls.append(item.name)
        return {"csd_c": 0.5, "clip_t": 0.25}

    prompts = {"content": ["A <c> on the beach"], "style": ["A dog in <s> style"]}
    res = run_items(items, load_bench_recipes({"toy": recipe}), tmp_path / "out", prompts=prompts, num_images=1,
                    score_fn=score, progress=False)
    assert calls == ["a", "b"] and [r["status"] for r in res.rows] == ["done", "done"]
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["method"], r["item"], float(r["csd_c"])) for r in rows] == [("toy", "a", 0.5), ("toy", "b", 0.5)]
    assert json.loads((tmp_path / "out" / "means.json").read_text())["toy"]["clip_t"] == 0.25
    assert "| toy | 0.500 |" in (tmp_path / "out" / "means.md").read_text()
    run_b = tmp_path / "out" / "toy" / "b"
    assert sorted(p.name for p in (run_b / "samples").iterdir()) == ["content", "style"]  # the benchmark's prompts
    # a rerun skips finished units; a lost unit (process died mid-way) is run again
    shutil.rmtree(run_b)
    (tmp_path / "out" / "toy" / "a" / "decomposition" / "manifest.json").unlink()  # would fail if re-read
    # --time-limit 0: no new unit starts; the finished one is reported, the lost one left for a rerun
    res = run_items(items, load_bench_recipes({"toy": recipe}), tmp_path / "out", prompts=prompts, num_images=1,
                    score_fn=score, progress=False, time_limit=0)
    assert calls == ["a", "b"] and [(r["item"], r.get("skipped")) for r in res.rows] == [("a", True)]
    assert not run_b.exists()
    # a finished unit of another recipe (changed settings) is not "finished" either: past the limit it waits too
    res = run_items(items[:1], load_bench_recipes({"toy": recipe}, ["params.steps=3"]), tmp_path / "out",
                    prompts=prompts, num_images=1, score_fn=score, progress=False, time_limit=0)
    assert calls == ["a", "b"] and res.rows == []
    with pytest.raises(UserError, match="--time-limit"):
        run_items(items, load_bench_recipes({"toy": recipe}), tmp_path / "out", prompts=prompts, time_limit=-1)
    res = run_items(items, load_bench_recipes({"toy": recipe}), tmp_path / "out", prompts=prompts, num_images=1,
                    score_fn=score, progress=False)
    assert calls == ["a", "b", "b"] and res.rows[0].get("skipped") and not res.rows[1].get("skipped")
    # a changed recipe is not "finished": the fingerprint differs
    run_items(items[:1], load_bench_recipes({"toy": recipe}, ["params.steps=3"]), tmp_path / "out", prompts=prompts,
              num_images=1, score_fn=score, progress=False)
    assert calls[-1] == "a"


_TWO_CALLS = """
import json, os, sys, time
from pathlib import Path
import cstoolkit.bench as B

def unit(recipe, item, out, prompts, *, num_images=None, score_fn=None, scorer_id="", only_if_done=False):
    if only_if_done:
        return None
    time.sleep(0.2 if recipe.name == "slow" and item.name == "i0" else 0.01)  # one long unit
    return {"method": recipe.name, "item": item.name, "status": "done", "rank": int(os.environ["RANK"])}

B.run_unit, B.check_units, B.ran_recipe = unit, lambda *a, **k: {}, lambda *a, **k: {}
out, image = Path(sys.argv[1]), Path(sys.argv[2])
items = [B.BenchItem(f"i{k}", [image], "balloon", "flat") for k in range(8)]
got = {}
for name in ("slow", "fast"):  # two calls in one launch, as world bench's groups of recipes
    res = B.run_items(items, [B.BenchRecipe(name, {}, out)], out, prompts={}, progress=False)
    got[name] = [(r["item"], r["rank"]) for r in res.rows]
if int(os.environ["RANK"]) == 0:
    print("ROWS " + json.dumps(got))
"""


def test_bench_processes_claim_units_over_several_calls(tmp_path):
    """4 processes, two run_items calls in one launch (world bench's recipe groups): both finish, every unit runs
    once, and the process with the long unit takes fewer. Before, the process group was destroyed and made again
    between the calls: with 6 processes the second call failed to connect (gloo) or, on a GPU machine, hung."""
    script = tmp_path / "two_calls.py"
    script.write_text(_TWO_CALLS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script),
           str(tmp_path / "out"), str(EXAMPLE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("ROWS ", 1)[1].splitlines()[0])
    for name in ("slow", "fast"):
        assert sorted(item for item, _ in got[name]) == [f"i{k}" for k in range(8)]  # each unit once
    slow_rank = dict(got["slow"])["i0"]
    assert sum(rank == slow_rank for _, rank in got["slow"]) < 8 / 4  # the others took its share
    assert len(list((tmp_path / "out" / ".claims").iterdir())) == 2  # one claim folder per call


def test_bench_on_two_processes(tmp_path):
    """`torchrun --nproc-per-node 2 -m cstoolkit bench`: each item runs once, rank 0 writes the tables."""
    data = tmp_path / "data"
    for name, src in (("balloon+flat_illustration", "balloon.png"), ("cube+watercolor", "content_cube.png")):
        (data / name).mkdir(parents=True)
        shutil.copy(EXAMPLES / src, data / name / "00.png")
    (tmp_path / "prompts.yaml").write_text('style: ["a robot in <s> style"]\ncontent: ["a <c> on the beach"]\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cstoolkit",
           "bench", "--data", str(data), "--recipe", str(ROOT / "recipes" / "style_share.yaml"), "--out",
           str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.yaml"), "--num-images", "1",
           "--metrics-preset", "tiny", "--set", "runtime.progress=false", "--set", "runtime.device=cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    print(f"2-process tiny bench: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| style_share |" in proc.stdout and proc.stdout.count("results:") == 1  # rank 0 alone prints
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["item"], r["status"]) for r in rows] == [("balloon+flat_illustration", "done"),
                                                        ("cube+watercolor", "done")]
    assert all(r["csd_s"] and r["clip_t"] and not r["csd_c"] for r in rows)  # style_share generates style only
    for r in rows:
        marker = json.loads((tmp_path / "out" / r["run_dir"] / "bench.json").read_text())
        assert marker["status"] == "done"
        assert (tmp_path / "out" / r["run_dir"] / "report.html").is_file()
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "means.md").is_file()
    # each unit claimed by exactly one process of this launch (one claim folder, one file per unit)
    launches = list((tmp_path / "out" / ".claims").iterdir())
    assert len(launches) == 1
    claims = sorted(f.name for f in launches[0].iterdir())
    assert claims == ["style_share--balloon+flat_illustration", "style_share--cube+watercolor"]
    assert {f.read_text() for f in launches[0].iterdir()} <= {"0", "1"}
