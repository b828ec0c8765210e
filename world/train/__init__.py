"""Training the ``world`` presets: the real backbone architectures at tiny width, trained on the synthetic world.

``cstoolkit world train BACKBONE`` (or ``python -m cstoolkit.world.train BACKBONE``) trains one
backbone in a fixed time budget on one GPU and writes what the ``world`` preset loads::

    OUT/sdxl/unet/{config.json,diffusion_pytorch_model.safetensors}    # diffusers layout, fp16
    OUT/sdxl/vae/{config.json,diffusion_pytorch_model.safetensors}
    OUT/infinity/transformer.safetensors, vae.safetensors               # official key layout, fp16
    OUT/infinity/text_encoder/                                          # the T5 trained with it (transformers)
    OUT/<backbone>/world.json                                           # training record + accuracies

The frozen parts (SDXL's two CLIP text encoders, Switti's CLIPs) are not trained: the preset rebuilds
them from the seed of the ``tiny`` preset, so training conditions on exactly those. Infinity's tiny T5
trains with the transformer (``train_text``; ``--frozen-text``: frozen from its seed, as Switti's CLIPs).

Recipe of every backbone: (1) the image tokenizer (VAE / BSQ-VAE) is trained on the training
images, (2) the generator (UNet / transformer) is trained on the frozen tokenizer's latents with
captions that mix the three kinds (``a {content} in {style} style``, ``a {content}``,
``an image in {style} style``) and empty ones (classifier-free guidance), (3) held-out pairs and
training pairs are sampled with the backbone's own sampler and classified by the oracles.

``BACKBONE=all`` renders the image cache once and trains every available backbone (or those of
``--backbones``) in parallel as separate processes on the same GPU (what the shipped weights were made
with). ``--init-from DIR|shipped`` continues trained weights: tokenizers frozen, the whole budget to the
generator; with ``--keep-base W`` (Infinity, Switti) a frozen copy of the loaded generator keeps its predictions on
the base captions (W * KL on those samples) while the augmented captions are learned. Every trainer runs its phases
through :func:`fit`, the one training loop.

Layout: :mod:`.common` (config, images, the loop, evaluation), :mod:`.captions` (caption table and draw),
one module per backbone (:mod:`.sdxl`, :mod:`.infinity`, :mod:`.switti`); this module holds the entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cstoolkit.errors import UserError

from .captions import CAPTION_MIX, caption_table, draw_captions
from .common import (
    EMA,
    WORLD_PRESET,
    Clock,
    Log,
    TrainConfig,
    WorldData,
    balanced_scale_weights,
    eval_prompts,
    evaluate,
    evaluate_cfg_scales,
    fit,
    init_root,
    render_cache,
    score,
)
from .infinity import _train_infinity, save_infinity_parts
from .sdxl import _train_sdxl, repair_world_decoder, save_sdxl_parts
from .switti import _train_switti, save_switti_parts

__all__ = ["BACKBONES", "CAPTION_MIX", "DEFAULT_BATCH", "DEFAULT_LR", "EMA", "TRAINERS", "WORLD_PRESET", "Clock",
           "Log", "TrainConfig", "WorldData", "add_train_arguments", "balanced_scale_weights", "caption_table",
           "cmd_train", "draw_captions", "eval_prompts", "evaluate", "evaluate_cfg_scales", "fit", "init_root",
           "main", "render_cache", "repair_world_decoder", "save_infinity_parts", "save_sdxl_parts",
           "save_switti_parts", "score", "train", "train_all"]

BACKBONES = ("sdxl", "infinity", "switti")

#: generator batch per backbone (SDXL: the probe's 512; Infinity: 256 images x 521 tokens)
DEFAULT_BATCH = {"sdxl": 512, "infinity": 256, "switti": 256}
#: generator peak learning rate (SDXL: the probe's 1e-3; the 8 x 256 transformers a little lower)
DEFAULT_LR = {"sdxl": 1e-3, "infinity": 6e-4, "switti": 6e-4}

TRAINERS: dict[str, Callable[[TrainConfig, WorldData, Path, Log], dict[str, Any]]] = {
    "sdxl": _train_sdxl,
    "infinity": _train_infinity,
}


def _switti_has_world() -> bool:
    try:
        from cstoolkit.backbones.switti import PRESETS
    except ImportError:
        return False
    return "world" in PRESETS


if _switti_has_world():
    TRAINERS["switti"] = _train_switti


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def train(backbone: str, out_dir: str | os.PathLike[str], *, minutes: float, seed: int = 0, device: str = "cuda",
          **options: Any) -> dict[str, Any]:
    """Train the ``world`` preset of ``backbone`` for ``minutes`` and write it under ``out_dir/backbone``.

    Returns the training record (also written to ``out_dir/backbone/world.json``): steps, times,
    VAE PSNR, file sizes and the oracle accuracies of samples of held-out and training pairs.
    ``options`` are other :class:`TrainConfig` fields (``batch``, ``cache``, ...).
    """
    if backbone not in TRAINERS:
        raise UserError("world train", f"unknown or unavailable backbone '{backbone}'",
                        f"expected one of {', '.join(TRAINERS)} (or all)")
    if minutes <= 0:
        raise UserError("world train --minutes", f"{minutes}", "expected a positive number of minutes")
    cfg = TrainConfig(minutes=minutes, seed=seed, device=device, **options)
    if not 0.0 <= cfg.caption_augment <= 1.0:
        raise UserError("world train --caption-augment", f"{cfg.caption_augment}", "expected a share from 0 to 1")
    _check_keep_base(cfg.keep_base, cfg.init_from, [backbone])
    cfg.batch = cfg.batch or DEFAULT_BATCH[backbone]
    cfg.lr = cfg.lr or DEFAULT_LR[backbone]
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("world train --device", "CUDA is not available", "expected a GPU machine or --device cpu")
    if cfg.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(cfg.device))  # implicit allocations land on the same GPU
    out = Path(out_dir)
    (out / backbone).mkdir(parents=True, exist_ok=True)
    log = Log(out / backbone, backbone, cfg.log_every_s)
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    cache = Path(cfg.cache) if cfg.cache else out / f"cache_{cfg.size}px_{cfg.images_per_pair}.npz"
    render_cache(cache, images_per_pair=cfg.images_per_pair, size=cfg.size, seed=seed, workers=cfg.workers)
    data = WorldData.load(cache, torch.device(cfg.device))
    log(f"{len(data)} training images; budget {minutes} min on {cfg.device}")
    record = TRAINERS[backbone](cfg, data, out, log)
    record["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("extra",)}
    if cfg.init_from:  # the weights this run continued (the record of that run is kept alongside)
        prior = init_root(cfg.init_from) / backbone / "world.json"
        record["continued_from"] = json.loads(prior.read_text()) if prior.is_file() else str(prior)
    record["device"] = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"
    record["training_images"] = len(data)
    record["wall_seconds"] = round(time.time() - t0, 1)
    record["versions"] = {"torch": torch.__version__}
    path = out / backbone / "world.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    log(f"done in {record['wall_seconds']} s; accuracies {json.dumps(record.get('eval', {}), default=str)[:600]}")
    return record


def train_all(out_dir: str | os.PathLike[str], *, minutes: float, seed: int = 0, device: str = "cuda",
              backbones: Sequence[str] | None = None, **options: Any) -> dict[str, int]:
    """Render the cache once, then train ``backbones`` (default: all available) in parallel processes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(minutes=minutes, seed=seed, device=device, **options)
    names = list(backbones or TRAINERS)
    _check_keep_base(cfg.keep_base, cfg.init_from, names)
    cache = Path(cfg.cache) if cfg.cache else out / f"cache_{cfg.size}px_{cfg.images_per_pair}.npz"
    render_cache(cache, images_per_pair=cfg.images_per_pair, size=cfg.size, seed=seed, workers=cfg.workers)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    procs = {}
    for i, name in enumerate(names):
        # several GPUs: one backbone per GPU (processes sharing one GPU are time-sliced)
        dev = f"cuda:{i % gpus}" if gpus > 1 else device
        cmd = [sys.executable, "-m", "cstoolkit.world.train", name, "--out", str(out), "--minutes", str(minutes),
               "--seed", str(seed), "--device", dev, "--cache", str(cache)]
        for key, value in options.items():
            if key == "scale_balance":
                cmd += [] if value in (None, True) else ["--no-scale-balance"]
            elif key == "train_text":
                cmd += [] if value in (None, True) else ["--frozen-text"]
            elif key == "caption_repeats":
                cmd += ["--caption-repeats", ",".join(map(str, value)) or "none"]
            elif key != "cache" and value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        procs[name] = subprocess.Popen(cmd)
    codes = {name: p.wait() for name, p in procs.items()}
    print(f"[all] exit codes {codes}", flush=True)
    return codes


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cstoolkit world train`` (also ``python -m cstoolkit.world.train``)."""
    p.add_argument("backbone", choices=[*BACKBONES, "all"], help="backbone to train, or all in parallel")
    p.add_argument("--minutes", type=float, default=7.0, help="training budget (tokenizer + generator)")
    p.add_argument("--out", default="world-weights", help="output folder (OUT/<backbone>/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cache", default=None, help=".npz of rendered training images (rendered if missing)")
    p.add_argument("--batch", type=int, default=None, help="generator batch size")
    p.add_argument("--tokenizer-batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="generator peak learning rate")
    p.add_argument("--images-per-pair", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--eval-train-pairs", type=int, default=None)
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default 128; small for smoke tests)")
    p.add_argument("--backbones", default=None, help="with `all`: a comma-separated subset (e.g. sdxl,switti)")
    p.add_argument("--init-from", default=None,
                   help="continue from trained weights: a folder like world/weights, or 'shipped' (the tokenizer "
                        "is loaded and kept frozen; the whole budget goes to the generator)")
    p.add_argument("--no-scale-balance", dest="scale_balance", action="store_false", default=None,
                   help="scale-wise backbones: keep the official per-token loss weights (default: every scale "
                        "weighs the same)")
    p.add_argument("--self-correction", type=float, default=None,
                   help="Infinity: Bitwise Self-Correction strength (default 0.3, the official; 0 = off)")
    p.add_argument("--caption-augment", type=float, default=None,
                   help="share of training captions drawn from the augmented variants (templates, synonyms, "
                        "repeated words, word dropout; default 0.5; 0 = the base captions only)")
    p.add_argument("--caption-repeats", default=None,
                   help="how often the repeated-word caption variants repeat a class word, comma-separated "
                        "(default 2,3,4; 'none': no such variants)")
    p.add_argument("--keep-base", type=float, default=None, metavar="W",
                   help="Infinity, Switti, with --init-from: add W * KL(teacher || student) on the samples drawn "
                        "with a base caption, the teacher a frozen copy of the loaded generator, to keep its behaviour "
                        "on the base captions while the augmented ones are learned (1.0 is a sensible value; default 0 "
                        "= off; one more no-grad forward per step)")
    p.add_argument("--decoder-repair", type=float, default=None,
                   help="SDXL: share of the budget spent fine-tuning the VAE decoder alone against local artifacts "
                        "(the top-right dot; default 0.15; 0 = off)")
    p.add_argument("--frozen-text", dest="train_text", action="store_false", default=None,
                   help="Infinity: keep the world T5 frozen and random (default: it trains with the transformer)")
    p.add_argument("--repair-decoder-only", action="store_true",
                   help="SDXL: only repair the VAE decoder of trained weights (--init-from, default 'shipped') for "
                        "--minutes, UNet unchanged; small enough for --device cpu (default there: 32 images per "
                        "pair, --tokenizer-batch 8)")
    p.add_argument("--vae-groups", type=int, default=None,
                   help="SDXL, with --repair-decoder-only: rebuild the VAE with this many GroupNorm groups and fit it "
                        "back to the trained one (encoder distilled, decoder retrained) instead of the repair")
    p.add_argument("--reinit-decoder", action="store_true",
                   help="SDXL, with --vae-groups: the rebuilt VAE's decoder starts from fresh weights (no spike "
                        "inherited) instead of the trained one's")
    p.add_argument("--decoder-unet-latents", type=int, default=0,
                   help="SDXL, with --vae-groups: also train the rebuilt decoder on this many latents the UNet "
                        "samples, decoded by --decoder-sample-reference (top-right corner masked; default 0 = off)")
    p.add_argument("--decoder-sample-reference", default="shipped",
                   help="SDXL, with --decoder-unet-latents: the weights whose VAE decodes the UNet's latents into "
                        "the targets (a folder laid out like world/weights, or 'shipped'; default)")
    p.add_argument("--decoder-lr", type=float, default=None, help="SDXL: peak learning rate of the decoder repair "
                   "(default 3e-4)")


def _check_keep_base(weight: float, init_from: str | None, backbones: Sequence[str]) -> None:
    """``--keep-base W``: a one-line :class:`UserError` unless W >= 0 and, for W > 0, the run continues trained
    weights (``--init-from``: the frozen teacher) of scale-wise backbones only (SDXL has no such term)."""
    if weight < 0:
        raise UserError("world train --keep-base", f"{weight}", "expected a weight of 0 or more")
    if weight and not init_from:
        raise UserError("world train --keep-base", "without --init-from",
                        "it needs --init-from (the frozen teacher is the warm-start model)")
    if weight and "sdxl" in backbones:
        raise UserError("world train --keep-base", "backbone sdxl",
                        "expected infinity or switti (with `all`: --backbones without sdxl)")


def _repeats(text: str) -> tuple[int, ...]:
    """``--caption-repeats``: "2,3,4" -> (2, 3, 4); "none" or "" -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(k < 2 for k in counts):
        raise UserError("world train --caption-repeats", f"'{text}'",
                        "expected comma-separated counts of 2 or more (e.g. 2,3,4), or none")
    return counts


def cmd_train(args: argparse.Namespace) -> int:
    """Run a parsed ``world train`` command line."""
    options = {k: getattr(args, k) for k in ("cache", "batch", "tokenizer_batch", "images_per_pair", "eval_images",
                                             "eval_train_pairs", "eval_steps", "workers", "size", "lr",
                                             "init_from", "scale_balance", "train_text", "self_correction",
                                             "caption_augment", "decoder_repair", "decoder_lr", "keep_base")
               if getattr(args, k, None) is not None}
    if getattr(args, "caption_repeats", None) is not None:
        options["caption_repeats"] = _repeats(args.caption_repeats)
    for key, top in (("caption_augment", 1.0), ("decoder_repair", 0.5)):  # stops before the cache is rendered
        if not 0.0 <= options.get(key, 0.0) <= top:
            raise UserError(f"world train --{key.replace('_', '-')}", f"{options[key]}",
                            f"expected a share from 0 to {top:g}")
    if args.init_from:
        init_root(args.init_from)  # a wrong folder stops here, before the image cache is rendered
    names = [b.strip() for b in args.backbones.split(",")] if args.backbone == "all" and args.backbones else None
    _check_keep_base(options.get("keep_base", 0.0), args.init_from,
                     [args.backbone] if args.backbone != "all" else names or list(TRAINERS))
    for flag, value in (("--vae-groups", getattr(args, "vae_groups", None)),
                        ("--reinit-decoder", getattr(args, "reinit_decoder", False)),
                        ("--decoder-unet-latents", getattr(args, "decoder_unet_latents", 0))):
        if value and not getattr(args, "repair_decoder_only", False):  # would be ignored by a full training
            raise UserError(f"world train {flag}", "without --repair-decoder-only",
                            "expected --repair-decoder-only as well (the VAE rebuild runs on trained weights)")
    if getattr(args, "repair_decoder_only", False):
        if args.backbone != "sdxl":
            raise UserError("world train --repair-decoder-only", f"backbone '{args.backbone}'",
                            "expected sdxl (the VAE decoder repair is SDXL's)")
        repair_world_decoder(args.out, init_from=args.init_from or "shipped", minutes=args.minutes, seed=args.seed,
                             device=args.device, images_per_pair=args.images_per_pair or 32,
                             batch=args.tokenizer_batch or 8, lr=args.decoder_lr or 3e-4, cache=args.cache,
                             workers=args.workers or 0, groups=args.vae_groups,
                             reinit_decoder=args.reinit_decoder, unet_latents=args.decoder_unet_latents,
                             sample_reference=args.decoder_sample_reference)
        return 0
    if args.backbone == "all":
        unknown = [b for b in names or () if b not in TRAINERS]
        if unknown:
            raise UserError("world train --backbones", f"unknown backbone '{unknown[0]}'",
                            f"expected some of {', '.join(TRAINERS)}")
        codes = train_all(args.out, minutes=args.minutes, seed=args.seed, device=args.device, backbones=names,
                          **options)
        return max(codes.values(), default=0)
    train(args.backbone, args.out, minutes=args.minutes, seed=args.seed, device=args.device, **options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cstoolkit.world.train", description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except UserError as exc:  # one line, exit 2, as from `cstoolkit world train`
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
