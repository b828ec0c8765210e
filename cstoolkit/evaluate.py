"""Scoring a run folder: ``cstoolkit eval RUN_DIR`` -> ``metrics.json`` (the CLI then refreshes the report).

The references are the run's input images, read from its resolved recipe: every top-level input
field that holds images (its field metadata says ``image``). A field whose name contains
``content`` gives the content references, one whose name contains ``style`` the style references,
any other (``image``) both. Content metrics (CSD-C, CLIP-I) are averaged over the content samples,
style metrics (CSD-S, DINO) over the style samples, and CLIP-T over every sample: the mean of the
per-use means. CLIP-T's text is the prompt with ``<c>``/``<s>`` replaced by the input's words
(``inputs.content`` / ``inputs.style``; else the decomposition's placeholders).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError
from .io import load_image, slugify, write_json
from .method import CONTENT_TOKEN, STYLE_TOKEN, USES
from .metrics import COUNTED_ON, LABELS, METRICS, MetricModels, preset_note

METRICS_FILE = "metrics.json"


@dataclass
class Sample:
    """One generated image of a run."""

    path: Path
    use: str
    prompt: str


@dataclass
class RunInputs:
    """What a run's samples are scored against."""

    references: dict[str, list[Path]] = field(default_factory=dict)  # "content"/"style" -> image paths
    words: dict[str, str] = field(default_factory=dict)  # "<c>"/"<s>" -> words for CLIP-T


def read_run_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.yaml"
    if not run_dir.exists():
        raise UserError("RUN_DIR", f"{run_dir} does not exist", "expected a folder written by `cstoolkit run`")
    if not path.is_file():
        raise UserError("RUN_DIR", f"{run_dir} has no recipe.yaml", "expected a folder written by `cstoolkit run`")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise UserError(str(path), "not a recipe", "expected a mapping")
    return data


def run_inputs(recipe: Mapping[str, Any], run_dir: Path | None = None) -> RunInputs:
    """References and placeholder words of a resolved recipe (see the module docstring)."""
    from . import registry

    method_cls = registry.get_method(recipe["method"])
    inputs = recipe.get("inputs") or {}
    general: list[Path] = []
    refs: dict[str, list[Path]] = {"content": [], "style": []}
    for f in dataclasses.fields(method_cls.Inputs):
        if not f.metadata.get("image") or inputs.get(f.name) in (None, "", []):
            continue
        value = inputs[f.name]
        paths = [Path(p) for p in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(p, str)]
        if run_dir is not None:
            paths = [p if p.is_absolute() else (run_dir / p) for p in paths]
        target = refs["content"] if "content" in f.name else refs["style"] if "style" in f.name else general
        target.extend(paths)
    for use in ("content", "style"):
        refs[use] = refs[use] or general or refs["style" if use == "content" else "content"]
    words: dict[str, str] = {}
    if run_dir is not None and (run_dir / "decomposition" / "manifest.json").is_file():
        words.update(json.loads((run_dir / "decomposition" / "manifest.json").read_text()).get("placeholders", {}))
    for token, name in ((CONTENT_TOKEN, "content"), (STYLE_TOKEN, "style")):
        if isinstance(inputs.get(name), str) and inputs[name].strip():
            words[token] = inputs[name].strip()
    return RunInputs(refs, words)


def fill_words(prompt: str, words: Mapping[str, str]) -> str:
    """'a <c> in <s> style' -> 'a balloon in watercolor style' (unknown placeholders dropped)."""
    text = prompt
    for token in (CONTENT_TOKEN, STYLE_TOKEN):
        text = text.replace(token, words.get(token, ""))
    return re.sub(r"\s+", " ", text).strip()


def collect_samples(run_dir: Path, recipe: Mapping[str, Any]) -> list[Sample]:
    """The images under ``samples/<use>/<prompt-slug>/<i>.png``, with their prompts from the recipe."""
    gen = recipe.get("generate") or {}
    out: list[Sample] = []
    for use in USES:
        folder = run_dir / "samples" / use
        if not folder.is_dir():
            continue
        by_slug = {slugify(p): p for p in gen.get(use) or []}
        order = {slugify(p): i for i, p in enumerate(gen.get(use) or [])}
        for sub in sorted(folder.iterdir(), key=lambda d: (order.get(d.name, len(order)), d.name)):
            if not sub.is_dir():
                continue
            files = [p for p in sub.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
            for p in sorted(files, key=lambda p: (int(p.stem) if p.stem.isdigit() else math.inf, p.name)):
                out.append(Sample(p, use, by_slug.get(sub.name, sub.name.replace("-", " "))))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(images: list[dict[str, Any]]) -> dict[str, Any]:
    """The five headline numbers and the per-use means of per-image scores."""
    by_use: dict[str, dict[str, Any]] = {}
    for use in USES:
        rows = [r for r in images if r["use"] == use]
        if rows:
            by_use[use] = {"n": len(rows), **{m: _mean([r[m] for r in rows if r.get(m) is not None]) for m in METRICS}}
    out: dict[str, Any] = {}
    for m in METRICS:
        means = [by_use[u][m] for u in COUNTED_ON[m] if u in by_use and by_use[u][m] is not None]
        out[m] = _mean(means)
    out["by_use"] = by_use
    return out


def evaluate_run(run_dir: str | Path, models: MetricModels | None = None, *, preset: str = "paper",
                 weights: Mapping[str, str] | None = None, device: str | None = None,
                 words: Mapping[str, str] | None = None, progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Score every sample of a run and write ``metrics.json`` (``write``); the CLI and bench then refresh the report."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    inputs = run_inputs(recipe, run_dir)
    if words:
        inputs.words.update(words)
    samples = collect_samples(run_dir, recipe)
    if not samples:
        raise UserError("RUN_DIR", f"{run_dir} has no samples", "expected samples/<use>/<prompt>/<i>.png")
    models = models or MetricModels(preset, weights, device)
    ref_features = {}
    for use in ("content", "style"):
        paths = inputs.references[use]
        if not paths:
            raise UserError("RUN_DIR", "the run's recipe names no input image", "expected an image in inputs")
        ref_features[use] = models.image_features([load_image(p, f"inputs ({p})") for p in paths])
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.use, s.prompt), []).append(s)
    images: list[dict[str, Any]] = []
    for (use, prompt), group in tqdm(groups.items(), desc=f"eval {run_dir.name}", disable=not progress,
                                     dynamic_ncols=True, leave=False):
        text = fill_words(prompt, inputs.words)
        gen = models.image_features([load_image(s.path, str(s.path)) for s in group])
        text_feat = models.text_features([text]).expand(len(group), -1)
        # content metrics against the content references, style metrics against the style references
        scores = models.compare(gen, ref_features["content"], text_feat)
        for sc, st in zip(scores, models.compare(gen, ref_features["style"])):
            sc["csd_s"], sc["dino"] = st["csd_s"], st["dino"]
        for s, sc in zip(group, scores):
            images.append({"path": str(s.path.relative_to(run_dir)), "use": use, "prompt": prompt, "text": text,
                           **{m: sc.get(m) for m in METRICS}})
    note = preset_note(models.preset)
    result = {**summarize(images), "preset": models.preset, **({"preset_note": note} if note else {}),
              "models": models.describe(),
              "references": {u: [str(p) for p in ps] for u, ps in inputs.references.items()},
              "images": images}
    if write:
        write_json(run_dir / METRICS_FILE, result)
    return result


def format_table(metrics: Mapping[str, Any]) -> str:
    """A small text table: the five metrics, then the per-use means."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    head = f"{'':8}" + "".join(f"{LABELS[m]:>9}" for m in METRICS)
    lines = [head, f"{'run':8}" + "".join(f"{fmt(metrics.get(m)):>9}" for m in METRICS)]
    for use, row in (metrics.get("by_use") or {}).items():
        lines.append(f"{use:8}" + "".join(f"{fmt(row.get(m)):>9}" for m in METRICS) + f"   ({row['n']} images)")
    if metrics.get("preset_note"):
        lines.append(f"note: {metrics['preset_note']}")
    return "\n".join(lines)
