"""``cstoolkit world bench``: decompose held-out world images, generate, score with the oracles.

Item kinds (``--kinds``): ``held_out_pair`` (a known content in a known style, a pair no backbone saw),
``novel_content`` (a content no backbone saw, in a known style), ``novel_style`` (a known content in a
novel style), ``novel_both``. A novel concept reaches the method as a neutral word, ``object`` for a
content and ``pattern`` for a style (``NEUTRAL_CONTENT`` / ``NEUTRAL_STYLE``), as a user's new subject would.

For each of K items per kind (a pair (c0, s0), rendered with its own seed and instance) and each
method recipe, the generic bench runner (:func:`cstoolkit.bench.run_items`: sharding over processes,
skip-finished units, one run folder per unit) fits the method on the render and samples:

* content: ``a <c> in {s} style`` for every known world style s (scored over s != s0),
* style:   ``a {c} in <s> style`` for every known world content c (scored over c != c0),
* both:    ``a <c> in <s> style``.

Scores (fractions over a unit's samples, then means over items), with the oracles of
:mod:`cstoolkit.world.oracle`:

* ``content_acc``: content samples classified as c0;  ``content_leak``: content samples classified as
  style s0 although another style was asked;  ``new_style``: content samples classified as the asked s.
* ``style_acc``: style samples classified as s0;  ``style_leak``: style samples classified as content c0
  although another content was asked;  ``new_content``: style samples classified as the asked c.
* ``both_acc``: both-samples classified as (c0, s0).
* ``rejected``: samples the content oracle rejects ("no object"); a rejected sample is wrong for every
  accuracy and no leak. With ``--gate`` (off by default, ``SHAPE_GATE``) a content verdict whose silhouette
  is more like a blob than like the named content (:mod:`cstoolkit.world.shape_gate`) counts as rejected
  too; the scorer id then reads ``world-oracle-v2+gate-v1``.
* ``identity``: foreground IoU (:func:`cstoolkit.world.identity.identity_scores`, v4) between a content
  sample and the item's own instance drawn by the generator in the asked style s at the sample's fitted
  pose; ``identity_gain``: the share of the gap to a perfect match that the own instance closes beyond
  the mean of 4 *other* instances of c0 fitted alike (0: no better than another instance of the class,
  1: perfect). AUC own vs other instance 0.9+ on every draw of renders (``cstoolkit world identity-auc``).

Every rate gets a 95 % interval from a two-stage bootstrap (:func:`bootstrap_interval`): items drawn
with replacement, then each drawn item's samples redrawn (binomial at its own rate), so the
correlation of the samples of one item is respected.

Writes ``OUT/results.json`` (settings, per method and per method and kind: means and intervals; one row
per unit), ``OUT/table.md`` and ``OUT/plot.png`` (bars with interval whiskers, drawn with PIL),
besides the generic runner's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from cstoolkit.device import DEVICE_HELP, add_device_argument, runtime_device
from cstoolkit.errors import UserError

from .generator import (
    ALL_CONTENTS,
    ALL_STYLES,
    CONTENTS,
    HELD_OUT,
    NOVEL_HELD_OUT,
    STYLES,
    check_content,
    check_style,
    render,
    train_pairs,
)
from .identity import OTHER_INSTANCES as _IDENTITY_OTHERS
from .shape_gate import ON_BY_DEFAULT as SHAPE_GATE

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
#: environment variable naming the recipes folder (an installed, non-editable package has none beside it)
RECIPES_ENV = "CSTOOLKIT_RECIPES"


def recipes_folder() -> Path:
    """The folder of the methods' recipes: ``$CSTOOLKIT_RECIPES``, else the project's ``recipes/`` beside
    ``world/`` (a clone or an editable install), else ``./recipes`` (a package installed elsewhere, run from
    the project root)."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        if not Path(env).is_dir():
            raise UserError(RECIPES_ENV, f"{env} is not a folder", "a folder of recipes (<method>.yaml)")
        return Path(env)
    for d in (RECIPES_DIR, Path.cwd() / "recipes"):
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise UserError("recipes", f"no recipes folder beside the package ({RECIPES_DIR}) or in the current folder",
                    f"run from the project root, or set {RECIPES_ENV} to its recipes/ folder")
METRICS = ("content_acc", "style_acc", "both_acc", "content_leak", "style_leak", "identity", "identity_gain",
           "new_style", "new_content", "rejected")
LOWER_IS_BETTER = ("content_leak", "style_leak", "rejected")
#: the sample count each rate is a share of (identity scores are means, not rates)
SAMPLES_OF = {"content_acc": "content_samples", "content_leak": "content_samples", "new_style": "content_samples",
              "style_acc": "style_samples", "style_leak": "style_samples", "new_content": "style_samples",
              "both_acc": "both_samples", "rejected": "scored_samples"}
KINDS = ("held_out_pair", "novel_content", "novel_style", "novel_both")
#: the words a method gets for a novel content / style (its init or class word)
NEUTRAL_CONTENT, NEUTRAL_STYLE = "object", "pattern"
DEFAULT_ITEMS = len(HELD_OUT)
DEFAULT_NUM_IMAGES = 8
OTHER_INSTANCES = _IDENTITY_OTHERS  # other instances identity_gain subtracts (world/identity.py)
#: method inputs the world fills besides the image and the words
EXTRA_INPUTS = ("style_subject", "mcp_styles", "mcp_contents")


def content_prompt(style: str) -> str:
    return f"a <c> in {style} style"


def style_prompt(content: str) -> str:
    return f"a {content} in <s> style"


BOTH_PROMPT = "a <c> in <s> style"


def world_prompts(num_images: int = 1) -> dict[str, Any]:
    """The bench's prompts (same for every item; a unit's own c0/s0 prompts are not scored)."""
    return {"content": [content_prompt(s) for s in STYLES], "style": [style_prompt(c) for c in CONTENTS],
            "both": [BOTH_PROMPT], "num_images": num_images, "seed": 0}


@dataclasses.dataclass
class WorldItem:
    """A bench item: content c0, style s0, the render's seed (pose, jitter) and instance (identity), its
    kind and the words the method gets (the true names, or ``object`` / ``pattern`` for a novel one)."""

    name: str
    content: str
    style: str
    seed: int
    instance: int
    kind: str = "held_out_pair"
    content_word: str = ""
    style_word: str = ""

    def __post_init__(self):
        self.content_word = self.content_word or (self.content if self.content in CONTENTS else NEUTRAL_CONTENT)
        self.style_word = self.style_word or (self.style if self.style in STYLES else NEUTRAL_STYLE)


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--kinds``: comma-separated item kinds or ``all``."""
    names = [k.strip() for k in text.split(",") if k.strip()]
    if names == ["all"]:
        return KINDS
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        raise UserError("--kinds", f"unknown kind {bad[0]!r}" if bad else "empty",
                        f"expected 'all' or some of: {', '.join(KINDS)}")
    return tuple(dict.fromkeys(names))


def kind_pairs(kind: str) -> tuple[tuple[str, str], ...]:
    """The (content, style) pairs items of ``kind`` cycle over."""
    return HELD_OUT if kind == "held_out_pair" else NOVEL_HELD_OUT[kind]


def world_items(k: int, pairs: Sequence[tuple[str, str]] | None = None,
                kinds: Sequence[str] = ("held_out_pair",)) -> list[WorldItem]:
    """K items per kind cycling over its pairs (``pairs`` replaces them, one kind); item i of the j-th
    kind of ``KINDS`` uses seed 1000 + 1000 j + i and instance 5000 + 1000 j + i. Held-out items are
    named ``{i:03d}-{c}-{s}``, the others ``{kind}-{i:03d}-{c}-{s}``."""
    if k < 1:
        raise UserError("--items", f"got {k}", "expected at least 1")
    out = []
    for i in range(k):  # item i of every kind, then item i + 1: a run cut short (--time-limit) keeps every kind
        for kind in kinds:
            j = KINDS.index(kind)
            ps = tuple(pairs) if pairs is not None else kind_pairs(kind)
            prefix = "" if kind == "held_out_pair" else f"{kind}-"
            c, s = ps[i % len(ps)]
            out.append(WorldItem(f"{prefix}{i:03d}-{c}-{s}".replace(" ", "_"), c, s, 1000 + 1000 * j + i,
                                 5000 + 1000 * j + i, kind))
    return out


def _bench_item(it: WorldItem, folder: Path, size: int, method_inputs: Sequence[str]):
    """The generic runner's item: the render saved as PNG, and world-specific extra inputs."""
    from cstoolkit.bench import BenchItem
    from cstoolkit.io import save_image

    img = folder / f"{it.name}.png"
    if not img.is_file():
        save_image(render(it.content, it.style, seed=it.seed, size=size, instance=it.instance), img)
    extra: dict[str, Any] = {}
    if "style_subject" in method_inputs:  # what the style images show: here the content itself
        extra["style_subject"] = it.content_word
    # Break-for-Make's MCP (Eq. 17): other styles and other contents, from training pairs only
    others = [(c, s) for c, s in train_pairs() if c != it.content and s != it.style]
    if "mcp_styles" in method_inputs or "mcp_contents" in method_inputs:
        picks = [others[(it.seed * 7 + 11 * j) % len(others)] for j in range(4)]
        paths = []
        for j, (c, s) in enumerate(picks):
            p = folder / f"{it.name}-mcp{j}.png"
            if not p.is_file():
                save_image(render(c, s, seed=it.seed + 100 + j, size=size), p)
            paths.append((c, s, str(p)))
        if "mcp_styles" in method_inputs:
            extra["mcp_styles"] = [{"image": p, "style": s, "content": c} for c, s, p in paths[:2]]
        if "mcp_contents" in method_inputs:
            extra["mcp_contents"] = [{"image": p, "content": c, "style": s} for c, s, p in paths[2:]]
    return BenchItem(it.name, [img], it.content_word, it.style_word, inputs=extra)


def make_scorer(items: Mapping[str, WorldItem], size: int, oracle_dir: str | Path | None = None,
                gate: bool | None = None):
    """A ``score_fn(run_dir, item)`` for :func:`cstoolkit.bench.run_items` (see the module doc).

    Each use's samples go through the oracles in one batch; rates are returned with their sample
    counts (``content_samples``, ``style_samples``, ``both_samples``, ``scored_samples``). ``gate`` (default
    ``SHAPE_GATE``): a content verdict stands only if the sample's silhouette passes the shape gate
    (:mod:`cstoolkit.world.shape_gate`); a refused one counts as the oracle's rejection."""
    from cstoolkit.io import slugify

    from .identity import identity_references, identity_scores
    from .oracle import load_oracle
    from .shape_gate import GATE_ID, gate_passes

    gate = SHAPE_GATE if gate is None else gate

    def images_of(run_dir: Path, use: str, prompt: str) -> list:
        from PIL import Image

        folder = run_dir / "samples" / use / slugify(prompt)
        paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out

    def frac(flags: list[bool]) -> float | None:
        return sum(flags) / len(flags) if flags else None

    def gather(run_dir: Path, use: str, prompts: Sequence[tuple[int, str]]) -> tuple[list, list[int]]:
        ims, asked = [], []
        for j, prompt in prompts:
            got = images_of(run_dir, use, prompt)
            ims += got
            asked += [j] * len(got)
        return ims, asked

    def gated(ims: list, cp: list[int], creject: int) -> list[int]:
        """The content predictions ``cp`` with the verdicts the shape gate refuses set to ``creject``."""
        if not gate:
            return cp
        passes = gate_passes(ims, [None if c == creject else c for c in cp])
        return [c if ok else creject for c, (ok, _) in zip(cp, passes)]

    def score(run_dir: Path, item) -> dict[str, Any]:
        oracle = load_oracle(oracle_dir)
        creject = len(oracle.content_names) - 1 if oracle.content_names[-1] is None else -1
        it = items[item.name]
        c0, s0 = ALL_CONTENTS.index(it.content), ALL_STYLES.index(it.style)
        res: dict[str, Any] = {"kind": it.kind}
        rejected: list[bool] = []
        # content samples: c0 in other (known) styles
        ims, asked = gather(run_dir, "content", [(j, content_prompt(st)) for j, st in enumerate(STYLES) if j != s0])
        acc, leak, new, ident, gain = [], [], [], [], []
        if ims:
            p = oracle.predict(ims)
            cp, sp = gated(ims, p["content_probs"].argmax(-1).tolist(), creject), p["style_probs"].argmax(-1).tolist()
            refs: dict[int, list] = {}  # per asked style: the references of the own and other instances
            for im, c, st, sj in zip(ims, cp, sp, asked):
                acc.append(c == c0)
                leak.append(st == s0)
                new.append(st == sj)
                rejected.append(c == creject)
                if sj not in refs:
                    others = range(it.instance, it.instance + OTHER_INSTANCES + 1)
                    refs[sj] = identity_references(it.content, STYLES[sj], others, it.seed, max(im.size[0], 64))
                i0, g0 = identity_scores(im, it.content, STYLES[sj], it.instance, it.seed, refs[sj])
                ident.append(i0)
                gain.append(g0)
        res.update(content_acc=frac(acc), content_leak=frac(leak), new_style=frac(new),
                   identity=sum(ident) / len(ident) if ident else None,
                   identity_gain=sum(gain) / len(gain) if gain else None, content_samples=len(acc))
        # style samples: s0 on other (known) contents
        ims, asked = gather(run_dir, "style", [(j, style_prompt(c)) for j, c in enumerate(CONTENTS) if j != c0])
        acc, leak, new = [], [], []
        if ims:
            p = oracle.predict(ims)
            for c, st, cj in zip(gated(ims, p["content_probs"].argmax(-1).tolist(), creject),
                                 p["style_probs"].argmax(-1).tolist(), asked):
                acc.append(st == s0)
                leak.append(c == c0)
                new.append(c == cj)
                rejected.append(c == creject)
        res.update(style_acc=frac(acc), style_leak=frac(leak), new_content=frac(new), style_samples=len(acc))
        ims = images_of(run_dir, "both", BOTH_PROMPT)
        both = []
        if ims:
            p = oracle.predict(ims)
            for c, st in zip(gated(ims, p["content_probs"].argmax(-1).tolist(), creject),
                             p["style_probs"].argmax(-1).tolist()):
                both.append(c == c0 and st == s0)
                rejected.append(c == creject)
        res.update(both_acc=frac(both), both_samples=len(both), rejected=frac(rejected),
                   scored_samples=len(rejected))
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}

    oracle_id = f"world-oracle-v2+{GATE_ID}" if gate else "world-oracle-v2"
    score.scorer_id = f"{oracle_id}:identity-v4:{size}:{oracle_dir}"  # type: ignore[attr-defined]
    return score


# ------------------------------------------------------------------------------------- recipes
def _supports(method_cls, backbone: str) -> bool:
    """Whether a method runs on a backbone (as recipe validation decides): the backbone's family is one
    of the method's ``families`` (default ``(family,)``), and its name is in ``backbones`` where that is set."""
    from cstoolkit import registry

    return registry.supports(method_cls, backbone)


def _family_recipe(method: str, own: str | None, backbone: str, recipes_dir: Path) -> Path | None:
    """For a method named by its recipe (``unziplora``) whose own backbone is of another family than
    ``backbone``: its recipe for that family, if one exists (``recipes/unziplora-switti.yaml`` for Infinity or
    Switti): those settings suit the family; otherwise None (the method's recipe, backbone replaced)."""
    from cstoolkit import registry

    if method.endswith((".yaml", ".yml")) or not own or own == backbone:
        return None
    family = registry.get_backbone(backbone).family
    if registry.get_backbone(own).family == family:
        return None
    exact = recipes_dir / f"{method}-{backbone}.yaml"
    if exact.is_file():
        return exact
    for p in sorted(recipes_dir.glob(f"{method}-*.yaml")):
        name = p.stem[len(method) + 1:]
        if name in registry.backbones() and registry.get_backbone(name).family == family:
            return p
    return None


def _method_recipes(methods: Sequence[str], backbones: Sequence[str] | None, preset: str | None,
                    steps: int | None, sample_steps: int | None, recipes_dir: Path) -> dict[str, dict]:
    """``{name: recipe data}``: recipes/<method>.yaml per method (or a YAML path), per asked backbone
    the method supports, with the world preset and the step overrides applied."""
    from cstoolkit import registry
    from cstoolkit.recipe import read_yaml

    out: dict[str, dict] = {}
    for m in methods:
        path = Path(m) if m.endswith((".yaml", ".yml")) else recipes_dir / f"{m}.yaml"
        if not path.is_file():
            raise UserError("--methods", f"no recipe for '{m}' ({path})",
                            f"expected a method with a recipe in {recipes_dir}: "
                            + ", ".join(sorted(p.stem for p in recipes_dir.glob("*.yaml"))))
        data = read_yaml(path)
        cls = registry.get_method(str(data.get("method")))
        own = (data.get("backbone") or {}).get("name")
        names = [b for b in backbones if _supports(cls, b)] if backbones else [own]
        if not names:
            log.warning("world bench: %s supports none of %s; skipped", m, ", ".join(backbones or ()))
            continue
        for b in names:
            d, src = data, path
            variant = _family_recipe(m, own, b, recipes_dir)  # e.g. recipes/unziplora-switti.yaml for Infinity
            if variant is not None:
                src = variant
                d = read_yaml(variant)
            own_b = (d.get("backbone") or {}).get("name")
            d = json.loads(json.dumps(d))
            d["_base_dir"] = str(src.resolve().parent)
            bb = dict(d.get("backbone") or {})
            if b != own_b:
                bb = {"name": b}
            if preset:
                bcls = registry.get_backbone(b)
                if preset not in bcls.presets:
                    raise UserError("--preset", f"backbone '{b}' has no preset '{preset}'",
                                    f"expected one of: {', '.join(bcls.presets)}")
                bb.pop("pretrained", None)
                bb["preset"] = preset
            d["backbone"] = bb
            cfg_fields = {f.name for f in dataclasses.fields(cls.Config)}
            if steps is not None and "steps" in cfg_fields:
                d.setdefault("params", {})["steps"] = steps
                for extra in ("make_steps", "lora_steps"):  # second stages of multi-stage methods
                    if extra in cfg_fields:
                        d["params"][extra] = steps
            gen_fields = {f.name for f in dataclasses.fields(cls.GenerateConfig)}
            if sample_steps is not None and "steps" in gen_fields:
                d.setdefault("generate", {})["steps"] = sample_steps
            stem = Path(m).stem
            stem = stem[:-len(own) - 1] if own and stem.endswith(f"-{own}") else stem  # unziplora-switti -> unziplora
            name = Path(m).stem if len(names) == 1 and (not backbones or len(backbones) == 1) and b == own else \
                f"{stem}-{b}"
            out[name] = d
    if not out:
        raise UserError("--methods", "no method runs on the given backbones", "expected at least one")
    return out


# ------------------------------------------------------------------------------------- tables
BOOTSTRAP = 2000  # resamples of every interval


def bootstrap_interval(values: Sequence[float], counts: Sequence[int] | None = None, level: float = 0.95,
                       resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    """A percentile interval of the mean over items of per-item scores.

    Two stages: items are drawn with replacement (the spread between items), then, for rates
    (``counts`` given: each item's sample count), each drawn item's rate is redrawn as a binomial share
    of its own samples (the spread within an item). Samples of one item are thus never treated as
    independent of each other. Without ``counts`` (identity scores) only items are resampled, so one
    item gives no interval (None).
    """
    import numpy as np

    v = np.asarray(values, float)
    if len(v) == 0 or (counts is None and len(v) < 2):
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), (resamples, len(v)))
    draw = v[idx]
    if counts is not None:
        n = np.maximum(np.asarray(counts, int), 1)[idx]
        draw = rng.binomial(n, np.clip(draw, 0, 1)) / n
    means = draw.mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _summary(done: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    ci: dict[str, list[float] | None] = {}
    for k in METRICS:
        rows = [r for r in done if isinstance(r.get(k), (int, float))]
        vals = [float(r[k]) for r in rows]
        entry[k] = round(sum(vals) / len(vals), 4) if vals else None
        counts = [int(r.get(SAMPLES_OF[k]) or 1) for r in rows] if k in SAMPLES_OF else None
        iv = bootstrap_interval(vals, counts)
        ci[k] = None if iv is None else [round(iv[0], 4), round(iv[1], 4)]
    entry["ci95"] = ci
    return entry


def summarise(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
              kinds: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per method: the mean of each world metric over its finished units and its 95 % interval
    (``ci95``, :func:`bootstrap_interval`), ``n``, ``failed``, ``seconds_per_item``; with ``kinds``, one
    entry per method and kind instead, named ``method [kind]`` (``method`` alone if one kind)."""
    means: dict[str, dict[str, Any]] = {}
    groups = [(m, None) for m in methods] if not kinds else [(m, k) for m in methods for k in kinds]
    for m, kind in groups:
        mine = [r for r in rows if r["method"] == m and (kind is None or r.get("kind", "held_out_pair") == kind)]
        done = [r for r in mine if r.get("status") == "done"]
        entry = _summary(done)
        secs = [r["seconds"] for r in done if isinstance(r.get("seconds"), (int, float))]
        entry.update(n=len(done), failed=len(mine) - len(done),
                     seconds_per_item=round(sum(secs) / len(secs), 1) if secs else None)
        if kind is not None:
            entry.update(method=m, kind=kind)
        means[m if kind is None or len(kinds or ()) == 1 else f"{m} [{kind}]"] = entry
    return means


LABELS = {"content_acc": "content acc ↑", "style_acc": "style acc ↑", "both_acc": "both acc ↑",
          "content_leak": "content leak ↓", "style_leak": "style leak ↓", "identity": "identity ↑",
          "identity_gain": "identity gain ↑", "new_style": "new style ↑", "new_content": "new content ↑",
          "rejected": "rejected ↓"}


def _cell(row: Mapping[str, Any], m: str) -> str:
    v = row.get(m)
    if v is None:
        return "–"
    iv = (row.get("ci95") or {}).get(m)
    return f"{v:.2f}" if not iv else f"{v:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]"


def table_markdown(means: Mapping[str, Mapping[str, Any]]) -> str:
    """The results as a markdown table (one row per method, or per method and kind), each rate with its
    95 % interval in brackets."""
    head = "| method | " + " | ".join(LABELS[m] for m in METRICS) + " | items | failed | s/item |"
    lines = [head, "|---|" + "---:|" * (len(METRICS) + 3)]
    for name, row in means.items():
        vals = " | ".join(_cell(row, m) for m in METRICS)
        sec = row.get("seconds_per_item")
        lines.append(f"| {name} | {vals} | {row.get('n', 0)} | {row.get('failed', 0)} | "
                     f"{'–' if sec is None else f'{sec:.0f}'} |")
    note = ("\n95 % intervals in brackets: two-stage bootstrap over items, then over each item's samples "
            f"({BOOTSTRAP} resamples); identity intervals resample items only.\n")
    return "\n".join(lines) + "\n" + note


_BAR_COLORS = {"content_acc": (46, 134, 222), "style_acc": (230, 126, 34), "both_acc": (142, 68, 173),
               "content_leak": (149, 165, 166), "style_leak": (99, 110, 114), "identity": (39, 174, 96),
               "rejected": (192, 57, 43)}


def plot_png(means: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """A grouped bar chart (one group per row of the table, one bar per metric in [0, 1], a whisker for
    its 95 % interval), drawn with PIL."""
    from PIL import Image, ImageDraw

    keys = list(_BAR_COLORS)
    bar, gap, pad, h = 14, 24, 50, 260
    group = len(keys) * bar
    w = pad + len(means) * (group + gap) + 20
    w = max(w, 760)
    legend_h = 22
    img = Image.new("RGB", (w, h + 60 + legend_h), "white")
    d = ImageDraw.Draw(img)
    top, base = 10 + legend_h, 10 + legend_h + h
    for t in range(0, 11, 2):
        y = base - t / 10 * h
        d.line([(pad - 4, y), (w - 10, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{t / 10:.1f}", fill="black")
    d.line([(pad, top), (pad, base)], fill="black")
    d.line([(pad, base), (w - 10, base)], fill="black")
    x = pad + gap // 2
    to_y = lambda v: base - max(0.0, min(1.0, float(v))) * h  # noqa: E731
    for name, row in means.items():
        for j, k in enumerate(keys):
            v = row.get(k)
            if isinstance(v, (int, float)):
                d.rectangle([x + j * bar, to_y(v), x + (j + 1) * bar - 2, base], fill=_BAR_COLORS[k])
                iv = (row.get("ci95") or {}).get(k)
                if iv:
                    cx = x + j * bar + bar // 2 - 1
                    d.line([(cx, to_y(iv[0])), (cx, to_y(iv[1]))], fill="black")
                    for yy in (to_y(iv[0]), to_y(iv[1])):
                        d.line([(cx - 3, yy), (cx + 3, yy)], fill="black")
        d.text((x, base + 6), name[: max(4, (group + gap) // 6)], fill="black")
        x += group + gap
    lx = pad
    for k in keys:
        d.rectangle([lx, 6, lx + 10, 16], fill=_BAR_COLORS[k])
        d.text((lx + 14, 5), k, fill="black")
        lx += 14 + int(d.textlength(k)) + 12
    d.text((pad, base + 24), "whiskers: 95 % bootstrap intervals (items, then samples within an item)", fill="black")
    from cstoolkit.io import atomic_write

    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


# ------------------------------------------------------------------------------------- entry
@dataclasses.dataclass
class WorldBenchResult:
    out: Path
    means: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    rank: int = 0
    #: units asked for (recipes x items); ``len(rows)`` of them ran or were finished before (``--time-limit``)
    units: int = 0


def world_bench(methods: Sequence[str], out: str | Path, *, items: int = DEFAULT_ITEMS,
                backbones: Sequence[str] | None = None, kinds: Sequence[str] = ("held_out_pair",),
                preset: str | None = "world", steps: int | None = None, sample_steps: int | None = None,
                num_images: int = DEFAULT_NUM_IMAGES, input_size: int = 128, overrides: Sequence[str] = (),
                recipes_dir: str | Path | None = None, oracle_dir: str | Path | None = None,
                progress: bool = True, time_limit: float | None = None, gate: bool | None = None) -> WorldBenchResult:
    """Run the world benchmark (see the module doc); returns per-method means and per-unit rows.

    ``gate``: score content verdicts through the shape gate (:func:`make_scorer`; default ``SHAPE_GATE``).

    ``time_limit``: seconds after which no new unit starts (:func:`cstoolkit.bench.run_items`); the report
    covers the finished units and says how many were not run."""
    from cstoolkit.bench import load_bench_recipes, run_items, write_tables
    from cstoolkit.io import atomic_write, make_writable_dir

    from .oracle import load_oracle

    if not methods:
        raise UserError("--methods", "empty", "expected e.g. --methods unziplora,dreambooth_lora")
    if num_images < 1:
        raise UserError("--num-images", f"got {num_images}", "expected at least 1")
    if input_size < 64:
        raise UserError("--input-size", f"got {input_size}", "expected at least 64 pixels")
    load_oracle(oracle_dir)  # missing oracle weights stop here
    out = make_writable_dir(Path(out).expanduser().resolve(), "--out")
    rdir = Path(recipes_dir) if recipes_dir is not None else recipes_folder()
    recipes = _method_recipes(methods, backbones, preset, steps, sample_steps, rdir)
    if not progress:
        for d in recipes.values():
            d.setdefault("runtime", {})["progress"] = False
    bench_recipes = []
    loaded = load_bench_recipes({n: {k: v for k, v in d.items() if k != "_base_dir"} for n, d in recipes.items()},
                                overrides)
    for br, d in zip(loaded, recipes.values()):  # same order; relative paths resolve against the recipe's folder
        br.base_dir = Path(d["_base_dir"])
        bench_recipes.append(br)
    from cstoolkit import registry

    kinds = parse_kinds(",".join(kinds))
    witems = world_items(items, kinds=kinds)
    inputs_folder = out / "inputs"
    inputs_folder.mkdir(exist_ok=True)
    # world inputs besides image and words (style_subject, MCP sets) go only to the methods that have
    # them: one run_items call per group of recipes with the same such fields
    groups: dict[tuple[str, ...], list] = {}
    for br in bench_recipes:
        fields = {f.name for f in dataclasses.fields(registry.get_method(str(br.data["method"])).Inputs)}
        groups.setdefault(tuple(sorted(fields & set(EXTRA_INPUTS))), []).append(br)
    group_items = {key: [_bench_item(it, inputs_folder, input_size, key) for it in witems] for key in groups}
    prompts = world_prompts(num_images)
    from cstoolkit.api import Decomposer
    from cstoolkit.bench import item_recipe
    from cstoolkit.recipe import parse_recipe

    for key, brs in groups.items():  # every unit's recipe and inputs are checked before anything runs
        for br in brs:
            for bi in group_items[key]:
                Decomposer(parse_recipe(item_recipe(br, bi, out / br.name / bi.name, prompts, num_images),
                                        br.base_dir)).check_inputs()
    by_name = {it.name: it for it in witems}
    gate = SHAPE_GATE if gate is None else gate
    scorer = make_scorer(by_name, input_size, oracle_dir, gate)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    rank = 0
    for g, (key, brs) in enumerate(groups.items()):
        # groups run one after another: each gets an equal share of the time left (unused time carries over)
        remaining = None if time_limit is None else max(0.0, time_limit - (time.time() - t0)) / (len(groups) - g)
        result = run_items(group_items[key], brs, out, prompts=prompts, num_images=num_images, score_fn=scorer,
                           progress=progress, title="cstoolkit world bench", time_limit=remaining)
        rows += result.rows
        rank = result.rank
    if rank != 0:
        return WorldBenchResult(out, {}, rows, rank)
    order = {br.name: k for k, br in enumerate(bench_recipes)}
    rows.sort(key=lambda r: (r["item"], order.get(r["method"], len(order))))
    if len(groups) > 1:  # the generic tables of all groups together (each call wrote its own group's)
        write_tables(out, rows, [br.name for br in bench_recipes], title="cstoolkit world bench",
                     recipes={br.name: br.data for br in bench_recipes})
    names = [br.name for br in bench_recipes]
    means = summarise(rows, names, kinds)
    report = {
        "settings": {"methods": list(methods), "backbones": list(backbones or []), "preset": preset, "items": items,
                     "kinds": list(kinds), "interval": f"95 % two-stage bootstrap ({BOOTSTRAP} resamples): items, then "
                     "samples within each item (binomial); identity: items only",
                     "steps": steps, "sample_steps": sample_steps, "num_images": num_images,
                     "input_size": input_size, "overrides": list(overrides), "shape_gate": gate,
                     "wall_seconds": round(time.time() - t0, 1),
                     "time_limit": time_limit, "units": len(bench_recipes) * len(witems), "units_reported": len(rows),
                     "items_list": [dataclasses.asdict(i) for i in witems]},
        "methods": summarise(rows, names),
        "per_kind": means,
        "rows": [{k: v for k, v in r.items() if isinstance(v, (int, float, str, type(None)))} for r in rows],
    }
    atomic_write(out / "results.json", lambda fh: fh.write(json.dumps(report, indent=2) + "\n"), mode="w")
    atomic_write(out / "table.md", lambda fh: fh.write(table_markdown(means)), mode="w")
    plot_png(means, out / "plot.png")
    return WorldBenchResult(out, means, rows, 0, len(bench_recipes) * len(witems))


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cstoolkit world bench``."""
    p.add_argument("--methods", required=True, help="comma-separated methods (recipes/<method>.yaml) or recipe files")
    p.add_argument("--items", type=int, default=DEFAULT_ITEMS, help=f"items K per kind (default {DEFAULT_ITEMS}: "
                   "every held-out pair once; more cycle over the pairs with new seeds and instances)")
    p.add_argument("--kinds", default="held_out_pair", help="comma-separated item kinds, or 'all': held_out_pair "
                   "(default), novel_content, novel_style, novel_both (a novel concept gets the word 'object' or "
                   "'pattern')")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--backbones", default=None, help="comma-separated backbones (default: each recipe's own); a "
                   "method runs on those it supports")
    p.add_argument("--preset", default="world", help="backbone preset (default: world; 'none' keeps the recipe's)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every method (default: the recipe's)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps where the method has them")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help=f"images per prompt (default {DEFAULT_NUM_IMAGES})")
    p.add_argument("--input-size", type=int, default=128, help="render size of the inputs (default 128)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every recipe, or of one: --set unziplora:params.rank=4")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="start no new unit after this "
                   "long; the tables hold the finished units (items interleave the kinds, so every kind gets some), "
                   "a rerun with the same --out runs the rest")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=SHAPE_GATE,
                   help="pass content verdicts through the shape gate (a shapeless sample counts as rejected; "
                   f"default: {'on' if SHAPE_GATE else 'off'}, docs/world.md 'Shape gate')")
    add_device_argument(p, "device of every run: " + DEVICE_HELP)
    p.set_defaults(plugin_handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """``cstoolkit world bench``."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()] if args.backbones else None
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps", f"got {args.steps}", "expected at least 1")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise UserError("--sample-steps", f"got {args.sample_steps}", "expected at least 1")
    device = runtime_device(args.device)
    overrides = [*args.overrides, *([f"runtime.device={device}"] if device is not None else [])]
    res = world_bench(methods, args.out, items=args.items, backbones=backbones, kinds=parse_kinds(args.kinds),
                      preset=None if args.preset == "none" else args.preset, steps=args.steps,
                      sample_steps=args.sample_steps, num_images=args.num_images, input_size=args.input_size,
                      overrides=overrides, time_limit=args.time_limit, gate=args.gate)
    if res.rank == 0:
        print(table_markdown(res.means), end="")
        print(f"results: {res.out / 'results.json'}")
        print(f"plot: {res.out / 'plot.png'}")
        if len(res.rows) < res.units:
            print(f"{res.units - len(res.rows)} of {res.units} units not run (--time-limit): "
                  f"rerun the same command to run them")
        return 1 if any(m["failed"] for m in res.means.values()) else 0
    return 0


__all__ = ["world_bench", "world_prompts", "world_items", "make_scorer", "summarise", "table_markdown", "plot_png",
           "bootstrap_interval", "parse_kinds", "check_content", "check_style"]
