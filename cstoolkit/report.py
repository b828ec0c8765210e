"""Self-contained HTML reports: ``report.html`` of a run and of a benchmark.

One file, no network: images are embedded as base64 ``data:`` URIs (JPEG thumbnails, downscaled),
loss curves are inline SVG drawn from ``logs/scalars.jsonl`` (written by the runtime next to the
tensorboard files; older runs fall back to the tensorboard event files).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from PIL import Image

from .io import atomic_write

log = logging.getLogger(__name__)

REPORT = "report.html"
SCALARS = "scalars.jsonl"

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 6px}
figure{display:inline-block;margin:4px;text-align:center;vertical-align:top}
figcaption{font-size:11px;color:#555;max-width:200px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}.muted{color:#888}
svg{background:#fafafa;border:1px solid #ddd;margin:4px}
"""


def image_uri(image: str | Path | Image.Image, max_side: int = 256) -> str:
    """A JPEG ``data:`` URI of ``image``, downscaled to ``max_side`` (empty string if unreadable)."""
    try:
        im = Image.open(image) if not isinstance(image, Image.Image) else image
        im = im.convert("RGB")
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s (%s)", image, exc)
        return ""
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str | Path | Image.Image, caption: str = "", max_side: int = 192) -> str:
    uri = image_uri(src, max_side)
    if not uri:
        return (f"<figure><span class='muted'>missing image</span>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f"<figure><img src='{uri}' alt='{html.escape(caption, quote=True)}' style='max-width:{max_side}px'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from ``logs/scalars.jsonl`` (or tensorboard event files)."""
    series: dict[str, dict[int, float]] = {}
    path = run_dir / "logs" / SCALARS
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                series.setdefault(rec["tag"], {})[int(rec["step"])] = float(rec["value"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    elif (run_dir / "logs").is_dir():
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(run_dir / "logs"))
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                series[tag] = {e.step: e.value for e in acc.Scalars(tag)}
        except Exception as exc:  # pragma: no cover - tensorboard missing or files unreadable
            log.debug("report: no tensorboard scalars (%s)", exc)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def svg_curve(tag: str, points: Sequence[tuple[int, float]], width: int = 360, height: int = 180) -> str:
    """An inline SVG line plot with its min/max labels."""
    pad = 30
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (width - 2 * pad) / (x1 - x0 or 1)
    sy = (height - 2 * pad) / (y1 - y0 or 1)
    pts = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in points)
    t = html.escape(tag)
    return (f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' role='img' aria-label='{t}'>"
            f"<text x='{pad}' y='16' font-size='12'>{t}</text>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{pts}'/>"
            + ("".join(f"<circle cx='{p.split(',')[0]}' cy='{p.split(',')[1]}' r='2' fill='#1f77b4'/>"
                       for p in pts.split()) if len(points) <= 50 else "") +
            f"<text x='2' y='{pad + 4}' font-size='10'>{y1:.4g}</text>"
            f"<text x='2' y='{height - pad + 4}' font-size='10'>{y0:.4g}</text>"
            f"<text x='{pad}' y='{height - 8}' font-size='10'>step {x0}</text>"
            f"<text x='{width - pad - 40}' y='{height - 8}' font-size='10'>{x1}</text></svg>")


def _metrics_table(rows: Mapping[str, Mapping[str, Any]], first: str) -> str:
    from .metrics import LABELS, METRICS

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = f"<tr><th>{html.escape(first)}</th>" + "".join(f"<th>{LABELS[m]} ↑</th>" for m in METRICS)
    extra = sorted({k for r in rows.values() for k in r if k in ("n", "failed")})
    head += "".join(f"<th>{k}</th>" for k in extra) + "</tr>"
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{fmt(r.get(m))}</td>" for m in METRICS)
                   + "".join(f"<td>{fmt(r.get(k))}</td>" for k in extra) + "</tr>" for name, r in rows.items())
    return f"<table>{head}{body}</table>"


def _note(note: str | None) -> str:
    """A warning paragraph under a table (e.g. scores of random models), or nothing."""
    return f"<p><b>Note:</b> {html.escape(note)}</p>" if note else ""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html``: inputs, samples by use with prompts, loss curves, metrics, recipe."""
    from .evaluate import collect_samples, read_run_recipe, run_inputs
    from .metrics import COUNTED_ON, LABELS

    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    status = "unknown"
    if (run_dir / "run.json").is_file():
        status = json.loads((run_dir / "run.json").read_text()).get("status", status)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
    backbone = (recipe.get("backbone") or {}).get("name")
    parts = [f"<p>method <b>{html.escape(str(recipe.get('method')))}</b> · backbone "
             f"<b>{html.escape(str(backbone))}</b> · status {html.escape(status)}</p>"]

    try:
        inputs = run_inputs(recipe, run_dir)
        refs = {p: use for use in ("content", "style") for p in inputs.references[use]}
        words = ", ".join(f"{html.escape(k)} = {html.escape(v)}" for k, v in inputs.words.items())
    except Exception as exc:  # a method not installed here: show what the recipe says
        log.warning("report: cannot read the inputs of %s (%s)", run_dir, exc)
        refs, words = {}, ""
    parts.append("<h2>Input</h2><div class='row'>"
                 + "".join(_img(p, f"{Path(p).name}", 256) for p in dict.fromkeys(refs)) + "</div>")
    if words:
        parts.append(f"<p class='muted'>placeholders: {words}</p>")

    if metrics:
        parts.append("<h2>Metrics</h2>" + _metrics_table({"run": metrics, **(metrics.get("by_use") or {})}, "")
                     + _note(metrics.get("preset_note"))
                     + f"<p class='muted'>preset {html.escape(str(metrics.get('preset')))}; content metrics on "
                       "content samples, style metrics on style samples, CLIP-T on all.</p>")
    per_image = {r["path"]: r for r in (metrics or {}).get("images", [])}

    samples = collect_samples(run_dir, recipe)
    parts.append("<h2>Samples</h2>")
    if not samples:
        parts.append("<p class='muted'>no samples yet</p>")
    for use in ("content", "style", "both"):
        group = [s for s in samples if s.use == use]
        if not group:
            continue
        parts.append(f"<h3>{use}</h3>")
        prompts = list(dict.fromkeys(s.prompt for s in group))
        for prompt in prompts:
            figs = []
            for s in (s for s in group if s.prompt == prompt):
                rec = per_image.get(str(s.path.relative_to(run_dir)), {})
                cap = " ".join(f"{LABELS[m]} {rec[m]:.3f}" for m in rec if m in COUNTED_ON and use in COUNTED_ON[m]
                               and rec[m] is not None)
                figs.append(_img(s.path, cap or s.path.name))
            parts.append(f"<p><b>{html.escape(prompt)}</b></p><div class='row'>{''.join(figs)}</div>")

    curves = read_scalars(run_dir)
    if curves:
        parts.append("<h2>Training curves</h2><div class='row'>"
                     + "".join(svg_curve(tag, pts) for tag, pts in curves.items() if len(pts) > 0) + "</div>")
    parts.append("<h2>Recipe</h2><pre>" + html.escape(yaml.safe_dump(recipe, sort_keys=False)) + "</pre>")
    out = run_dir / REPORT
    text = _page(f"cstoolkit run: {run_dir.name}", "".join(parts))
    atomic_write(out, lambda fh: fh.write(text), mode="w")
    return out


def write_bench_report(out_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                       means: Mapping[str, Mapping[str, Any]], *, title: str = "cstoolkit bench",
                       recipes: Mapping[str, Mapping[str, Any]] | None = None, note: str | None = None) -> Path:
    """Write ``out_dir/report.html``: per-method means, and per item its input and a few samples of
    every method (with links to each run's own report). ``recipes``: what each recipe ran (see
    :func:`cstoolkit.bench.ran_recipe`); ``note``: a line under the means (e.g. random metric models)."""
    from .metrics import METRICS

    out_dir = Path(out_dir)
    parts = ["<h2>Means over items</h2>" + _metrics_table(means, "method") + _note(note)]
    items = list(dict.fromkeys(r["item"] for r in rows))
    parts.append("<h2>Items</h2>")
    for item in items:
        parts.append(f"<h3>{html.escape(item)}</h3><div class='row'>")
        shown_input = False
        for r in (r for r in rows if r["item"] == item):
            run = out_dir / r["run_dir"] if r.get("run_dir") else None
            if run is None or not run.is_dir():
                continue
            if not shown_input and r.get("input"):
                parts.append(_img(r["input"], "input", 160))
                shown_input = True
            samples = sorted((run / "samples").glob("*/*/0.png"))[:4]
            scores = ", ".join(f"{m} {r[m]:.3f}" for m in METRICS if isinstance(r.get(m), float))
            link = f"<a href='{html.escape(r['run_dir'])}/report.html'>{html.escape(r['method'])}</a>"
            figs = "".join(_img(p, f"{p.parent.parent.name}", 128) for p in samples)
            status = "" if r.get("status") == "done" else f" <b>{html.escape(str(r.get('status')))}</b>"
            parts.append(f"<div style='margin:4px 12px'>{link}{status}<br><span class='muted'>{scores}</span>"
                         f"<div class='row'>{figs}</div></div>")
        parts.append("</div>")
    if recipes:
        parts.append("<h2>Recipes</h2><p class='muted'>what each recipe ran: its values after --set, the "
                     "benchmark's prompts and image count, and the inputs of each item</p>" + "".join(
            f"<h3>{html.escape(n)}</h3><pre>{html.escape(yaml.safe_dump(dict(r), sort_keys=False))}</pre>"
            for n, r in recipes.items()))
    path = out_dir / REPORT
    text = _page(title, "".join(parts))
    atomic_write(path, lambda fh: fh.write(text), mode="w")
    return path
