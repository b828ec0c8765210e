"""The contract every registered method keeps (timm-style: one test over every name the registry knows).

For each method of ``registry.methods()`` (a method added later is tested the day it registers):

* its shipped recipe ``recipes/<name>.yaml`` runs end to end with tiny/short ``--set`` overrides;
* the decomposition saves and loads back bit for bit, and each declared use generates from it;
* a typo in its ``params`` is the one-line error through ``cli.main`` (exit 2, nothing written);
* resume after an interruption is bit-identical (methods that train);
* every ``runtime.mixed_precision`` works on the CPU (issue 9 item 9).

The overrides are derived from each method's own config: every ``*steps`` parameter is cut to a few
steps, one image per prompt, few sampling steps. Mixed precision and resume are marked ``slow``
(``pytest -m "not slow"`` skips them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from cstoolkit import Decomposer, Decomposition, registry
from cstoolkit.cli import main
from cstoolkit.runtime import TrainLoop

RECIPES = ROOT / "recipes"
#: at most this many steps for every ``steps`` / ``*_steps`` parameter
SHORT_STEPS = 3
#: sampling steps of every generation here (when the method has a ``steps`` option)
SAMPLE_STEPS = 2


def _shipped_methods() -> list[str]:
    """Registered methods that are part of the toolkit (test fixtures such as conftest's toy excluded)."""
    return [name for name, cls in registry.methods().items()
            if not cls.__module__.startswith(("conftest", "test_", "tests."))]


METHODS = _shipped_methods()


def recipe_of(name: str) -> Path:
    """``recipes/<name>.yaml`` (a method without one fails ``test_every_method_ships_a_recipe`` only)."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"{name} has no shipped recipe yet")
    return path


def short_overrides(name: str, output_dir: Path, **runtime: Any) -> list[str]:
    """``--set`` values that make ``name``'s shipped recipe quick on a CPU, from its config fields."""
    cls = registry.get_method(name)
    recipe = yaml.safe_load(recipe_of(name).read_text())
    params = recipe.get("params") or {}
    out = []
    for f in dataclasses.fields(cls.Config):
        if f.type in (int, "int") and (f.name == "steps" or f.name.endswith("_steps")):
            current = params.get(f.name, f.default)
            if isinstance(current, int):
                low = f.metadata.get("min", 1)
                out.append(f"params.{f.name}={max(low, min(current, SHORT_STEPS))}")
    out.append("generate.num_images=1")
    if "steps" in {f.name for f in dataclasses.fields(cls.GenerateConfig)}:
        out.append(f"generate.steps={SAMPLE_STEPS}")
    settings = {"output_dir": str(output_dir), "device": "cpu", "progress": False, **runtime}
    out += [f"runtime.{k}={v}" for k, v in settings.items()]
    return out


def use_prompt(cls: type, use: str) -> str:
    """A prompt with the placeholders ``use`` needs."""
    method = cls.__new__(cls)
    return "A " + " in the style of ".join(method.required_placeholders(use)) + " on a hill"


def _sample_options(cls: type) -> dict[str, Any]:
    return {"steps": SAMPLE_STEPS} if "steps" in {f.name for f in dataclasses.fields(cls.GenerateConfig)} else {}


def _files_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert sorted(a) == sorted(b)
    for rel in a:
        assert sorted(a[rel]) == sorted(b[rel]), rel
        for key in a[rel]:
            assert a[rel][key].dtype == b[rel][key].dtype, (rel, key)
            assert torch.equal(a[rel][key], b[rel][key]), (rel, key)


@pytest.fixture(scope="module", params=METHODS)
def shipped_run(request, tmp_path_factory, single_thread):
    """The shipped recipe of one method, run once through ``Decomposer.run`` with short overrides."""
    name = request.param
    out = tmp_path_factory.mktemp(name) / "run"
    cls = registry.get_method(name)
    overrides = short_overrides(name, out, checkpoint_every=1 if cls.trains else 0)
    result = Decomposer.from_recipe(recipe_of(name), overrides).run()
    return name, cls, result, overrides


def test_every_method_ships_a_recipe():
    assert METHODS, "no method registered"
    for name in METHODS:
        path = RECIPES / f"{name}.yaml"
        assert path.is_file(), f"{name} has no shipped recipe {path}"
        assert yaml.safe_load(path.read_text())["method"] == name


def test_shipped_recipe_runs(shipped_run):
    name, cls, result, _ = shipped_run
    out = result.output_dir
    manifest = json.loads((out / "decomposition" / "manifest.json").read_text())
    assert manifest["method"] == name and manifest["files"]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "grid.png").is_file()
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    for use in set(recipe.get("generate", {})) & set(cls.uses):
        assert result.samples[use], use
        for paths in result.samples[use].values():
            assert all(p.is_file() for p in paths)
    for rel, tensors in result.decomposition.files.items():
        for key, t in tensors.items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), (rel, key)


def test_decomposition_saves_and_loads(shipped_run, tmp_path):
    _, _, result, _ = shipped_run
    loaded = Decomposition.load(result.output_dir / "decomposition")
    _files_equal(result.decomposition.files, loaded.files)
    assert loaded.placeholders == result.decomposition.placeholders
    loaded.save(tmp_path / "again")
    _files_equal(loaded.files, Decomposition.load(tmp_path / "again").files)


def test_every_declared_use_generates(shipped_run):
    _, cls, result, _ = shipped_run
    loaded = Decomposition.load(result.output_dir / "decomposition")  # rebuilds the backbone from the recipe
    for use in cls.uses:
        images = loaded.generate(use_prompt(cls, use), use=use, num_images=1, seed=1, progress=False,
                                 **_sample_options(cls))
        assert len(images) == 1 and min(images[0].size) >= 64, use


@pytest.mark.parametrize("name", METHODS)
def test_param_typo_is_one_line_error(name, tmp_path, capsys):
    cls = registry.get_method(name)
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    if not fields:
        pytest.skip(f"{name} has no params")
    field = max(fields, key=len)
    typo = field[:-2] + field[-1] + field[-2] if len(field) > 2 else field + "x"
    out = tmp_path / "run"
    code = main(["run", str(recipe_of(name)), "--set", f"params.{typo}=1",
                 "--set", f"runtime.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"cstoolkit: error: params.{typo}: unknown key; did you mean '{field}'?"]
    assert not out.exists()


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_is_bit_identical(shipped_run, tmp_path, monkeypatch):
    name, cls, result, overrides = shipped_run
    if not cls.trains:
        pytest.skip(f"{name} does not train")
    original = TrainLoop.__iter__
    seen = {"steps": 0, "stop": None}

    def counted(self):
        for step in original(self):
            if seen["stop"] is not None and seen["steps"] >= seen["stop"]:
                raise _Interrupt(f"stopped after {seen['steps']} steps")
            seen["steps"] += 1
            yield step

    monkeypatch.setattr(TrainLoop, "__iter__", counted)
    out = tmp_path / "run"
    again = [o for o in overrides if not o.startswith("runtime.output_dir=")] + [f"runtime.output_dir={out}"]
    recipe = recipe_of(name)
    # every stage of the full run left a final checkpoint with its number of steps
    finals = list((result.output_dir / "checkpoints").glob("*/final/meta.json"))
    total = sum(json.loads(p.read_text())["step"] for p in finals)
    assert finals and total >= 2, f"{name} trained {total} steps"
    seen.update(steps=0, stop=total // 2)
    with pytest.raises(_Interrupt):
        Decomposer.from_recipe(recipe, again).fit()
    assert any((out / "checkpoints").rglob("state.safetensors"))
    seen.update(steps=0, stop=None)
    resumed = Decomposer.from_recipe(recipe, again, resume=True).fit()
    assert seen["steps"] < total  # it did continue, not start over
    _files_equal(result.decomposition.files, resumed.files)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_mixed_precision_on_cpu(name, precision, tmp_path, single_thread):
    cls = registry.get_method(name)
    overrides = short_overrides(name, tmp_path / "run", mixed_precision=precision)
    dec = Decomposer.from_recipe(recipe_of(name), overrides).fit()
    for rel, tensors in dec.files.items():
        for key, t in tensors.items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), (rel, key, precision)
    use = cls.default_use()
    images = dec.generate(use_prompt(cls, use), use=use, num_images=1, progress=False, **_sample_options(cls))
    assert len(images) == 1
    pixels = np.asarray(images[0], dtype=np.float32)
    assert pixels.shape[-1] == 3 and pixels.std() > 0  # NaN latents decode to one flat colour


def _pairs() -> list[tuple[str, str]]:
    """(method, backbone) for every supported pair besides the backbone of the method's shipped recipe."""
    out = []
    for name in METHODS:
        path = RECIPES / f"{name}.yaml"
        own = (yaml.safe_load(path.read_text()).get("backbone") or {}).get("name") if path.is_file() else None
        out += [(name, b) for b in registry.supported_backbones(registry.get_method(name)) if b != own]
    return out


@pytest.mark.parametrize("name,backbone", _pairs())
def test_every_supported_pair_runs_on_tiny(name, backbone, tmp_path, single_thread):
    """The methods x backbones matrix: each pair fits, saves, loads back and generates on the tiny preset."""
    cls = registry.get_method(name)
    overrides = short_overrides(name, tmp_path / "run") + [f"backbone.name={backbone}", "backbone.preset=tiny"]
    result = Decomposer.from_recipe(recipe_of(name), overrides).run()
    loaded = Decomposition.load(result.output_dir / "decomposition")
    _files_equal(result.decomposition.files, loaded.files)
    use = cls.default_use()
    images = loaded.generate(use_prompt(cls, use), use=use, num_images=1, seed=1, progress=False,
                             **_sample_options(cls))
    assert len(images) == 1 and min(images[0].size) >= 16
