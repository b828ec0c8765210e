"""Core: recipes and their errors, CLI behaviour, runtime (resume, divergence), decomposition I/O."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import EXAMPLE, ROOT, toy_recipe

from cstoolkit import Decomposer, Decomposition, registry
from cstoolkit.cli import main
from cstoolkit.errors import TrainingDiverged, UserError
from cstoolkit.recipe import apply_overrides, load_recipe


# ------------------------------------------------------------------------------------ recipes
def test_recipe_resolves_defaults_and_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img.png").write_bytes(EXAMPLE.read_bytes())
    path = tmp_path / "sub" / "r.yaml"
    data = toy_recipe(tmp_path)
    data["inputs"]["image"] = "img.png"  # relative to the recipe's folder
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path, ["params.lr=0.5"])
    assert recipe.inputs.image == str(tmp_path / "sub" / "img.png")
    assert recipe.params.lr == 0.5 and recipe.params.steps == 6 and recipe.params.nan_at == -1
    assert recipe.generate.prompts["content"] == ["A <c> on the beach"]
    assert recipe.generate.options.brightness == 128
    resolved = recipe.to_dict()
    assert resolved["params"] == {"steps": 6, "lr": 0.5, "nan_at": -1}
    assert load_recipe(resolved).to_dict() == resolved  # the resolved recipe is itself a valid recipe


@pytest.mark.parametrize(
    "change, where, fragment",
    [
        ({"params": {"stpes": 3}}, "params.stpes", "did you mean 'steps'"),
        ({"params": {"steps": "many"}}, "params.steps", "expected an integer"),
        ({"params": {"steps": -5}}, "params.steps", "expected a value >= 1"),
        ({"method": "toyy"}, "method", "did you mean 'toy'"),
        ({"backbone": {"name": "toy", "preset": "tinyy"}}, "backbone.preset", "did you mean 'tiny'"),
        ({"backbone": {"name": "nope"}}, "backbone.name", "unknown backbone"),
        ({"generate": {"content": ["A dog on the beach"]}}, "generate.content[0]", "no <c> placeholder"),
        ({"generate": {"both": ["A <c> in a boat"]}}, "generate.both[0]", "no <s> placeholder"),
        ({"generate": {"brightnes": 3}}, "generate.brightnes", "did you mean 'brightness'"),
        ({"runtime": {"mixed_precision": "fp8"}}, "runtime.mixed_precision", "expected one of"),
        ({"generate": {"num_images": 0}}, "generate.num_images", ">= 1"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, change, where, fragment):
    data = toy_recipe(tmp_path)
    for k, v in change.items():
        if isinstance(v, dict) and k != "backbone":
            data[k] = {**data.get(k, {}), **v}
        else:
            data[k] = v
    with pytest.raises(UserError) as err:
        load_recipe(data)
    assert err.value.where == where
    assert fragment in str(err.value)


def test_unknown_top_level_key_suggests(tmp_path):
    data = toy_recipe(tmp_path)
    data["parms"] = {}
    with pytest.raises(UserError, match="did you mean 'params'"):
        load_recipe(data)


def test_overrides_parse_yaml_values():
    out = apply_overrides({"params": {"steps": 1}}, ["params.steps=50", "runtime.output_dir=x/y", "a.b.c=[1, 2]"])
    assert out == {"params": {"steps": 50}, "runtime": {"output_dir": "x/y"}, "a": {"b": {"c": [1, 2]}}}
    with pytest.raises(UserError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["params.steps"])


# ----------------------------------------------------------------------------------- CLI errors
def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cstoolkit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: unziplora\nbackbone: {name: sdxl, preset: tiny}\nparams: {rnak: 4}\n"
                    f"inputs: {{image: {EXAMPLE}, content: balloon, style: flat}}\n"
                    f"runtime: {{output_dir: {tmp_path / 'out'}}}\n")
    res = _cli("run", str(path))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["cstoolkit: error: params.rnak: unknown key; did you mean 'rank'?"]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing half written
    res = _cli("run", str(path), "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cli_missing_and_invalid_files(tmp_path):
    res = _cli("run", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "recipe file not found" in res.stderr
    bad = tmp_path / "broken.yaml"
    bad.write_text("method: [unclosed\n")
    res = _cli("show-recipe", str(bad))
    assert res.returncode == 2 and "invalid YAML" in res.stderr and "Traceback" not in res.stderr


def test_cli_list_methods_json():
    res = _cli("list-methods", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    # UnZipLoRA runs on both families since issue 20; the matrix row names its backbones
    assert rows["unziplora"]["family"] == "diffusion|scalewise" and "CVPR" in rows["unziplora"]["paper"]
    assert rows["unziplora"]["supports"] == ["infinity", "sdxl", "switti"] and rows["b_lora"]["supports"] == ["sdxl"]
    res = _cli("list-backbones")
    assert res.returncode == 0 and "sdxl" in res.stdout and "preset tiny" in res.stdout


def test_registry_reads_entry_points(monkeypatch):
    class EP:
        name = "extra"

        def load(self):
            class Extra:
                name = "extra_method"
                family = "toy"

            return Extra

    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [EP()] if group == registry.METHOD_GROUP else [])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "extra_method" in registry.methods()
    finally:
        registry._METHODS.pop("extra_method", None)


# --------------------------------------------------------------------------------- full runs
def test_run_writes_the_documented_layout(tmp_path, capsys):
    data = toy_recipe(tmp_path)
    result = Decomposer.from_recipe(data).run()
    out = tmp_path / "run"
    assert (out / "recipe.yaml").is_file() and (out / "grid.png").is_file()
    assert (out / "decomposition" / "manifest.json").is_file()
    assert (out / "decomposition" / "toy" / "vec.safetensors").is_file()
    assert any((out / "logs").glob("events.out.tfevents.*"))  # tensorboard scalars
    assert sorted(p.name for p in (out / "samples" / "content" / "a-c-on-the-beach").iterdir()) == ["0.png", "1.png"]
    assert result.samples["both"]["A <c> in <s> style"][1].is_file()
    manifest = json.loads((out / "decomposition" / "manifest.json").read_text())
    assert manifest["method"] == "toy" and manifest["placeholders"]["<c>"] == "balloon"
    assert manifest["recipe"]["params"]["steps"] == 6
    # a finished run is not overwritten without --overwrite
    with pytest.raises(UserError, match="finished run"):
        Decomposer.from_recipe(data).run()
    Decomposer.from_recipe(data, overwrite=True).run()


def test_decomposition_round_trip_and_generate(tmp_path):
    dec = Decomposer.from_recipe(toy_recipe(tmp_path)).fit()
    assert not (tmp_path / "run").exists()  # fit alone writes nothing (no checkpoints asked for)
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec")
    assert torch.equal(loaded.files["toy/vec.safetensors"]["vec"], dec.files["toy/vec.safetensors"]["vec"])
    a = dec.generate("A <c> on the beach", use="content", num_images=2, seed=3)
    b = loaded.generate("A <c> on the beach", use="content", num_images=2, seed=3)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    with pytest.raises(UserError, match="no <s> placeholder"):
        loaded.generate("A <c> on the beach", use="style")
    with pytest.raises(UserError, match="has no manifest.json"):
        Decomposition.load(tmp_path)


def test_cli_generate_from_saved_decomposition(tmp_path, capsys):
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    code = main(["generate", str(tmp_path / "run"), "--prompt", "A <c> on the beach", "--use", "content",
                 "--num-images", "2", "--out", str(tmp_path / "gen")])
    assert code == 0
    assert (tmp_path / "gen" / "content" / "a-c-on-the-beach" / "1.png").is_file()
    code = main(["generate", str(tmp_path / "run"), "--prompt", "A dog", "--use", "content"])
    assert code == 2
    assert "no <c> placeholder" in capsys.readouterr().err


# -------------------------------------------------------------------------------- resume
def _vec(tmp_path, name):
    return Decomposition.load(tmp_path / name / "decomposition").files["toy/vec.safetensors"]["vec"]


def test_resume_is_bit_identical(tmp_path):
    full = toy_recipe(tmp_path, params={"steps": 9}, runtime={"output_dir": str(tmp_path / "full"),
                                                              "checkpoint_every": 3})
    Decomposer.from_recipe(full).run()
    # an interrupted run: stops with a NaN at step 7 after checkpoints at 3 and 6
    part = toy_recipe(tmp_path, params={"steps": 9, "nan_at": 7},
                      runtime={"output_dir": str(tmp_path / "part"), "checkpoint_every": 3})
    with pytest.raises(TrainingDiverged, match="step 7.*step-0000006"):
        Decomposer.from_recipe(part).run()
    assert not (tmp_path / "part" / "decomposition" / "manifest.json").exists()
    with pytest.raises(UserError, match="--resume"):
        Decomposer.from_recipe(part).run()
    part["params"]["nan_at"] = -1
    Decomposer.from_recipe(part, resume=True).run()
    assert torch.equal(_vec(tmp_path, "full"), _vec(tmp_path, "part"))
    # byte for byte: the decomposition's files (metadata included), their manifest hashes, samples and grid
    artifacts = ["decomposition/toy/vec.safetensors", "grid.png",
                 *(str(p.relative_to(tmp_path / "full")) for p in sorted((tmp_path / "full").glob("samples/**/*.png")))]
    assert len(artifacts) == 6
    for rel in artifacts:
        assert (tmp_path / "full" / rel).read_bytes() == (tmp_path / "part" / rel).read_bytes(), rel
    manifests = [json.loads((tmp_path / r / "decomposition" / "manifest.json").read_text()) for r in ("full", "part")]
    assert manifests[0]["files"] == manifests[1]["files"]


def test_seeded_runs_are_deterministic(tmp_path):
    a = Decomposer.from_recipe(toy_recipe(tmp_path, runtime={"output_dir": str(tmp_path / "a")})).fit()
    b = Decomposer.from_recipe(toy_recipe(tmp_path, runtime={"output_dir": str(tmp_path / "b")})).fit()
    assert torch.equal(a.files["toy/vec.safetensors"]["vec"], b.files["toy/vec.safetensors"]["vec"])


def test_cli_bad_image_fails_before_writing_anything(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "unziplora", "backbone": {"name": "sdxl", "preset": "tiny"},
        "inputs": {"image": "junk.png", "content": "dog", "style": "flat"},
        "runtime": {"output_dir": str(tmp_path / "out")},
    }))
    res = _cli("run", str(recipe))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("cstoolkit: error: inputs.image: cannot read") and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    small = tmp_path / "small.png"
    from PIL import Image

    Image.new("RGB", (40, 300)).save(small)
    res = _cli("run", str(recipe), "--set", f"inputs.image={small}")
    assert res.returncode == 2 and "at least 64 px" in res.stderr
