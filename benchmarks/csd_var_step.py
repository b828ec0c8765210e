#!/usr/bin/env python
"""Speed and memory of a CSD-VAR step against the frozen model's own forward+backward, random weights.

    python benchmarks/csd_var_step.py --out csd_var.json                     # GPU: switti-ar 512² + infinity-2b 1024²
    python benchmarks/csd_var_step.py --backbone switti --out switti.json    # one backbone
    python benchmarks/csd_var_step.py --tiny --device cpu --out /tmp/t.json  # CPU smoke test (tiny presets)

Full architectures with random weights (Switti: ``random_weights: true``; Infinity-2B: transformer,
BSQ-VAE and a flan-t5-xl-sized T5 built from a seed, byte-level tokenizer), bf16 on a GPU.

* baseline step: the prompt "A photo of a <c> object in <s> style" with learned <c>, <s> through the
  text encoders, one teacher-forcing pass over all scales, the backbone's loss, backward to the
  learned vectors (what plain textual inversion does; the frozen model's own forward+backward);
* CSD-VAR step: :class:`CSDVARTrainer.step` (context and full prompt through the text encoders,
  SVD rectification, K-V memory hook, the scale-group loss of Eq. 8 / Eq. 9, clip, Adam); the style
  and the content step are timed apart; the ratio uses their mean;
* peak memory of each (``torch.cuda.max_memory_allocated``);
* the whole decomposition: set-up (image targets, sub-concept SVD, memory probe) + ``steps`` steps +
  sampling the prompts of ``recipes/csd_var.yaml`` (num_images each), wall time.

Every figure is the median and min-max of ``--repeats`` repeats (a step repeat = mean of ``--inner``
calls). Results go to ``--out`` (JSON), rewritten after each section so a timeout keeps what was done.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import ROOT, import_toolkit, peak_gib, repeat, stats, sync

TARGETS = {"step_ratio": 1.2, "peak_gib": 24.0, "switti_whole_s": 60.0}












# ------------------------------------------------------------------------------------------ backbones
def build_switti(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from cstoolkit.registry import backbones

    if "switti" not in backbones():
        raise LookupError("the switti backbone is not registered in this checkout")
    cls = backbones()["switti"]
    preset = "tiny" if tiny else "switti-ar"
    if preset not in cls.presets:
        raise LookupError(f"the switti backbone has no preset {preset!r} (presets: {', '.join(cls.presets)})")
    cfg = cls.Config(preset=preset, random_weights=not tiny)
    return cls.from_config(cfg, device=device, dtype=dtype)


def build_infinity(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from cstoolkit.backbones.infinity import InfinityBackbone, InfinityConfig, build_transformer, build_vae
    from cstoolkit.backbones.infinity.text import T5TextEncoder

    if tiny:
        return InfinityBackbone.from_config(InfinityConfig(preset="tiny"), device=device, dtype=dtype)
    if "random_weights" in inspect.getsource(InfinityBackbone.from_config):
        return InfinityBackbone.from_config(InfinityConfig(preset="infinity-2b", random_weights=True),
                                            device=device, dtype=dtype)
    # built here: the 2B transformer and d32 BSQ-VAE from a seed, a flan-t5-xl-sized T5 (random), bytes as tokens
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    transformer = build_transformer("infinity-2b", device=device, dtype=dtype, seed=0).eval()
    vae = build_vae("infinity-2b", device=device, seed=0).eval()
    t5 = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32)
    torch.manual_seed(0)
    with torch.device(device):
        model = T5EncoderModel(t5)
    text = T5TextEncoder(model.to(dtype if device.type == "cuda" else torch.float32).eval(), ByT5Tokenizer(),
                         transformer.cfg.text_maxlen)
    return InfinityBackbone(InfinityConfig(preset="infinity-2b"), transformer, vae, text, resolution=1024,
                            weight_dtype=dtype)


BUILDERS = {"switti": build_switti, "infinity": build_infinity}
SAMPLING = {"switti": {"cfg": 6.0, "top_k": 400, "top_p": 0.95}, "infinity": {"cfg": 3.0, "tau": 0.5, "top_p": 0.97}}


# ------------------------------------------------------------------------------------------ one backbone
def bench(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: dict) -> dict:
    import yaml

    from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN
    from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARGenerate, CSDVARInputs, CSDVARTrainer
    from cstoolkit.runtime import Runtime, RuntimeConfig

    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    backbone = BUILDERS[name](args.tiny, device, dtype)
    sync(device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    schedule = backbone.scale_schedule()
    res.update(preset=getattr(backbone.config, "preset", None), image=list(backbone.image_size(schedule)),
               scales=len(schedule), tokens=sum(h * w for h, w in schedule),
               params_b=round(sum(p.numel() for p in backbone.parameters()) / 1e9, 3))
    recipe = yaml.safe_load((ROOT / "recipes" / "csd_var.yaml").read_text())
    inputs = CSDVARInputs(image=str((ROOT / "recipes" / recipe["inputs"]["image"]).resolve()),
                          content=recipe["inputs"]["content"], style=recipe["inputs"]["style"])
    mp = "bf16" if dtype == torch.bfloat16 else "no"
    tmp = Path(tempfile.mkdtemp(prefix="csd_var_bench_"))
    runtime = Runtime(RuntimeConfig(seed=0, mixed_precision=mp, device=device.type, progress=False,
                                    output_dir=str(tmp)))
    method = CSDVAR(CSDVARConfig(steps=args.steps))
    trainer = CSDVARTrainer(method, backbone, inputs, runtime)
    prompt, targets = trainer.prompts["full"], trainer.targets
    out[name] = res

    # baseline: textual inversion's step (text encoders + one teacher-forcing pass + loss + backward)
    vectors = {ph: {k: v.detach().clone().requires_grad_(True) for k, v in trainer.tokens[role].items()}
               for ph, role in ((CONTENT_TOKEN, "content"), (STYLE_TOKEN, "style"))}

    def baseline() -> None:
        text = backbone.encode_text([prompt], learned=vectors)
        with runtime.autocast():
            logits = backbone.teacher_forcing_logits(text, targets)
        loss = backbone.teacher_forcing_loss(logits, targets)
        loss.backward()
        for v in vectors.values():
            for t in v.values():
                t.grad = None

    counter = {"i": 0}
    holder = {"trainer": trainer}

    def csd_step(parity: int) -> Callable[[], None]:
        def run() -> None:
            i = counter["i"] * 2 + parity  # even = style step, odd = content step
            counter["i"] += 1
            holder["trainer"].step(i)
        return run

    times = {"baseline": repeat(baseline, device, args.warmup, args.repeats, args.inner),
             "style_step": repeat(csd_step(0), device, args.warmup, args.repeats, args.inner),
             "content_step": repeat(csd_step(1), device, args.warmup, args.repeats, args.inner)}
    pair = [(a + b) / 2 for a, b in zip(times["style_step"], times["content_step"])]
    ratios = [p / b for p, b in zip(pair, times["baseline"])]
    res["step_s"] = {k: stats(v) for k, v in times.items()}
    res["step_s"]["csd_var_mean"] = stats(pair)
    res["ratio"] = stats(ratios)
    res["peak_gib"] = {"baseline": peak_gib(baseline, device), "style_step": peak_gib(csd_step(0), device),
                       "content_step": peak_gib(csd_step(1), device)}
    _write(args, out)
    print(f"[{name}] step: baseline {res['step_s']['baseline']['median'] * 1e3:.1f} ms, csd_var "
          f"{res['step_s']['csd_var_mean']['median'] * 1e3:.1f} ms, ratio {res['ratio']['median']:.3f} "
          f"({res['ratio']['min']:.3f}-{res['ratio']['max']:.3f}); peak {res['peak_gib']}", flush=True)
    holder.clear()
    del trainer

    # the whole decomposition: set-up + steps + sampling the recipe's prompts
    gen = recipe["generate"]
    prompts = {use: gen[use] for use in ("content", "style", "both") if gen.get(use)}
    options = CSDVARGenerate(**(SAMPLING[name] if not args.tiny else {}))
    whole, fit_only = [], []
    for r in range(args.whole_repeats):
        sync(device)
        t = time.perf_counter()
        trainer = CSDVARTrainer(method, backbone, inputs, runtime)
        for step in range(args.steps):
            trainer.step(step)
        dec = trainer.decomposition()
        sync(device)
        fit_only.append(time.perf_counter() - t)
        n_images = 0
        for use, ps in prompts.items():
            imgs = method.generate(backbone, dec, ps, use, num_images=gen.get("num_images", 1), seed=r,
                                   options=options, progress=False)
            n_images += sum(len(x) for x in imgs)
        sync(device)
        whole.append(time.perf_counter() - t)
        del trainer, dec
        res["whole_s"] = stats(whole)
        res["fit_s"] = stats(fit_only)
        res["images_sampled"] = n_images
        _write(args, out)
        print(f"[{name}] whole decomposition {r + 1}/{args.whole_repeats}: {whole[-1]:.1f} s "
              f"(fit {fit_only[-1]:.1f} s, {n_images} images)", flush=True)
    if device.type == "cuda":
        res["peak_gib_whole"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return res


def _write(args: argparse.Namespace, out: dict) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="all", choices=["all", "switti", "infinity"])
    parser.add_argument("--tiny", action="store_true", help="tiny presets (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200, help="steps of the whole decomposition (paper: 200)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=4, help="calls per step repeat")
    parser.add_argument("--whole-repeats", type=int, default=3)
    parser.add_argument("--out", type=str, default=None, help="JSON results")
    args = parser.parse_args(argv)

    import_toolkit("cstoolkit.backbones.infinity", "cstoolkit.methods.csd_var")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny, "targets": TARGETS,
                           "torch": torch.__version__}
    names = ["switti", "infinity"] if args.backbone == "all" else [args.backbone]
    for name in names:
        try:
            bench(name, args, device, dtype, out)
        except LookupError as exc:
            out[name] = {"skipped": str(exc)}
            print(f"[{name}] skipped: {exc}", flush=True)
        _write(args, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
