"""Tell two methods apart on the same world items: ``cstoolkit world compare``.

The bench table gives each method's rate with its own interval; two overlapping intervals do not say
that the methods are level, since both were measured on the same items and an item that is hard for one
is often hard for the other. :func:`paired_difference` takes the items both methods finished, draws
items with replacement (the same draw for both), redraws each drawn item's rate as a binomial share of
its own samples for each method (the spread within an item, as :func:`world.bench.bootstrap_interval`),
and gives the 95 % percentile interval of the mean difference A - B. A verdict follows from it: *A ahead*
when the whole interval lies on A's better side (above 0 for accuracies, below 0 for leaks and the
rejected share), *B ahead* on the other side, *level* when it holds 0.

    cstoolkit world compare runs/bench/results.json --a csd_var-switti --b textual_inversion-switti
    cstoolkit world compare results.json --a csd_var --b textual_inversion --kinds held_out_pair --json
    cstoolkit world compare --a csd_var-switti@full/results.json --b csd_var-switti@no_kv/results.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cstoolkit.errors import UserError

from .bench import BOOTSTRAP, KINDS, LABELS, LOWER_IS_BETTER, METRICS, SAMPLES_OF

#: the metrics compared by default (identity scores are means of soft IoUs, compared over items only)
DEFAULT_METRICS = ("content_acc", "style_acc", "both_acc", "content_leak", "style_leak", "rejected")


def paired_difference(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]], metric: str,
                      level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """Mean of A - B of ``metric`` over the items both finished, with a paired two-stage bootstrap interval.

    Rows are bench rows (``results.json`` ``rows``), matched by ``item``. Returns ``None`` when no item has
    the metric for both, else ``{"diff", "ci95", "items", "a", "b", "verdict"}`` with ``verdict`` one of
    ``"a"``, ``"b"`` (who is ahead; for :data:`LOWER_IS_BETTER` metrics, lower is ahead) or ``"level"``.
    One item gives no interval for a metric without sample counts (``ci95`` None, verdict ``"level"``).
    """
    import numpy as np

    def done(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        return {r["item"]: r for r in rows if r.get("status", "done") == "done"
                and isinstance(r.get(metric), (int, float))}

    a, b = done(rows_a), done(rows_b)
    items = sorted(set(a) & set(b))
    if not items:
        return None
    va = np.array([float(a[i][metric]) for i in items])
    vb = np.array([float(b[i][metric]) for i in items])
    out: dict[str, Any] = {"diff": round(float((va - vb).mean()), 4), "items": len(items),
                           "a": round(float(va.mean()), 4), "b": round(float(vb.mean()), 4)}
    counts = SAMPLES_OF.get(metric)
    if counts is None and len(items) < 2:
        out.update(ci95=None, verdict="level")
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(items), (resamples, len(items)))  # the same items for A and B
    da, db = va[idx], vb[idx]
    if counts is not None:  # within each drawn item, each method's samples redrawn (binomial)
        na = np.maximum(np.array([int(a[i].get(counts) or 1) for i in items]), 1)[idx]
        nb = np.maximum(np.array([int(b[i].get(counts) or 1) for i in items]), 1)[idx]
        da = rng.binomial(na, np.clip(da, 0, 1)) / na
        db = rng.binomial(nb, np.clip(db, 0, 1)) / nb
    means = (da - db).mean(1)
    q = (1 - level) / 2
    lo, hi = float(np.quantile(means, q)), float(np.quantile(means, 1 - q))
    better_high = metric not in LOWER_IS_BETTER
    if lo > 0:
        verdict = "a" if better_high else "b"
    elif hi < 0:
        verdict = "b" if better_high else "a"
    else:
        verdict = "level"
    out.update(ci95=[round(lo, 4), round(hi, 4)], verdict=verdict)
    return out


def compare(rows: Sequence[Mapping[str, Any]], a: str, b: str, kinds: Sequence[str] | None = None,
            metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, Any]]:
    """:func:`paired_difference` of methods ``a`` and ``b`` for every kind present (or ``kinds``) and metric:
    ``{kind: {metric: result or None}}``."""
    names = sorted({r["method"] for r in rows})
    for flag, m in (("--a", a), ("--b", b)):
        if m not in names:
            raise UserError(flag, f"no rows of method {m!r} in the results", f"one of {', '.join(names) or '(none)'}")
    present = [k for k in KINDS if any(r.get("kind", "held_out_pair") == k for r in rows)]
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds or present:
        mine = [r for r in rows if r.get("kind", "held_out_pair") == kind]
        ra = [r for r in mine if r["method"] == a]
        rb = [r for r in mine if r["method"] == b]
        out[kind] = {m: paired_difference(ra, rb, m) for m in metrics}
    return out


def compare_markdown(result: Mapping[str, Mapping[str, Any]], a: str, b: str) -> str:
    """One row per kind, one column per metric: ``A - B [interval]``, the side ahead in bold words."""
    metrics = list(next(iter(result.values())).keys()) if result else []
    lines = [f"| {a} − {b} | " + " | ".join(LABELS[m] for m in metrics) + " | items |",
             "|---|" + "---:|" * (len(metrics) + 1)]
    short = {"a": a, "b": b}
    for kind, row in result.items():
        cells, n = [], 0
        for m in metrics:
            r = row.get(m)
            if r is None:
                cells.append("–")
                continue
            n = max(n, r["items"])
            iv = r["ci95"]
            text = f"{r['diff']:+.2f}" + (f" [{iv[0]:+.2f}, {iv[1]:+.2f}]" if iv else "")
            cells.append(text + ("" if r["verdict"] == "level" else f" **{short[r['verdict']]}**"))
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {n} |")
    note = (f"\nA − B over the items both finished; 95 % paired two-stage bootstrap ({BOOTSTRAP} resamples: the "
            "same items for both, then each item's samples); the method named is ahead (interval clear of 0; "
            "for leaks and rejected, lower is ahead), no name = level.\n")
    return "\n".join(lines) + "\n" + note


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cstoolkit world compare``."""
    p.add_argument("results", nargs="*", help="results.json of one or more `world bench` runs (rows pooled)")
    p.add_argument("--a", required=True, help="method A as named in the rows (e.g. csd_var-switti), or "
                   "METHOD@RESULTS.json to take its rows from that file alone (two runs of one method)")
    p.add_argument("--b", required=True, help="method B (or METHOD@RESULTS.json)")
    p.add_argument("--kinds", default=None, help="comma-separated item kinds (default: every kind present)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated, of {', '.join(METRICS)}")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(plugin_handler=cmd_compare)


def _split(value: str | None, allowed: Sequence[str], flag: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise UserError(flag, f"unknown {bad[0]!r}" if bad else "empty", f"some of {', '.join(allowed)}")
    return names


def _read_rows(path: str) -> list[Mapping[str, Any]]:
    try:
        return list(json.loads(Path(path).read_text())["rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(path, f"cannot read bench rows ({type(exc).__name__})",
                        "a results.json written by `cstoolkit world bench`") from exc


def _side(spec: str, pooled: list[Mapping[str, Any]], label: str, flag: str) -> list[Mapping[str, Any]]:
    """Rows of one side, renamed ``label``: ``METHOD`` from the pooled results, or ``METHOD@FILE`` from FILE
    (the same method of two runs, e.g. with and without an option)."""
    method, _, path = spec.partition("@")
    rows = _read_rows(path) if path else pooled
    mine = [{**r, "method": label} for r in rows if r.get("method") == method]
    if not mine:
        have = sorted({str(r.get("method")) for r in rows})
        raise UserError(flag, f"no rows of method {method!r} in the results", f"one of {', '.join(have) or '(none)'}")
    return mine


def _label(spec: str) -> str:
    """``METHOD@path/to/NAME/results.json`` -> ``METHOD@NAME`` (the run's folder, or the file's stem)."""
    method, _, path = spec.partition("@")
    if not path:
        return method
    p = Path(path)
    return f"{method}@{p.parent.name if p.stem == 'results' and p.parent.name else p.stem}"


def cmd_compare(args: argparse.Namespace) -> int:
    """``cstoolkit world compare``: paired differences of two methods from bench results."""
    pooled: list[Mapping[str, Any]] = []
    seen: dict[tuple[str, str], str] = {}
    for path in args.results:
        for r in _read_rows(path):
            key = (str(r.get("method")), str(r.get("item")))
            if key in seen and seen[key] != path:
                raise UserError(path, f"method {key[0]!r} item {key[1]!r} is also in {seen[key]}",
                                "pool runs of different methods, or pick one run with METHOD@RESULTS.json")
            seen[key] = path
            pooled.append(r)
    if not pooled and ("@" not in args.a or "@" not in args.b):
        raise UserError("results", "no results.json given", "RESULTS.json, or --a/--b as METHOD@RESULTS.json")
    kinds = _split(args.kinds, KINDS, "--kinds")
    metrics = _split(args.metrics, METRICS, "--metrics")
    a, b = _label(args.a), _label(args.b)
    if a == b:
        a, b = "A: " + a, "B: " + b
    rows = [*_side(args.a, pooled, a, "--a"), *_side(args.b, pooled, b, "--b")]
    result = compare(rows, a, b, kinds, metrics or DEFAULT_METRICS)
    print(json.dumps(result, indent=1) if args.json else compare_markdown(result, a, b))
    return 0
