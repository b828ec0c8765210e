#!/usr/bin/env python
"""Speed and memory of CSD-VAR and textual inversion on the scale-wise backbones, with and without
gradient checkpointing, against the frozen model's own forward+backward (random weights).

    # GPU, one command per preset, each < 9 min on one H100 (after `source benchmarks/device_setup.sh`):
    python3 benchmarks/csd_var_step.py --presets switti-ar --whole-repeats 3 --out $OUT/scalewise_switti_ar.json
    python3 benchmarks/csd_var_step.py --presets switti-1024 --whole-repeats 0 --out $OUT/scalewise_switti_1024.json
    python3 benchmarks/csd_var_step.py --presets infinity-2b --whole-repeats 0 --out $OUT/scalewise_infinity_2b.json
    # CPU smoke test (tiny presets of both backbones):
    python benchmarks/csd_var_step.py --tiny --device cpu --out /tmp/t.json

Full architectures with random weights (``random_weights: true``: Switti's transformer, VQ-VAE and
full-size CLIP-L/bigG; Infinity-2B's transformer, BSQ-VAE and a flan-t5-xl-sized T5 with a byte-level
tokenizer), bf16 on a GPU, batch 1. For every preset and every checkpointing mode (``off``; ``on`` =
selective, the self-attention outputs kept; ``full`` = every op recomputed):

* ``frozen``: the frozen reference: the prompt "A photo of a <c> object in <s> style" with learned
  <c>, <s> through the text encoders, one teacher-forcing pass over all scales, the backbone's loss,
  backward to the learned vectors;
* ``textual_inversion``: :class:`TextualInversionTrainer.step` (the method's own step: template draw,
  text encoders, teacher forcing, loss, backward, AdamW);
* ``csd_var_style`` / ``csd_var_content``: :class:`CSDVARTrainer.step` (context and full prompt through
  the text encoders, SVD edit, K-V memory hook, scale-group loss, clip, AdamW); their mean is the
  CSD-VAR step;
* peak allocated and peak reserved GPU memory of one call of each, from an emptied cache.

Times: median and min-max of ``--repeats`` repeats, a repeat being the mean of ``--inner`` calls after
``--warmup`` calls. Ratios: each step over the frozen reference of the same mode, and each mode over
``off``. ``--whole-repeats`` times the whole decomposition on the first Switti preset: ``CSDVAR.fit``
(set-up, ``--steps`` steps through the run's train loop, as ``cstoolkit run`` does) + sampling the
prompts of ``recipes/csd_var.yaml``. Results go to ``--out`` (JSON), rewritten after every section so
a timeout keeps what was done.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import ROOT, import_toolkit, peak_memory, repeat, stats, sync

TARGETS = {"step_ratio": 1.2, "checkpointing_time_ratio": 1.35, "peak_reserved_gib": 22.0, "switti_whole_s": 60.0}
PRESETS = {"switti-ar": "switti", "switti-1024": "switti", "infinity-2b": "infinity"}
MODES = {"off": (False, True), "on": (True, True), "full": (True, False)}  # (checkpointing, keep attention)
SAMPLING = {"switti": {"cfg": 6.0, "top_k": 400, "top_p": 0.95}, "infinity": {"cfg": 3.0, "tau": 0.5, "top_p": 0.97}}


def build(name: str, preset: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from cstoolkit.registry import backbones

    if name not in backbones():
        raise LookupError(f"the {name} backbone is not registered in this checkout")
    cls = backbones()[name]
    if preset not in cls.presets:
        raise LookupError(f"the {name} backbone has no preset {preset!r} (presets: {', '.join(cls.presets)})")
    return cls.from_config(cls.Config(preset=preset, random_weights=not tiny), device=device, dtype=dtype)


def set_mode(backbone: Any, mode: str) -> None:
    on, keep = MODES[mode]
    backbone.transformer.gradient_checkpointing = on
    backbone.transformer.checkpoint_keep_attention = keep


# ------------------------------------------------------------------------------------------ one preset
def bench(label: str, name: str, preset: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          out: dict) -> dict:
    import yaml

    from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN
    from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARInputs, CSDVARTrainer
    from cstoolkit.methods.textual_inversion import (
        TextualInversion,
        TextualInversionConfig,
        TextualInversionInputs,
        TextualInversionTrainer,
    )
    from cstoolkit.runtime import Runtime, RuntimeConfig

    res: dict[str, Any] = {"backbone": name, "preset": preset}
    out[label] = res
    t0 = time.perf_counter()
    backbone = build(name, preset, args.tiny, device, dtype)
    sync(device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    schedule = backbone.scale_schedule()
    res.update(image=list(backbone.image_size(schedule)), scales=len(schedule),
               tokens=sum(h * w for h, w in schedule),
               params_b=round(sum(p.numel() for p in backbone.parameters()) / 1e9, 3),
               checkpointing_auto="on" if backbone.transformer.gradient_checkpointing else "off")
    recipe = yaml.safe_load((ROOT / "recipes" / "csd_var.yaml").read_text())
    image = str((ROOT / "recipes" / recipe["inputs"]["image"]).resolve())
    words = {"content": recipe["inputs"]["content"], "style": recipe["inputs"]["style"]}
    mp = "bf16" if dtype == torch.bfloat16 else "no"
    runtime = Runtime(RuntimeConfig(seed=0, mixed_precision=mp, device=device.type, progress=False,
                                    output_dir=tempfile.mkdtemp(prefix="scalewise_bench_")))
    csd = CSDVAR(CSDVARConfig(steps=args.steps))
    csd_trainer = CSDVARTrainer(csd, backbone, CSDVARInputs(image=image, **words), runtime)
    ti_trainer = TextualInversionTrainer(TextualInversion(TextualInversionConfig()), backbone,
                                         TextualInversionInputs(image=image, **words), runtime)
    prompt, targets = "A photo of a <c> object in <s> style", csd_trainer.targets
    vectors = {ph: {k: v.detach().clone().requires_grad_(True) for k, v in csd_trainer.tokens[role].items()}
               for ph, role in ((CONTENT_TOKEN, "content"), (STYLE_TOKEN, "style"))}

    def frozen() -> None:
        text = backbone.encode_text([prompt], learned=vectors)
        with runtime.autocast():
            logits = backbone.teacher_forcing_logits(text, targets)
        backbone.teacher_forcing_loss(logits, targets).backward()
        for v in vectors.values():
            for t in v.values():
                t.grad = None

    counter = {"csd": 0, "ti": 0}
    held: dict[str, Any] = {"csd": csd_trainer, "ti": ti_trainer}  # dropped before the whole decomposition

    def csd_step(parity: int) -> Callable[[], None]:
        def run() -> None:
            held["csd"].step(counter["csd"] * 2 + parity)  # even = style step, odd = content step
            counter["csd"] += 1
        return run

    def ti_step() -> None:
        held["ti"].step(counter["ti"])
        counter["ti"] += 1

    steps = {"frozen": frozen, "textual_inversion": ti_step, "csd_var_style": csd_step(0),
             "csd_var_content": csd_step(1)}
    res["modes"] = {}
    for mode in args.modes:
        set_mode(backbone, mode)
        row: dict[str, Any] = {"peak_gib": {}, "step_s": {}}
        res["modes"][mode] = row
        times = {}
        try:
            for key, fn in steps.items():
                row["peak_gib"][key] = peak_memory(fn, device)
                times[key] = repeat(fn, device, args.warmup, args.repeats, args.inner)
                row["step_s"][key] = stats(times[key])
                _write(args, out)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # e.g. out of memory: keep the other modes
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"[{label}] {mode}: {row['error']}", flush=True)
            for v in vectors.values():
                for t in v.values():
                    t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        pair = [(a + b) / 2 for a, b in zip(times["csd_var_style"], times["csd_var_content"])]
        times["csd_var"] = pair
        row["step_s"]["csd_var"] = stats(pair)
        row["ratio_to_frozen"] = {k: stats([t / f for t, f in zip(times[k], times["frozen"])])
                                  for k in ("textual_inversion", "csd_var")}
        row["_times"] = times
        print(f"[{label}] {mode:4s}: frozen {row['step_s']['frozen']['median'] * 1e3:7.1f} ms, "
              f"TI {row['step_s']['textual_inversion']['median'] * 1e3:7.1f} ms "
              f"({row['ratio_to_frozen']['textual_inversion']['median']:.3f}x), CSD-VAR "
              f"{row['step_s']['csd_var']['median'] * 1e3:7.1f} ms "
              f"({row['ratio_to_frozen']['csd_var']['median']:.3f}x); peak {row['peak_gib']}", flush=True)
    if "_times" in res["modes"].get("off", {}):  # each checkpointing mode against no checkpointing, step by step
        base = res["modes"]["off"]["_times"]
        for mode, row in res["modes"].items():
            if mode != "off" and "_times" in row:
                row["time_ratio_to_off"] = {k: stats([t / b for t, b in zip(row["_times"][k], base[k])])
                                            for k in ("frozen", "textual_inversion", "csd_var")}
    for row in res["modes"].values():
        row.pop("_times", None)
    set_mode(backbone, "on" if res["checkpointing_auto"] == "on" else "off")
    _write(args, out)
    held.clear()
    del csd_trainer, ti_trainer

    # the whole decomposition: CSDVAR.fit (set-up + steps through the train loop) + sampling the recipe's prompts
    if not args.whole_repeats or name != "switti" or out.get("_whole_done"):
        return res
    out["_whole_done"] = True
    gen = recipe["generate"]
    prompts = {use: gen[use] for use in ("content", "style", "both") if gen.get(use)}
    from cstoolkit.methods.csd_var import CSDVARGenerate

    options = CSDVARGenerate(**(SAMPLING[name] if not args.tiny else {}))
    whole, fit_only, sample_only = [], [], []
    inputs = CSDVARInputs(image=image, **words)
    for r in range(args.whole_repeats):
        sync(device)
        t = time.perf_counter()
        dec = csd.fit(backbone, inputs, runtime)
        sync(device)
        fit_only.append(time.perf_counter() - t)
        n_images = 0
        for use, ps in prompts.items():
            imgs = csd.generate(backbone, dec, ps, use, num_images=gen.get("num_images", 1), seed=r,
                                options=options, progress=False)
            n_images += sum(len(x) for x in imgs)
        sync(device)
        whole.append(time.perf_counter() - t)
        sample_only.append(whole[-1] - fit_only[-1])
        del dec
        res["whole"] = {"steps": args.steps, "whole_s": stats(whole), "fit_s": stats(fit_only),
                        "sampling_s": stats(sample_only), "images": n_images,
                        "fit_s_per_step": round(statistics_median(fit_only) / args.steps, 4)}
        _write(args, out)
        print(f"[{label}] whole decomposition {r + 1}/{args.whole_repeats}: {whole[-1]:.1f} s "
              f"(fit {fit_only[-1]:.1f} s for {args.steps} steps, sampling {sample_only[-1]:.1f} s, "
              f"{n_images} images)", flush=True)
    return res


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _write(args: argparse.Namespace, out: dict) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="switti-ar,switti-1024,infinity-2b",
                        help=f"comma-separated, of {', '.join(PRESETS)} (--tiny: both backbones' tiny presets)")
    parser.add_argument("--modes", default="off,on,full", help="checkpointing modes: off, on (selective), full")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=151, help="steps of the whole decomposition (CSD-VAR's default "
                                                               "151: the official step-150 checkpoint)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=2, help="calls per step repeat")
    parser.add_argument("--whole-repeats", type=int, default=3)
    parser.add_argument("--out", type=str, default=None, help="JSON results")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")

    import_toolkit("cstoolkit.backbones.infinity", "cstoolkit.methods.csd_var")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny, "targets": TARGETS,
                           "torch": torch.__version__, "modes": {m: MODES[m] for m in args.modes},
                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                           "settings": {k: getattr(args, k) for k in ("warmup", "repeats", "inner", "steps")}}
    if args.tiny:
        runs = [("switti-tiny", "switti", "tiny"), ("infinity-tiny", "infinity", "tiny")]
    else:
        names = [p.strip() for p in args.presets.split(",") if p.strip()]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            parser.error(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
        runs = [(p, PRESETS[p], p) for p in names]
    for label, name, preset in runs:
        try:
            bench(label, name, preset, args, device, dtype, out)
        except LookupError as exc:
            out[label] = {"skipped": str(exc)}
            print(f"[{label}] skipped: {exc}", flush=True)
        _write(args, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.pop("_whole_done", None)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
