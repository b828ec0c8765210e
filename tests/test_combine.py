"""Cross-combination: content of one decomposition with the style of another (any LoRA method, CLI too)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, fit_on

from cstoolkit.cli import main
from cstoolkit.combine import combine
from cstoolkit.errors import UserError
from cstoolkit.methods.break_for_make import FUSED_FILE, recombine

EX = ROOT / "examples"
LORA = "pytorch_lora_weights.safetensors"


def fit_and_save(data, backbone, folder):
    dec = fit_on(data, backbone)
    dec.save(folder)
    return dec


def recipe(method, inputs, seed=0, **params):
    return {"method": method, "backbone": {"name": "sdxl", "preset": "tiny"}, "inputs": inputs, "params": params,
            "generate": {"steps": 2}, "runtime": {"progress": False, "device": "cpu", "seed": seed}}


def bfm_inputs(content_image):
    return {"content_images": [str(EX / content_image)], "content": "thing",
            "style_images": [str(EX / "style_neon.png")], "style": "neon"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, backbone):
    tmp = tmp_path_factory.mktemp("combine")
    bb = backbone
    small = {"rank": 4, "lr": 1e-3, "steps": 2}
    bfm = {**small, "steps": 1, "make_steps": 1, "mcp": False}
    return {
        "db": fit_and_save(recipe("dreambooth_lora", {"content_images": [str(EX / "content_cube.png")],
                                                      "content": "cube", "style": "plain"}, **small), bb, tmp / "db"),
        "bl": fit_and_save(recipe("b_lora", {"image": str(EX / "style_earth.png")}, **small), bb, tmp / "bl"),
        "bfm_a": fit_and_save(recipe("break_for_make", bfm_inputs("content_cube.png"), **bfm), bb, tmp / "bfm_a"),
        "bfm_b": fit_and_save(recipe("break_for_make", bfm_inputs("content_house.png"), **bfm), bb, tmp / "bfm_b"),
        "bfm_seed1": fit_and_save(recipe("break_for_make", bfm_inputs("balloon.png"), seed=1, **bfm), bb,
                                  tmp / "bfm_seed1"),
    }


def test_content_of_one_method_with_the_style_of_another(runs):
    db, bl = runs["db"], runs["bl"]
    joined = combine(content=db.path, style=bl.path, device="cpu")
    assert joined.method == "dreambooth_lora"
    assert joined.placeholders == {"<c>": db.placeholders["<c>"], "<s>": bl.placeholders["<s>"]}
    for role, src in (("content", db), ("style", bl)):
        mine, theirs = joined.files[f"{role}/{LORA}"], src.files[f"{role}/{LORA}"]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    a = joined.generate("A <c> in <s> style", use="both", seed=0, steps=2, progress=False)
    b = joined.generate("A <c> in <s> style", use="both", seed=0, steps=2, progress=False)
    assert a[0].tobytes() == b[0].tobytes()
    # the other way round: B-LoRA's content with DreamBooth-LoRA's style
    back = combine(content=bl.path, style=db.path)
    assert back.method == "b_lora" and back.files[f"style/{LORA}"].keys() == db.files[f"style/{LORA}"].keys()


def test_break_for_make_runs_with_the_same_frozen_halves_recombine(runs):
    a, b = runs["bfm_a"], runs["bfm_b"]
    joined = combine(content=a.path, style=b.path)
    expected = recombine(a.files[f"content/{LORA}"], b.files[f"style/{LORA}"])  # LoRA_f without fine-tuning
    assert joined.meta["loras"] == {"both": [FUSED_FILE]}
    assert all(torch.equal(joined.files[FUSED_FILE][k], v) for k, v in expected.items())
    # another seed draws other frozen halves: no recombination, the two LoRAs are added
    other = combine(content=a.path, style=runs["bfm_seed1"].path)
    assert FUSED_FILE not in other.files and "loras" not in other.meta
    # with another method's style, too
    mixed = combine(content=a.path, style=runs["db"].path)
    assert FUSED_FILE not in mixed.files and set(mixed.files) == {f"content/{LORA}", f"style/{LORA}"}


def test_cli_generate_content_and_style(runs, tmp_path, capsys):
    code = main(["generate", "--content", str(runs["bfm_a"].path), "--style", str(runs["bl"].path),
                 "--prompt", "A <c> in <s> style", "--steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert written and all(p.endswith(".png") and p.startswith(str(tmp_path / "both")) for p in written)
    code = main(["generate", "--style", str(runs["bl"].path), "--prompt", "A robot in <s> style", "--steps", "2",
                 "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0 and list((tmp_path / "style").rglob("*.png"))


def test_combine_refuses_other_backbones(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["bl"].path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["recipe"]["backbone"]["preset"] = "sdxl-base-random"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another backbone"):
        combine(content=runs["db"].path, style=other)
    code = main(["generate", "--content", str(runs["db"].path), "--style", str(other), "--prompt", "A <c>"])
    assert code == 2 and "--style" in capsys.readouterr().err
    with pytest.raises(UserError, match="neither"):
        combine()
