"""Benchmarks: many decompositions over a dataset, scored, sharded over processes.

``cstoolkit bench --data DIR --recipe R [--recipe R2 ...] --out OUT`` runs every recipe on every
item, each as an ordinary run folder ``OUT/<recipe>/<item>/``, scores it, and writes
``OUT/results.csv`` (one row per recipe and item), ``OUT/means.json`` and ``OUT/means.md``
(per-recipe means, CSD-VAR Table 1's columns) and ``OUT/report.html``.

The Python API is :func:`run_items`; other benchmarks (e.g. a synthetic world) pass their own items
and a scorer. Work units are the (item, recipe) pairs in a fixed order; under ``torchrun`` /
``accelerate launch`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) each process takes the next unit that
no other process of the same launch has claimed (an exclusive file under ``OUT/.claims/``), so each runs
exactly once and a process with short units takes more of them (over several hosts: unit ``i`` to rank
``i % WORLD_SIZE``). A finished unit leaves ``bench.json`` in its run
folder (with a fingerprint of its resolved recipe and scorer); a rerun skips it, resumes a unit that
has checkpoints and restarts one that has none. Rank 0 gathers every rank's rows (torch.distributed,
gloo) and writes the tables.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .errors import UserError
from .io import atomic_write, slugify, write_json
from .method import CONTENT_TOKEN, STYLE_TOKEN, USES
from .metrics import LABELS, METRICS, preset_note

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "csd100_prompts.yaml"
MARKER = "bench.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: ``score_fn(run_dir, item) -> {metric: value}``: scores of one finished run
ScoreFn = Callable[[Path, "BenchItem"], Mapping[str, Any]]


@dataclass
class BenchItem:
    """One thing to decompose: image(s), the class word of the content, the style words.

    ``style_images`` default to ``images`` (one image holds both, as in CSD-100); ``inputs`` are
    extra recipe inputs set as they are (after the generic filling, see :func:`item_recipe`).
    """

    name: str
    images: list[Path]
    content: str = ""
    style: str = ""
    style_images: list[Path] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)

    def words(self) -> dict[str, str]:
        return {k: v for k, v in ((CONTENT_TOKEN, self.content), (STYLE_TOKEN, self.style)) if v}


# ------------------------------------------------------------------------------------ items
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_items(source: str | Path) -> list[BenchItem]:
    """Items of a folder in the CSD-100 layout (``<content>+<style>/00.jpg``, optionally under
    ``test/``; underscores in names become spaces) or of a YAML list
    (``- {name:, image: or images:, content:, style:, style_images:, inputs:}``, paths relative to
    the file)."""
    src = Path(source).expanduser().resolve()
    if src.is_file():
        return _items_from_yaml(src)
    if not src.is_dir():
        raise UserError("--data", f"not found: {src}", "expected a folder of <content>+<style>/ folders or a YAML list")
    root = src
    if not any(d.is_dir() and "+" in d.name for d in root.iterdir()) and (root / "test").is_dir():
        root = root / "test"
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and "+" in p.name):
        images = _images_in(d) or (_images_in(d / "imgs") if (d / "imgs").is_dir() else [])
        if not images:
            log.warning("bench: %s holds no image; skipped", d)
            continue
        content, _, style = d.name.partition("+")
        items.append(BenchItem(d.name, images, content.replace("_", " ").strip(), style.replace("_", " ").strip()))
    if not items:
        raise UserError("--data", f"{src} holds no <content>+<style>/ folder with an image",
                        "expected the CSD-100 layout, e.g. balloon+mosaic/00.jpg")
    return items


def _read_yaml_file(path: Path, where: str, expected: str) -> Any:
    """A YAML file's data; an unreadable, non-UTF-8 or invalid file stops with one line at ``where``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(where, f"{path} is not a UTF-8 text file", expected) from None
    except OSError as exc:
        raise UserError(where, f"cannot read {path} ({exc.strerror or exc})", expected) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(where, f"{path} is not valid YAML{line} ({getattr(exc, 'problem', None) or exc})",
                        expected) from None


def _items_from_yaml(path: Path) -> list[BenchItem]:
    data = _read_yaml_file(path, "--data", "expected a YAML list of items or a folder in the CSD-100 layout")
    if not isinstance(data, list) or not data:
        raise UserError(str(path), "not a list of items",
                        "expected `- {name: ..., image: ..., content: ..., style: ...}`")
    items, names = [], set()
    for i, entry in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(where, f"got {entry!r}", "expected a mapping")
        unknown = set(entry) - {"name", "image", "images", "content", "style", "style_image", "style_images", "inputs"}
        if unknown:
            raise UserError(f"{where}.{sorted(unknown)[0]}", "unknown key",
                            "expected name, image(s), content, style, style_image(s), inputs")

        images = _entry_paths(entry, ("image", "images"), path.parent, where)
        if not images:
            raise UserError(f"{where}.image", "missing", "expected an image path")
        name = slugify(str(entry.get("name") or images[0].stem), 80)
        if name in names:
            raise UserError(f"{where}.name", f"duplicate item name '{name}'", "expected unique names")
        names.add(name)
        items.append(BenchItem(name, images, str(entry.get("content") or ""), str(entry.get("style") or ""),
                               _entry_paths(entry, ("style_image", "style_images"), path.parent, where),
                               dict(entry.get("inputs") or {})))
    return items


def _entry_paths(entry: Mapping[str, Any], keys: Sequence[str], base: Path, where: str) -> list[Path]:
    out: list[Path] = []
    for k in keys:
        v = entry.get(k)
        for p in (v if isinstance(v, list) else [v] if v else []):
            q = Path(str(p)).expanduser()
            q = q if q.is_absolute() else (base / q).resolve()
            if not q.is_file():
                raise UserError(f"{where}.{k}", f"file not found: {q}", "expected an image file")
            out.append(q)
    return out


def load_prompts(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark prompts (``content:``/``style:``/``both:`` lists with ``<c>``/``<s>``, optional
    ``num_images`` and ``seed``); default: the CSD-100 protocol shipped with the package."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS
    if not p.is_file():
        raise UserError("--prompts", f"file not found: {p}", "expected a YAML file with content:/style: lists")
    data = _read_yaml_file(p, "--prompts", "expected a YAML file with content:/style: lists")
    if not isinstance(data, dict):
        raise UserError(str(p), "not a mapping", "expected content: [...] and style: [...]")
    for key in data:
        if key not in (*USES, "num_images", "seed"):
            raise UserError(f"{p}:{key}", "unknown key", "expected content, style, both, num_images, seed")
    out: dict[str, Any] = {k: data[k] for k in ("num_images", "seed") if data.get(k) is not None}
    for use in USES:
        prompts = data.get(use) or []
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise UserError(f"{p}:{use}", "not a list of prompts", "expected a list of strings")
        need = {"content": (CONTENT_TOKEN,), "style": (STYLE_TOKEN,), "both": (CONTENT_TOKEN, STYLE_TOKEN)}[use]
        for i, x in enumerate(prompts):
            if not all(t in x for t in need):
                raise UserError(f"{p}:{use}[{i}]", f"'{x}' lacks {' or '.join(need)}",
                                f"a {use} prompt needs {' and '.join(need)}")
        if prompts:
            out[use] = list(prompts)
    if not any(u in out for u in USES):
        raise UserError(str(p), "no prompts", "expected content: [...] and/or style: [...]")
    return out


# ---------------------------------------------------------------------------------- recipes
@dataclass
class BenchRecipe:
    """A recipe of the benchmark: its name (run folder), raw data and folder of relative paths."""

    name: str
    data: dict[str, Any]
    base_dir: Path


def load_bench_recipes(sources: Sequence[str | Path | Mapping[str, Any]] | Mapping[str, Any],
                       overrides: Sequence[str] = ()) -> list[BenchRecipe]:
    """Recipes from paths (named after the file) or ``{name: path or mapping}``, with ``--set`` overrides."""
    from .recipe import apply_overrides, read_yaml

    pairs = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    out: list[BenchRecipe] = []
    for name, src in pairs:
        if isinstance(src, Mapping):
            data, base, default = dict(src), Path.cwd(), str(src.get("method", "recipe"))
        else:
            data, base, default = read_yaml(src), Path(src).resolve().parent, Path(src).stem
        name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(name or default)).strip("-.")[:80] or "recipe"
        while any(r.name == name for r in out):
            name += "-2"
        mine = []
        for o in overrides:  # "NAME:key=value" applies to recipe NAME only
            key = o.split("=", 1)[0]
            target, sep, rest = key.partition(":")
            if not sep:
                mine.append(o)
            elif target == name:
                mine.append(rest + o[len(key):])
        out.append(BenchRecipe(name, apply_overrides(data, mine), base))
    if not out:
        raise UserError("--recipe", "no recipe given", "expected at least one --recipe")
    for o in overrides:
        target, sep, _ = o.split("=", 1)[0].partition(":")
        if sep and target not in {r.name for r in out}:
            raise UserError("--set", f"'{o}' names no recipe of this benchmark",
                            f"expected RECIPE:key=value with RECIPE one of {', '.join(r.name for r in out)}")
    return out


def _is_list_field(f: dataclasses.Field) -> bool:
    return f.default_factory is list or str(f.type).startswith(("list", "List", "Sequence", "tuple"))  # type: ignore[misc]


def item_recipe(recipe: BenchRecipe, item: BenchItem, out_dir: Path, prompts: Mapping[str, Any],
                num_images: int | None = None) -> dict[str, Any]:
    """The recipe of one unit: the item filled into the method's inputs, the benchmark's prompts.

    Inputs are filled by field, generically: a top-level image field gets the item's style images
    if its name contains ``style``, else its images (a list field all of them, a single field the
    first); text fields named ``content`` and ``style`` get the class and style words; the item's
    ``inputs`` are set last. ``generate`` keeps the recipe's sampling options and takes the
    benchmark's prompts for the uses the method has.
    """
    from . import registry

    data = json.loads(json.dumps(recipe.data))  # deep copy of plain data
    method_cls = registry.get_method(str(data.get("method")))
    inputs = dict(data.get("inputs") or {})
    for f in dataclasses.fields(method_cls.Inputs):
        if f.metadata.get("image"):
            paths = item.style_images if "style" in f.name and item.style_images else item.images
            inputs[f.name] = [str(p) for p in paths] if _is_list_field(f) else str(paths[0])
        elif f.name == "content" and item.content:
            inputs[f.name] = item.content
        elif f.name == "style" and item.style:
            inputs[f.name] = item.style
    inputs.update(item.inputs)
    data["inputs"] = inputs
    gen = {k: v for k, v in (data.get("generate") or {}).items() if k not in USES}
    for use in method_cls.uses:
        if prompts.get(use):
            gen[use] = list(prompts[use])
    if not any(u in gen for u in USES):
        raise UserError(f"recipe {recipe.name}", f"method '{method_cls.name}' generates {'/'.join(method_cls.uses)}",
                        f"expected prompts for one of these uses (the prompts file has {', '.join(prompts)})")
    n = num_images if num_images is not None else prompts.get("num_images")
    if n is not None:
        gen["num_images"] = int(n)
    if prompts.get("seed") is not None:
        gen["seed"] = prompts["seed"]
    data["generate"] = gen
    data["runtime"] = {**(data.get("runtime") or {}), "output_dir": str(out_dir)}
    return data


# ------------------------------------------------------------------------------ distribution
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def dist_init() -> DistInfo:
    """Rank and world size from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, accelerate launch);
    joins a gloo process group when there is more than one process, and picks the local GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    info = DistInfo(rank, world, local)
    if world <= 1:
        return info
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    else:  # processes on one machine share its cores
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    if not dist.is_initialized():
        # gloo: the group only gathers rows at the end; units can take days, so the wait may too. One group for
        # the life of the process: a bench with several run_items calls (world bench: one per group of recipes)
        # reuses it, as a group destroyed and made again on the same store failed to connect or hung.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        atexit.register(_destroy_group)
    return info


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _claimer(out: Path, info: DistInfo) -> Callable[[Any, Any], bool]:
    """``claim(recipe, item)``: True for the one process of this launch that takes the unit (always, alone).

    Claims are exclusive files under ``out/.claims/<launch>/``; ``<launch>`` is rank 0's token, shared over the
    process group, so the claims of an earlier (stopped) launch on the same folder do not hold. Over several
    hosts (no folder is assumed shared) unit ``i`` of the scan goes to rank ``i % WORLD_SIZE`` instead; the
    scan visits every unit in the same order on every rank."""
    if info.world <= 1:
        return lambda recipe, item: True
    if int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world))) != info.world:  # several hosts: no shared folder
        scanned = itertools.count()
        return lambda recipe, item: next(scanned) % info.world == info.rank
    import torch.distributed as dist

    token = [f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}" if info.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = out / ".claims" / str(token[0])
    folder.mkdir(parents=True, exist_ok=True)

    def claim(recipe: Any, item: Any) -> bool:
        try:
            fd = os.open(folder / f"{recipe.name}--{item.name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(info.rank).encode())
        os.close(fd)
        return True

    return claim


def _gather(rows: list[dict[str, Any]], info: DistInfo) -> list[dict[str, Any]]:
    if info.world <= 1:
        return rows
    import torch.distributed as dist

    everything: list[Any] = [None] * info.world
    dist.all_gather_object(everything, rows)
    return [r for part in everything for r in (part or [])]


def _is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# --------------------------------------------------------------------------------- running
def _fingerprint(recipe_dict: Mapping[str, Any], scorer: str) -> str:
    blob = json.dumps({"recipe": recipe_dict, "scorer": scorer}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def failed_row(recipe: BenchRecipe, item: BenchItem, error: str | None = None) -> dict[str, Any]:
    """The row of a unit that has not (yet) finished: status ``failed``, no scores."""
    row: dict[str, Any] = {"method": recipe.name, "item": item.name, "status": "failed",
                           **{m: None for m in METRICS}, "seconds": None,
                           "run_dir": f"{recipe.name}/{item.name}", "input": str(item.images[0])}
    if error is not None:
        row["error"] = error
    return row


def check_units(recipes: Sequence[BenchRecipe], items: Sequence[BenchItem], out: Path, prompts: Mapping[str, Any],
                num_images: int | None = None) -> dict[tuple[str, str], str]:
    """Check every unit's recipe and inputs before anything runs; ``{(recipe, item): error}`` of the bad ones.

    A recipe that fails on every item in the same way is wrong itself (a typo, a bad ``--set``):
    its :class:`UserError` stops the benchmark at once. A unit that fails on its own (a bad image of
    one item) is returned, to be recorded as ``failed`` while the others run.
    """
    from .api import Decomposer
    from .recipe import parse_recipe

    bad: dict[tuple[str, str], str] = {}
    for r in recipes:
        errors: list[UserError] = []
        for it in items:
            try:
                Decomposer(parse_recipe(item_recipe(r, it, out / r.name / it.name, prompts, num_images),
                                        r.base_dir)).check_inputs()
            except UserError as exc:
                errors.append(exc)
                bad[(r.name, it.name)] = f"{exc.__class__.__name__}: {exc}"
        if len(errors) == len(items) and len({str(e) for e in errors}) == 1:
            raise errors[0]
    return bad


def ran_recipe(recipe: BenchRecipe, items: Sequence[BenchItem], out: Path, prompts: Mapping[str, Any],
               num_images: int | None = None) -> dict[str, Any]:
    """What the benchmark ran of ``recipe``: its values shared by every item (the recipe after
    ``--set``, the benchmark's prompts and image count), and per item the inputs it filled in."""
    per_item: dict[str, Any] = {}
    shared: dict[str, Any] | None = None
    for it in items:
        try:
            data = item_recipe(recipe, it, out / recipe.name / it.name, prompts, num_images)
        except UserError as exc:
            per_item[it.name] = {"error": str(exc)}
            continue
        per_item[it.name] = data.pop("inputs", {})
        data.get("runtime", {}).pop("output_dir", None)
        shared = shared or data
    out_data = dict(shared or {})
    gen = dict(out_data.get("generate") or {})
    for use in USES:  # long prompt lists: how many, not every one (the prompts file lists them)
        if len(gen.get(use) or []) > 3:
            gen[use] = [*gen[use][:3], f"... {len(gen[use]) - 3} more"]
    if gen:
        out_data["generate"] = gen
    runtime = out_data.get("runtime")
    if runtime is not None and not runtime:
        out_data.pop("runtime")
    out_data["inputs (per item)"] = per_item
    return out_data


def run_unit(recipe: BenchRecipe, item: BenchItem, out: Path, prompts: Mapping[str, Any], *,
             num_images: int | None = None, score_fn: ScoreFn | None = None, scorer_id: str = "",
             only_if_done: bool = False) -> dict[str, Any] | None:
    """Run (or skip, if finished) one recipe on one item; returns its row and writes ``bench.json``.

    ``only_if_done``: return the row of a unit finished earlier with the same recipe and scorer, else None
    (nothing runs; past a ``--time-limit``)."""
    from .api import Decomposer
    from .recipe import parse_recipe

    run_dir = out / recipe.name / item.name
    row = failed_row(recipe, item)
    parsed = parse_recipe(item_recipe(recipe, item, run_dir.resolve(), prompts, num_images), recipe.base_dir)
    fingerprint = _fingerprint(parsed.to_dict(), scorer_id)
    marker = run_dir / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("status") == "done" and done.get("fingerprint") == fingerprint:
            return {**done["row"], "skipped": True}
        if only_if_done:
            return None
        marker.unlink()
    elif only_if_done:
        return None
    t0, started = time.perf_counter(), time.time()
    try:
        finished = ((run_dir / "run.json").is_file() and json.loads((run_dir / "run.json").read_text())
                    .get("status") == "finished" and (run_dir / "recipe.yaml").is_file()
                    and (run_dir / "recipe.yaml").read_text() == parsed.to_yaml())
        if not finished:
            resume = (run_dir / "checkpoints").is_dir() and (run_dir / "recipe.yaml").is_file() \
                and (run_dir / "recipe.yaml").read_text() == parsed.to_yaml()
            dec = Decomposer(parsed, resume=resume, overwrite=not resume)
            dec.run()
            del dec
            _free_memory()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if score_fn is not None:
            scores = dict(score_fn(run_dir, item))
            row.update({m: scores.get(m) for m in METRICS})
            row.update({k: v for k, v in scores.items() if k not in METRICS and isinstance(v, (int, float, str))})
        row["status"] = "done"
    except Exception as exc:  # one unit's failure (bad input, divergence, a bug) must not stop the others
        row["error"] = f"{exc.__class__.__name__}: {exc}"
        log.error("bench: %s on %s failed: %s", recipe.name, item.name, row["error"])
        _free_memory()
    write_json(marker, {"status": row["status"], "fingerprint": fingerprint, "row": row,
                        "started": started, "finished": time.time()})
    return row


def metrics_scorer(preset: str = "paper", weights: Mapping[str, str] | None = None,
                   device: str | None = None, progress: bool = True) -> ScoreFn:
    """A scorer that runs :func:`cstoolkit.evaluate.evaluate_run` (models loaded once, on first use)."""
    from .evaluate import evaluate_run
    from .metrics import MetricModels
    from .report import write_run_report

    models: list[MetricModels] = []

    def score(run_dir: Path, item: BenchItem) -> Mapping[str, Any]:
        if not models:
            models.append(MetricModels(preset, weights, device))
        result = evaluate_run(run_dir, models[0], words=item.words(), progress=progress)
        write_run_report(run_dir)
        return {m: result.get(m) for m in METRICS}

    score.scorer_id = f"metrics:{preset}:{sorted((weights or {}).items())}"  # type: ignore[attr-defined]
    score.note = preset_note(preset)  # type: ignore[attr-defined]
    return score


@dataclass
class BenchResult:
    """Rows (one per recipe and item; all of them on rank 0, this rank's elsewhere) and means."""

    out: Path
    rows: list[dict[str, Any]]
    means: dict[str, dict[str, Any]]
    rank: int = 0
    world: int = 1
    #: what the scores are worth when that needs saying (the ``tiny`` preset's random models)
    note: str | None = None


def run_items(items: Sequence[BenchItem], recipes: Sequence[BenchRecipe], out: str | Path, *,
              prompts: Mapping[str, Any] | None = None, num_images: int | None = None,
              score_fn: ScoreFn | None = None, progress: bool = True, title: str = "cstoolkit bench",
              time_limit: float | None = None) -> BenchResult:
    """Run every recipe on every item (sharded over processes), score, and write the tables.

    ``time_limit`` (seconds, ``--time-limit``): a process starts no new unit after that long (finished units
    of earlier runs still count); the units it did not start are left out of the tables (``not_run`` in the
    log) and a rerun with the same folder runs them.

    ``prompts``: as :func:`load_prompts` returns (default: the CSD-100 protocol). ``score_fn``: the
    scorer (see :func:`metrics_scorer`); ``None`` runs without scores. Returns on every rank; rank 0's
    result holds all rows and wrote ``results.csv``, ``means.json``, ``means.md`` and ``report.html``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    prompts = dict(prompts) if prompts is not None else load_prompts()
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise UserError("items", "duplicate item names", "expected unique names")
    units = [(r, it) for it in items for r in recipes]
    # check every unit's recipe and images before anything runs: a bad recipe stops here, at once; a
    # bad item makes its units failed rows (logged), and the others run
    invalid = check_units(recipes, items, out, prompts, num_images)
    for (r_name, it_name), error in invalid.items():
        log.error("bench: %s on %s cannot run: %s", r_name, it_name, error)
    info = dist_init()
    claim = _claimer(out, info)
    scorer_id = str(getattr(score_fn, "scorer_id", getattr(score_fn, "__qualname__", ""))) if score_fn else ""
    rows: list[dict[str, Any]] = []
    if time_limit is not None and time_limit < 0:
        raise UserError("--time-limit", f"got {time_limit}", "expected a number of seconds >= 0")
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    not_run = 0
    # a bar above each run's own bars on a terminal; elsewhere (a log file) one log line per unit, as
    # nested bars would fill the log with cursor movements
    tty = progress and _is_tty()
    bar = tqdm(total=len(units), desc=f"bench [{info.rank}/{info.world}]" if info.world > 1 else "bench",
               disable=not tty, dynamic_ncols=True, position=info.rank if info.world > 1 else None)
    mine = 0
    try:
        for k, (recipe, item) in enumerate(units):
            bar.update(1)
            if not claim(recipe, item):
                continue
            mine += 1
            if deadline is not None and time.perf_counter() > deadline:  # past the limit: finished units only
                done = run_unit(recipe, item, out, prompts, num_images=num_images, score_fn=score_fn,
                                scorer_id=scorer_id, only_if_done=True)
                if done is None:
                    not_run += 1
                else:
                    rows.append(done)
                continue
            bar.set_postfix_str(f"{recipe.name} / {item.name}", refresh=True)
            if progress and not tty:
                log.info("bench: unit %d/%d: %s / %s", k + 1, len(units), recipe.name, item.name)
            if (recipe.name, item.name) in invalid:
                rows.append(failed_row(recipe, item, invalid[(recipe.name, item.name)]))
                continue
            rows.append(run_unit(recipe, item, out, prompts, num_images=num_images, score_fn=score_fn,
                                 scorer_id=scorer_id))
    finally:
        bar.close()
    if not_run:
        log.warning("bench: time limit reached: %d of this process's %d units not run (a rerun runs them)",
                    not_run, mine)
    all_rows = _gather(rows, info)
    means: dict[str, dict[str, Any]] = {}
    if info.rank == 0:
        order = {(r.name, it.name): k for k, (r, it) in enumerate(units)}
        all_rows.sort(key=lambda r: order.get((r["method"], r["item"]), len(order)))
        means = write_tables(out, all_rows, [r.name for r in recipes], title=title,
                             recipes={r.name: ran_recipe(r, items, out, prompts, num_images) for r in recipes},
                             note=getattr(score_fn, "note", None))
    if info.world > 1:  # every rank leaves together (the group stays for the next call, see dist_init)
        import torch.distributed as dist

        dist.barrier()
    return BenchResult(out, all_rows if info.rank == 0 else rows, means, info.rank, info.world,
                       getattr(score_fn, "note", None))


# ----------------------------------------------------------------------------------- tables
def mean_rows(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: the mean of each metric over its finished items, ``n`` finished, ``failed``."""
    means: dict[str, dict[str, Any]] = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        done = [r for r in mine if r.get("status") == "done"]
        entry: dict[str, Any] = {}
        for k in METRICS:
            vals = [r[k] for r in done if isinstance(r.get(k), (int, float))]
            entry[k] = sum(vals) / len(vals) if vals else None
        entry["n"] = len(done)
        entry["failed"] = len(mine) - len(done)
        means[m] = entry
    return means


def write_tables(out: Path, rows: Sequence[Mapping[str, Any]], methods: Sequence[str], *,
                 title: str = "cstoolkit bench", recipes: Mapping[str, Any] | None = None,
                 note: str | None = None) -> dict[str, dict[str, Any]]:
    """``results.csv``, ``means.json``, ``means.md`` and ``report.html`` under ``out`` (``note``: a line
    under the tables, e.g. that the scores come from random models)."""
    from .report import write_bench_report

    out.mkdir(parents=True, exist_ok=True)
    cols = ["method", "item", "status", *METRICS, "seconds", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write(out / "results.csv", lambda fh: fh.write(buf.getvalue()), mode="w")
    means = mean_rows(rows, methods)
    write_json(out / "means.json", means)
    atomic_write(out / "means.md", lambda fh: fh.write(means_markdown(means, note)), mode="w")
    try:
        write_bench_report(out, rows, means, title=title, recipes=recipes, note=note)
    except Exception as exc:  # the tables matter more than the page
        log.warning("could not write report.html: %s", exc)
    return means


def means_markdown(means: Mapping[str, Mapping[str, Any]], note: str | None = None) -> str:
    """A markdown table in CSD-VAR Table 1's column order (``note`` below it)."""
    head = "| method | " + " | ".join(f"{LABELS[m]} ↑" for m in METRICS) + " | items | failed |"
    sep = "|---|" + "---:|" * (len(METRICS) + 2)
    lines = [head, sep]
    for name, row in means.items():
        vals = " | ".join("–" if row.get(m) is None else f"{row[m]:.3f}" for m in METRICS)
        lines.append(f"| {name} | {vals} | {row.get('n', 0)} | {row.get('failed', 0)} |")
    if note:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def bench(data: str | Path, recipes: Sequence[str | Path], out: str | Path, *, overrides: Sequence[str] = (),
          prompts: str | Path | None = None, num_images: int | None = None, metrics_preset: str | None = "paper",
          metric_weights: Mapping[str, str] | None = None, progress: bool = True,
          device: str | None = None, time_limit: float | None = None) -> BenchResult:
    """What ``cstoolkit bench`` does: items from ``data``, recipes from files, the metrics scorer.

    ``device`` (``--device``): every run's ``runtime.device`` and the metric models' device.
    """
    from .device import check_device, runtime_device
    from .metrics import PRESETS

    if num_images is not None and num_images < 1:
        raise UserError("--num-images", f"got {num_images}", "expected at least 1")
    if metrics_preset is not None and metrics_preset not in PRESETS:
        import difflib

        close = difflib.get_close_matches(metrics_preset, [*PRESETS, "none"], n=1)
        raise UserError("--metrics-preset", f"unknown preset '{metrics_preset}'",
                        (f"did you mean '{close[0]}'? " if close else "") + f"known: {', '.join(PRESETS)}, none")
    run_dev = runtime_device(device)
    metric_dev = check_device(device)
    overrides = [*overrides, *([f"runtime.device={run_dev}"] if run_dev is not None else [])]
    items = load_items(data)
    bench_recipes = load_bench_recipes(recipes, overrides)
    score_fn = metrics_scorer(metrics_preset, metric_weights, None if metric_dev in (None, "auto") else metric_dev,
                              progress=False) if metrics_preset else None
    prompt_data = load_prompts(prompts)  # before the metric weights are looked for (maybe online)
    if score_fn is not None:
        from .metrics import MetricModels

        MetricModels(metrics_preset, metric_weights).check()  # a bad preset or missing weights stop here
    return run_items(items, bench_recipes, out, prompts=prompt_data, num_images=num_images,
                     score_fn=score_fn, progress=progress, time_limit=time_limit)
