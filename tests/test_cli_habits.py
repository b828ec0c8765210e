"""Issue 19 items 6-8, 10-14, 17, 19: the CLI as a new user meets it.

One ``--device`` everywhere, placeholders that must stand for something, generate's diffusers-like
options and defaults, a bench that records a bad item as failed, honest labels and messages,
packaging without warnings, and the built-in plugins of a checkout that is not installed.
"""

from __future__ import annotations

import configparser
import csv
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLE, ROOT, toy_recipe
from PIL import Image

from cstoolkit import Decomposer, __version__, registry
from cstoolkit.bench import BenchItem, load_bench_recipes, run_items
from cstoolkit.cli import main
from cstoolkit.runtime import Runtime, RuntimeConfig, TrainState

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")


def _error(capsys) -> str:
    """The one line ``cstoolkit: error: ...`` on stderr (and nothing else)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cstoolkit: error: ")
    return err[0][len("cstoolkit: error: "):]


def _recipe(tmp_path: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(toy_recipe(tmp_path, **sections)))
    return path


@pytest.fixture
def finished_run(tmp_path) -> Path:
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    return tmp_path / "run"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cstoolkit {__version__}"


# ------------------------------------------------------------------------------ item 7: --device
@NO_GPU
def test_one_device_option_with_one_check_in_every_command(finished_run, tmp_path, capsys):
    items = tmp_path / "items.yaml"
    items.write_text(yaml.safe_dump([{"name": "a", "image": str(EXAMPLE), "content": "balloon", "style": "flat"}]))
    commands = {
        "run": ["run", str(_recipe(tmp_path / "r")), "--overwrite"],
        "generate": ["generate", str(finished_run), "--prompt", "A <c>", "--out", str(tmp_path / "gen")],
        "eval": ["eval", str(finished_run), "--metrics-preset", "tiny"],
        "bench": ["bench", "--data", str(items), "--recipe", str(_recipe(tmp_path / "b")), "--out",
                  str(tmp_path / "bench"), "--metrics-preset", "none"],
        "world bench": ["world", "bench", "--methods", "unziplora", "--out", str(tmp_path / "wb")],
        "world classify": ["world", "classify", str(EXAMPLE)],
    }
    for name, args in commands.items():
        assert main([*args, "--device", "cuda"]) == 2, name
        assert _error(capsys) == "--device: 'cuda' was asked for but this machine has no CUDA GPU; expected auto " \
                                 "or cpu (this machine has: cpu)", name
        assert main([*args, "--device", "tpu"]) == 2, name
        assert _error(capsys) == "--device: unknown device 'tpu'; expected auto, cpu, cuda or cuda:N (this machine " \
                                 "has: cpu)", name
    for folder in ("r/run", "gen", "bench", "wb"):
        assert not (tmp_path / folder).exists(), folder  # nothing written
    assert not (finished_run / "metrics.json").exists()
    assert main(["generate", str(finished_run), "--prompt", "A <c>", "--use", "content", "--device", "cpu",
                 "--out", str(tmp_path / "gen")]) == 0


# ------------------------------------------------------------------------- item 8: placeholders
def test_placeholders_must_stand_for_something(finished_run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--content", str(finished_run), "--prompt", "a <c> in <s> style", "--out",
                 str(out)]) == 2
    assert _error(capsys) == "--prompt: <s> (the style) stands for nothing here (given: <c>); <s> comes from " \
                             "--style RUN; give it or take <s> out of the prompt"
    assert main(["generate", str(finished_run), "--prompt", "a <x> in <s> style with <c>", "--out", str(out)]) == 2
    assert _error(capsys) == "--prompt: unknown placeholder <x>; expected <c> (the content) or <s> (the style); " \
                             "given here: <c>, <s>"
    assert not out.exists()
    # the Python API checks the same
    from cstoolkit.decomposition import Decomposition
    from cstoolkit.errors import UserError

    with pytest.raises(UserError, match="unknown placeholder <x>"):
        Decomposition.load(finished_run / "decomposition").generate("a <c> and <x>", use="content")


# ------------------------------------------------------------ item 13: generate's habits, defaults
def test_generate_defaults_to_the_run_folder_and_the_recipes_image_count(finished_run, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", str(finished_run), "--prompt", "A <c> at night", "--use", "content"]) == 0
    folder = finished_run / "samples" / "content" / "a-c-at-night"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]  # the recipe's num_images: 2
    assert not (tmp_path / "samples").exists()
    assert capsys.readouterr().out.split() == [str(folder / "0.png"), str(folder / "1.png")]
    # only --content: into its run folder too
    assert main(["generate", "--content", str(finished_run), "--prompt", "A <c> by day", "--num-images", "1"]) == 0
    assert (finished_run / "samples" / "content" / "a-c-by-day" / "0.png").is_file()
    # a sampling option of the method by name; its value reaches the method
    before = Image.open(folder / "0.png").getpixel((0, 0))
    assert main(["generate", str(finished_run), "--prompt", "A <c> at night", "--use", "content", "--option",
                 "brightness=10"]) == 0
    assert Image.open(folder / "0.png").getpixel((0, 0)) != before


def test_generate_flags_a_method_cannot_take_are_one_line(finished_run, tmp_path, capsys):
    out = tmp_path / "gen"
    base = ["generate", str(finished_run), "--prompt", "A <c>", "--use", "content", "--out", str(out)]
    for flags, where in ((["--guidance-scale", "5"], "--guidance-scale"), (["--negative-prompt", "blurry"],
                         "--negative-prompt"), (["--height", "64"], "--height"), (["--width", "64"], "--width"),
                         (["--steps", "3"], "--steps")):
        assert main([*base, *flags]) == 2
        assert _error(capsys) == f"{where}: the toy method cannot take it; the toy method's sampling options " \
                                 "are: brightness"
    assert main([*base, "--option", "tau=1"]) == 2
    assert _error(capsys).startswith("--option: unknown sampling option 'tau'; the toy method's")
    assert main([*base, "--option", "brightness=999"]) == 2  # values checked before any model is loaded
    assert _error(capsys).startswith("generate.brightness: ")
    assert not out.exists()


def test_sampling_flags_map_to_each_methods_fields():
    """SDXL methods take guidance_scale/height/width; scale-wise ones cfg and a square resolution."""
    import argparse

    from cstoolkit.cli import _sampling_options
    from cstoolkit.errors import UserError

    def args(**kw):
        base = dict(steps=None, guidance_scale=None, negative_prompt=None, height=None, width=None, options=[])
        return argparse.Namespace(**{**base, **kw})

    sdxl, scalewise = registry.get_method("b_lora"), registry.get_method("csd_var")  # b_lora: SDXL only
    assert _sampling_options(args(guidance_scale=5.0, height=96, width=128), sdxl, "b_lora") == \
        {"guidance_scale": 5.0, "height": 96, "width": 128}
    assert _sampling_options(args(guidance_scale=6.0, height=64), scalewise, "csd_var") == \
        {"cfg": 6.0, "resolution": 64}
    with pytest.raises(UserError, match="makes square images"):
        _sampling_options(args(height=64, width=96), scalewise, "csd_var")
    with pytest.raises(UserError, match="^--steps: the csd_var method cannot take it"):
        _sampling_options(args(steps=3), scalewise, "csd_var")


# -------------------------------------------------------------------------------- bench (6, 10-12)
def _items_with_a_tiny_image(tmp_path: Path) -> Path:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    path = tmp_path / "items.yaml"
    path.write_text(yaml.safe_dump([
        {"name": "good", "image": str(EXAMPLE), "content": "balloon", "style": "flat"},
        {"name": "dot", "image": str(tmp_path / "dot.png"), "content": "dot", "style": "pixel"},
    ]))
    return path


def test_bench_records_a_bad_item_as_failed_and_runs_the_rest(tmp_path, capsys):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"content": ["A <c> on the beach"], "style": ["A dog in <s> style"]}))
    out = tmp_path / "out"
    code = main(["bench", "--data", str(_items_with_a_tiny_image(tmp_path)), "--recipe", str(_recipe(tmp_path)),
                 "--out", str(out), "--prompts", str(prompts), "--metrics-preset", "none", "--num-images", "1",
                 "--set", "params.steps=2", "--set", "runtime.progress=true"])
    assert code == 1  # a failed unit
    rows = {r["item"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["good"]["status"] == "done" and (out / "recipe" / "good" / "decomposition").is_dir()
    assert rows["dot"]["status"] == "failed" and "is 1x1 px" in rows["dot"]["error"]
    assert not (out / "recipe" / "dot").exists()  # nothing half written for it
    captured = capsys.readouterr()
    assert "(2 runs, 1 failed)" in captured.out
    assert "\x1b[A" not in captured.err  # no cursor movements of nested bars in a log
    # item 11: the report's recipes are what the bench ran, not the file's own inputs and output folder
    page = (out / "report.html").read_text()
    recipes = page[page.index("<h2>Recipes</h2>"):]
    assert "steps: 2" in recipes and "num_images: 1" in recipes and "A dog in &lt;s&gt; style" in recipes
    assert "inputs (per item)" in recipes and "dot.png" in recipes and "content: balloon" in recipes
    assert "output_dir" not in recipes and "num_images: 2" not in recipes and "A &lt;c&gt; in &lt;s&gt;" not in recipes


def test_bench_stops_at_once_when_the_recipe_itself_is_wrong(tmp_path, capsys):
    code = main(["bench", "--data", str(_items_with_a_tiny_image(tmp_path)), "--recipe", str(_recipe(tmp_path)),
                 "--out", str(tmp_path / "out"), "--metrics-preset", "none", "--set", "params.stepz=2"])
    assert code == 2 and _error(capsys).startswith("params.stepz: unknown key")
    assert not (tmp_path / "out").exists()


def test_bench_input_files_and_message_wording(tmp_path, capsys):
    items = _items_with_a_tiny_image(tmp_path)
    base = ["bench", "--data", str(items), "--recipe", str(_recipe(tmp_path)), "--out", str(tmp_path / "out"),
            "--metrics-preset", "none"]
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main([*base, "--prompts", str(binary)]) == 2
    assert _error(capsys) == f"--prompts: {binary} is not a UTF-8 text file; expected a YAML file with " \
                             "content:/style: lists"
    assert main([*base[:2], str(binary), *base[3:]]) == 2
    assert _error(capsys).startswith(f"--data: {binary} is not a UTF-8 text file;")
    bad = tmp_path / "bad.yaml"
    bad.write_text("content: ['a dog']\n")
    assert main([*base, "--prompts", str(bad)]) == 2
    assert _error(capsys) == f"{bad}:content[0]: 'a dog' lacks <c>; a content prompt needs <c>"  # no tuple
    assert main([*base, "--metrics-preset", "tinny"]) == 2
    assert _error(capsys) == "--metrics-preset: unknown preset 'tinny'; did you mean 'tiny'? known: paper, " \
                             "paper-clip-l, tiny, none"
    assert not (tmp_path / "out").exists()


def test_missing_run_folder_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["generate", str(missing), "--prompt", "A <c>"]) == 2
    assert _error(capsys) == f"DECOMPOSITION: {missing} does not exist; expected the folder of a finished run"
    assert main(["eval", str(missing), "--metrics-preset", "tiny"]) == 2
    assert _error(capsys).startswith(f"RUN_DIR: {missing} does not exist;")


# ------------------------------------------------------------------------- item 14: tiny labelled
def test_tiny_metric_scores_are_labelled_random(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run), "--metrics-preset", "tiny", "--device", "cpu"]) == 0
    note = "preset 'tiny' = random models for tests: these scores mean nothing"
    assert f"note: {note}" in capsys.readouterr().out
    assert json.loads((finished_run / "metrics.json").read_text())["preset_note"] == note
    assert html.escape(note) in (finished_run / "report.html").read_text()
    # the bench's tables say it too
    res = run_items([BenchItem("a", [EXAMPLE], "balloon", "flat")], load_bench_recipes({"toy": toy_recipe(tmp_path)}),
                    tmp_path / "out", prompts={"content": ["A <c>"]}, num_images=1, progress=False,
                    score_fn=_score_with_note(note))
    assert res.note == note and f"Note: {note}" in (tmp_path / "out" / "means.md").read_text()
    assert html.escape(note) in (tmp_path / "out" / "report.html").read_text()


def _score_with_note(note: str):
    def score(run_dir, item):
        return {"csd_c": 0.999}

    score.note = note
    return score


# ------------------------------------------------------------------ item 12: warm-up and logs
def test_warm_up_steps_have_a_bar_of_their_own(tmp_path, monkeypatch):
    runtime = Runtime(RuntimeConfig(device="cpu"), tmp_path)
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, kw["initial"]
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(runtime, "progress", lambda **kw: Bar(**kw))
    assert list(runtime.train_loop("unziplora", 7, TrainState(), warmup=2)) == list(range(7))
    assert [(b.kw["desc"], b.kw["total"], b.n) for b in bars] == [("unziplora warm-up", 2, 2), ("unziplora", 5, 5)]


def test_log_lines_do_not_land_on_the_progress_bar(tmp_path, capsys):
    import logging

    from tqdm.auto import tqdm

    from cstoolkit import cli

    def handler(args):
        with tqdm(total=3, desc="fit", file=sys.stderr, dynamic_ncols=False, ncols=60) as bar:
            bar.update(1)
            logging.getLogger("cstoolkit.phases").info("phase fit/warmup")
            bar.update(1)
        return 0

    console = logging.StreamHandler(sys.stderr)  # what basicConfig gives the command outside pytest
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(console)
    cli.COMMANDS["show-recipe"], saved = handler, cli.COMMANDS["show-recipe"]
    try:
        assert main(["show-recipe", "x.yaml"]) == 0
    finally:
        cli.COMMANDS["show-recipe"] = saved
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    line = next(x for x in err.replace("\r", "\n").splitlines() if "phase fit/warmup" in x)
    assert line == "INFO: phase fit/warmup"  # on a line of its own, not after the bar's text


# ----------------------------------------------------------------------------- item 17: packaging
def test_every_data_folder_is_a_declared_package():
    """setuptools warns for each folder with data files that ``packages`` does not list."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = set(cfg.get("options", "packages").split())
    package_dir = dict(line.split("=") for line in cfg.get("options", "package_dir").split("\n") if "=" in line)
    package_dir = {k.strip(): v.strip() for k, v in package_dir.items()}
    missing = []
    for package, folder in package_dir.items():
        for d in (ROOT / folder).rglob("*"):
            if not d.is_dir() or "__pycache__" in d.parts or not any(p.is_file() for p in d.iterdir()):
                continue
            name = ".".join([package, *d.relative_to(ROOT / folder).parts])
            if name not in packages:
                missing.append(name)
    assert missing == []


# ---------------------------------------------------------------- item 19: a checkout, not installed
def test_builtin_plugins_register_from_a_checkout_on_pythonpath(tmp_path):
    """``python -S`` with the checkout and the dependencies on PYTHONPATH: no .pth file runs, so the
    editable install's import mapping is absent, as in a plain clone."""
    paths = [str(ROOT)] + [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "from cstoolkit import registry; print(sorted(registry.methods())); print(sorted(registry.backbones()))"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    methods, backbones = (eval(line) for line in out.stdout.strip().splitlines())  # noqa: S307 - our own print
    assert {"unziplora", "csd_var", "style_share"} <= set(methods) and {"sdxl", "switti"} <= set(backbones)


def test_no_method_registered_says_why(monkeypatch):
    from cstoolkit.errors import UserError

    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_discovered", True)
    monkeypatch.setattr(registry, "_import_failures", {"cstoolkit.methods": "No module named 'cstoolkit.methods'"})
    with pytest.raises(UserError) as exc:
        registry.get_method("unziplora")
    assert str(exc.value) == (
        "method: unknown method 'unziplora'; no method is registered at all: the package cstoolkit.methods could "
        "not be imported (No module named 'cstoolkit.methods') and no installed package adds one (entry point "
        "group cstoolkit.methods); install cstoolkit (pip install -e .) or run from its source checkout")


@pytest.mark.parametrize("command, group", [("list-methods", "cstoolkit.methods"),
                                            ("list-backbones", "cstoolkit.backbones")])
def test_list_commands_with_nothing_registered_say_why(monkeypatch, capsys, command, group):
    """Issue 22 item 5: no plugin registered (the package's plugins not importable, no entry points) is one
    line saying why, not an empty table."""
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_BACKBONES", {})
    monkeypatch.setattr(registry, "_discovered", True)
    monkeypatch.setattr(registry, "_import_failures", {})
    assert main([command]) == 2
    kind = "method" if group == "cstoolkit.methods" else "backbone"
    assert _error(capsys) == (
        f"{command}: no {kind} is registered at all: the package {group} registered none and no "
        f"installed package adds one (entry point group {group}); install cstoolkit (pip install -e .) or run "
        "from its source checkout")


def _all_parsers(parser, path=()):
    """Every parser of the CLI tree with the words that reach it (``world bench`` ...)."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_help_of_every_command_formats():
    """`cstoolkit ... --help` works for each command: a bare ``%`` in a help string (``95 % intervals``) used to
    crash `cstoolkit world --help` with a TypeError inside argparse."""
    from cstoolkit.cli import _parser

    seen = []
    for path, parser in _all_parsers(_parser()):
        text = parser.format_help()
        assert parser.prog.split()[-1] in text.split("\n")[0], (path, text[:80])
        seen.append(" ".join(path))
    assert {"", "world", "world bench", "world compare", "run"} <= set(seen), seen
