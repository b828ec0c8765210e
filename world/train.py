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
generator. Every trainer runs its phases through :func:`fit`, the one training loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cstoolkit.errors import UserError

BACKBONES = ("sdxl", "infinity", "switti")

#: caption mix of the generator training: (kind, probability); "" = empty caption (CFG)
CAPTION_MIX = (("both", 0.70), ("content", 0.10), ("style", 0.10), ("", 0.10))


@dataclass
class TrainConfig:
    """Knobs of :func:`train` (defaults: the shipped run on one H200)."""

    minutes: float = 7.0  # training time of both phases (tokenizer + generator), evaluation excluded
    seed: int = 0
    device: str = "cuda"
    size: int = 128
    tokenizer_fraction: float = 0.22  # share of ``minutes`` spent on the VAE / BSQ-VAE
    batch: int = 0  # generator batch (0 = the backbone's default in DEFAULT_BATCH)
    tokenizer_batch: int = 64
    lr: float = 0.0  # generator peak learning rate (0 = the backbone's default in DEFAULT_LR)
    tokenizer_lr: float = 1e-3
    warmup_steps: int = 200
    ema: float = 0.999
    images_per_pair: int = 320  # rendered training images per training pair (the cache)
    eval_images: int = 8  # samples per pair in the evaluation
    eval_train_pairs: int = 16  # training pairs sampled in the evaluation (held-out pairs: all)
    eval_steps: int = 25  # SDXL sampling steps
    eval_guidance: tuple[float, ...] = (4.0, 7.0)  # SDXL CFG scales (Infinity: cfg 1 and 3, Switti: 3 and 6)
    cache: str | None = None  # .npz of rendered training images (rendered here if missing)
    workers: int = 0  # render processes (0 = cpu count)
    log_every_s: float = 20.0
    #: continue from trained weights: a folder laid out like world/weights (``<dir>/<backbone>/...``), or
    #: "shipped" (the package's world/weights). The tokenizer is then loaded and kept frozen (no phase 1:
    #: the generator was trained on its codes) and the whole budget goes to the generator.
    init_from: str | None = None
    #: scale-wise backbones: reweight the teacher-forcing loss so that every scale weighs the same in
    #: total (the official losses give the few tokens of the coarse scales, which decide the shape, a
    #: few per cent of the loss); see :func:`balanced_scale_weights`
    scale_balance: bool = True
    #: Infinity: train the world T5 together with the transformer (saved as ``text_encoder/``). A frozen
    #: random byte-level T5 left the shapes unreadable: class words are byte sequences mixed by random
    #: layers (Switti's word-level CLIPs give each class word its own token)
    train_text: bool = True
    #: Infinity: Bitwise Self-Correction strength of the teacher forcing (official training: 0.3; 0 = off;
    #: :func:`~cstoolkit.backbones.infinity.quantizer.multiscale_targets`). Added after run 4, whose
    #: teacher-forced coarse tokens were only 40-55 % right in all 16 bits: sampling errors compound
    self_correction: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The world: names, captions, images
# ---------------------------------------------------------------------------------------------
def _gen() -> Any:
    from cstoolkit.world import generator

    return generator


def caption_table() -> tuple[list[str], dict[tuple[str, int, int], int]]:
    """Every caption the generator is trained or evaluated on, and (kind, content, style) -> index.

    Kinds: ``both`` (every pair, held-out ones included: evaluation needs them), ``content``
    (style -1), ``style`` (content -1) and ``""`` (the empty caption, -1, -1).
    """
    g = _gen()
    captions: list[str] = []
    index: dict[tuple[str, int, int], int] = {}

    def add(key: tuple[str, int, int], text: str) -> None:
        index[key] = len(captions)
        captions.append(text)

    for c, cname in enumerate(g.CONTENTS):
        for s, sname in enumerate(g.STYLES):
            add(("both", c, s), g.caption(cname, sname, kind="both"))
    for c, cname in enumerate(g.CONTENTS):
        add(("content", c, -1), g.caption(cname, g.STYLES[0], kind="content"))
    for s, sname in enumerate(g.STYLES):
        add(("style", -1, s), g.caption(g.CONTENTS[0], sname, kind="style"))
    add(("", -1, -1), "")
    return captions, index


def _pair_ids(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[int, int]]:
    """Pairs given by name or index -> (content index, style index)."""
    g = _gen()
    out = []
    for c, s in pairs:
        ci = c if isinstance(c, int) else list(g.CONTENTS).index(c)
        si = s if isinstance(s, int) else list(g.STYLES).index(s)
        out.append((int(ci), int(si)))
    return out


def _render_chunk(args: tuple[int, int, int, list[tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker: ``n`` training images of ``pairs`` (uint8 NHWC) with their content and style ids."""
    n, seed, size, pairs = args
    torch.set_num_threads(1)
    g = _gen()
    names = [(g.CONTENTS[c], g.STYLES[s]) for c, s in pairs]
    images, _, cids, sids = g.sample_batch(n, seed=seed, size=size, pairs=names)
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return arr.numpy(), np.asarray(cids, dtype=np.int16), np.asarray(sids, dtype=np.int16)


def render_cache(path: str | os.PathLike[str], *, images_per_pair: int, size: int = 128, seed: int = 0,
                 workers: int = 0) -> Path:
    """Render the training images (training pairs only) into ``path`` (.npz: images uint8 NHWC, content, style).

    Chunks of 64 images are rendered in ``workers`` processes (seeds ``seed * 100003 + chunk``).
    Written to a temporary name and renamed, so a half-written cache is never read.
    """
    path = Path(path)
    if path.is_file():
        return path
    g = _gen()
    pairs = _pair_ids(g.train_pairs())
    total = images_per_pair * len(pairs)
    chunk = 64
    jobs = [(min(chunk, total - i), seed * 100003 + k, size, pairs) for k, i in enumerate(range(0, total, chunk))]
    workers = workers or max(1, (os.cpu_count() or 2))
    t0 = time.time()
    if workers == 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    images = np.concatenate([p[0] for p in parts])
    cids = np.concatenate([p[1] for p in parts])
    sids = np.concatenate([p[2] for p in parts])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, content=cids, style=sids)
    os.replace(tmp, path)
    print(f"[cache] {total} images of {len(pairs)} pairs at {size} px in {time.time() - t0:.1f} s "
          f"({workers} workers) -> {path}", flush=True)
    return path


@dataclass
class WorldData:
    """The training images on the device: uint8 (N, 3, H, W), content and style ids (N,)."""

    images: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device) -> "WorldData":
        d = np.load(path)
        images = torch.from_numpy(d["images"]).to(device).permute(0, 3, 1, 2).contiguous()
        return cls(images, torch.from_numpy(d["content"].astype(np.int64)).to(device),
                   torch.from_numpy(d["style"].astype(np.int64)).to(device))

    def __len__(self) -> int:
        return self.images.shape[0]

    def float_images(self, idx: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` in [-1, 1], float32."""
        return self.images[idx].float() / 127.5 - 1.0


def draw_captions(content: torch.Tensor, style: torch.Tensor, index: dict[tuple[str, int, int], int],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption index per sample, drawn from :data:`CAPTION_MIX`, and a bool "empty caption" flag."""
    n = content.shape[0]
    probs = torch.tensor([p for _, p in CAPTION_MIX])
    kind = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
    out = []
    for k, c, s in zip(kind, content.tolist(), style.tolist()):
        name = CAPTION_MIX[k][0]
        key = {"both": ("both", c, s), "content": ("content", c, -1), "style": ("style", -1, s)}.get(name, ("", -1, -1))
        out.append(index[key])
    kinds = torch.tensor(kind)
    return torch.tensor(out), kinds == len(CAPTION_MIX) - 1


# ---------------------------------------------------------------------------------------------
# Shared training utilities
# ---------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock budget with a cosine learning-rate schedule over the elapsed fraction."""

    def __init__(self, seconds: float, warmup_steps: int, lr: float):
        self.seconds, self.warmup, self.lr = max(1e-3, seconds), warmup_steps, lr
        self.start = time.time()
        self.step = 0

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    def done(self) -> bool:
        return self.elapsed >= self.seconds

    def current_lr(self) -> float:
        frac = min(1.0, self.elapsed / self.seconds)
        warm = min(1.0, (self.step + 1) / max(1, self.warmup))
        return self.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


class EMA:
    """Exponential moving average of a module's float parameters (warm-up: decay (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.n = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        sd = module.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))


class Log:
    """Progress lines to stdout and ``train.log`` (three runs share one terminal)."""

    def __init__(self, out: Path, tag: str, every: float):
        self.file = open(out / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self.tag, self.every, self.last = tag, every, 0.0

    def __call__(self, msg: str, force: bool = True) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        line = f"[{self.tag} {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused or None)


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit(module: torch.nn.Module, loss_fn: Callable[[int], tuple[torch.Tensor, str]], *, seconds: float, lr: float,
        warmup: int, log: Log, tag: str, ema: float | None = None,
        after_step: Callable[[int], None] | None = None) -> Clock:
    """Train ``module`` for ``seconds`` of wall time (0: not at all): AdamW, warm-up then cosine decay of the
    learning rate (:class:`Clock`), gradients clipped to norm 1, and with ``ema`` an exponential moving
    average of the weights, copied into ``module`` at the end. ``loss_fn(step)`` draws a batch and returns
    the loss and a note for the progress line; ``after_step(step)`` runs after each update. The module is
    left in eval mode without gradients; the returned clock has the steps and seconds."""
    module.train().requires_grad_(True)
    params = list(module.parameters())
    opt = _adam(params, lr)
    average = EMA(module, ema) if ema else None
    clock = Clock(seconds, warmup, lr)
    while seconds > 0 and not clock.done():
        for group in opt.param_groups:
            group["lr"] = clock.current_lr()
        loss, note = loss_fn(clock.step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if average is not None:
            average.update(module)
        if after_step is not None:
            after_step(clock.step)
        clock.step += 1
        log(f"{tag} step {clock.step} loss {loss.item():.4f} {note}lr {clock.current_lr():.2e} "
            f"{clock.step / clock.elapsed:.1f} it/s", force=False)
    if average is not None:
        average.copy_to(module)
    module.eval().requires_grad_(False)
    return clock


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = F.mse_loss(x.float().clamp(-1, 1), y.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def _save_st_fp16(state: dict[str, torch.Tensor], path: Path, limit_mb: float = 24.0) -> int:
    from safetensors.torch import save_file

    tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    size = path.stat().st_size
    if size > limit_mb * 1e6:
        raise RuntimeError(f"{path} is {size / 1e6:.1f} MB, over the {limit_mb} MB limit")
    return size


def balanced_scale_weights(schedule: Sequence[tuple[int, int]], totals: Sequence[float]) -> list[float]:
    """Per-scale loss multipliers that give every scale the same share ``1/S`` of the loss, where
    ``totals[i]`` is the share scale ``i`` has under the backbone's own loss."""
    n = len(schedule)
    return [1.0 / (n * t) for t in totals]


def init_root(init_from: str) -> Path:
    """The folder ``--init-from`` names ("shipped": the package's world/weights); a one-line
    :class:`UserError` if it is not a folder."""
    root = Path(__file__).resolve().parent / "weights" if init_from == "shipped" else Path(init_from)
    if not root.is_dir():
        raise UserError("world train --init-from", f"{init_from} is not a folder",
                        "expected a folder laid out like world/weights (<dir>/<backbone>/...), or 'shipped'")
    return root


def _warm_start(backbone: str, cfg: TrainConfig, build: Callable[[], Any]) -> Any | None:
    """``build()`` (the backbone's ``preset: world`` through its real loading path) with the weights
    of ``cfg.init_from``; None without ``init_from`` or without weights of ``backbone`` there (then the
    backbone trains from scratch). The caller moves the parts it trains to fp32."""
    if not cfg.init_from:
        return None
    root = init_root(cfg.init_from)
    if not (root / backbone).is_dir():  # e.g. `all` continuing the shipped weights, one backbone never shipped
        print(f"[{backbone}] --init-from: no {root / backbone}/, training from scratch", flush=True)
        return None
    previous = os.environ.get("CSTOOLKIT_WORLD_WEIGHTS")
    os.environ["CSTOOLKIT_WORLD_WEIGHTS"] = str(root)
    try:
        return build()
    finally:
        if previous is None:
            os.environ.pop("CSTOOLKIT_WORLD_WEIGHTS", None)
        else:
            os.environ["CSTOOLKIT_WORLD_WEIGHTS"] = previous


# ---------------------------------------------------------------------------------------------
# Evaluation (oracles)
# ---------------------------------------------------------------------------------------------
def _classify(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Oracle (content, style) ids of images (B, 3, H, W) in [-1, 1]; None without oracle weights."""
    try:
        from cstoolkit.world.oracle import load_oracle

        oracle = load_oracle()
    except Exception as exc:  # oracle weights not shipped yet: the samples are kept for later scoring
        print(f"[eval] no oracle ({type(exc).__name__}: {str(exc)[:160]}); saving samples only", flush=True)
        return None
    g = _gen()
    results = oracle.classify(images.float().clamp(-1, 1).cpu())
    c = [_as_id(r["content"], g.CONTENTS) for r in results]
    s = [_as_id(r["style"], g.STYLES) for r in results]
    return torch.tensor(c), torch.tensor(s)


def _as_id(value: Any, names: Sequence[str]) -> int:
    if isinstance(value, dict):
        value = value.get("name", value.get("label"))
    return int(value) if isinstance(value, (int, np.integer)) else list(names).index(value)


def score(images: torch.Tensor, content: Sequence[int], style: Sequence[int]) -> dict[str, float] | None:
    """Oracle accuracy of images whose intended content/style ids are given (-1 = not scored)."""
    pred = _classify(images)
    if pred is None:
        return None
    c = torch.tensor(list(content))
    s = torch.tensor(list(style))
    out: dict[str, float] = {}
    if (c >= 0).any():
        out["content"] = float((pred[0][c >= 0] == c[c >= 0]).float().mean())
    if (s >= 0).any():
        out["style"] = float((pred[1][s >= 0] == s[s >= 0]).float().mean())
    return out


def eval_prompts(cfg: TrainConfig) -> list[tuple[str, str, int, int]]:
    """(group, caption, content id, style id) of the evaluation: held-out pairs, training pairs,
    content-only and style-only captions; ``eval_images`` samples each."""
    g = _gen()
    held = _pair_ids(g.HELD_OUT)
    train = _pair_ids(g.train_pairs())
    rng = np.random.default_rng(cfg.seed)
    train = [train[i] for i in sorted(rng.choice(len(train), min(cfg.eval_train_pairs, len(train)), replace=False))]
    rows = []
    for group, pairs in (("held_out", held), ("train", train)):
        for c, s in pairs:
            rows.append((group, g.caption(g.CONTENTS[c], g.STYLES[s], kind="both"), c, s))
    for c, name in enumerate(g.CONTENTS):
        rows.append(("content_only", g.caption(name, g.STYLES[0], kind="content"), c, -1))
    for s, name in enumerate(g.STYLES):
        rows.append(("style_only", g.caption(g.CONTENTS[0], name, kind="style"), -1, s))
    return rows


def evaluate(sample: Callable[[list[str], int], torch.Tensor], cfg: TrainConfig, out: Path, tag: str
             ) -> dict[str, Any]:
    """Sample every evaluation prompt ``eval_images`` times with ``sample(prompts, seed) -> images``,
    score with the oracles per group, save a grid of the held-out samples."""
    rows = eval_prompts(cfg)
    prompts = [r[1] for r in rows for _ in range(cfg.eval_images)]
    seeds = [cfg.seed + 1000 + i for _ in rows for i in range(cfg.eval_images)]
    images = sample(prompts, seeds)  # type: ignore[arg-type]
    result: dict[str, Any] = {}
    per = {}
    for group in ("held_out", "train", "content_only", "style_only"):
        idx = [k for k in range(len(prompts)) if rows[k // cfg.eval_images][0] == group]
        if not idx:
            continue
        cids = [rows[k // cfg.eval_images][2] for k in idx]
        sids = [rows[k // cfg.eval_images][3] for k in idx]
        per[group] = score(images[idx], cids, sids)
        per[group] = {**(per[group] or {}), "images": len(idx)}
    result["accuracy"] = per
    shown = min(4, cfg.eval_images)  # grid: 4 samples of every held-out pair at 64 px (small enough to ship back)
    held = [k for k in range(len(prompts))
            if rows[k // cfg.eval_images][0] == "held_out" and k % cfg.eval_images < shown]
    small = F.interpolate(images.float(), size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    _save_grid(small[held], out / f"samples_{tag}.png", shown)
    np.savez_compressed(out / f"samples_{tag}.npz",  # 64 px (the oracles' input size): for scoring later
                        images=((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy(),
                        content=np.array([rows[k // cfg.eval_images][2] for k in range(len(prompts))]),
                        style=np.array([rows[k // cfg.eval_images][3] for k in range(len(prompts))]),
                        group=np.array([rows[k // cfg.eval_images][0] for k in range(len(prompts))]))
    return result


def evaluate_cfg_scales(sample: Callable[[list[str], list[int], float], torch.Tensor], scales: Sequence[float],
                        cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """:func:`evaluate` at each CFG scale (``sample(prompts, seeds, scale) -> images``), with its seconds,
    keyed ``cfg<scale>``."""
    results = {}
    for scale in scales:
        t0 = time.time()
        tag = f"cfg{scale:g}"
        results[tag] = evaluate(lambda prompts, seeds, g=scale: sample(prompts, seeds, g), cfg, out, tag)
        results[tag]["seconds"] = round(time.time() - t0, 1)
    return results


def _save_grid(images: torch.Tensor, path: Path, ncol: int) -> None:
    from PIL import Image

    if images.shape[0] == 0:
        return
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, _, h, w = x.shape
    rows = math.ceil(n / ncol)
    grid = torch.zeros(3, rows * h, ncol * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# ---------------------------------------------------------------------------------------------
# SDXL: AutoencoderKL, then the UNet on frozen CLIP-L / bigG (tiny, from the preset seed)
# ---------------------------------------------------------------------------------------------
def _train_sdxl(cfg: TrainConfig, data: WorldData, out: Path, log: Log) -> dict[str, Any]:
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    dev = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    warm = _warm_start("sdxl", cfg, lambda: SDXLBackbone.from_config(SDXLConfig(preset="world"), device=dev))
    bb = warm or SDXLBackbone.from_config(SDXLConfig(preset="tiny"), device=dev)  # text encoders: the tiny preset's
    unet, vae = bb.unet.float(), bb.vae.float()
    vae.disable_slicing()  # the backbone slices the batch (one image at a time, for 1024 px): not here
    record: dict[str, Any] = {"backbone": "sdxl", "unet_params": sum(p.numel() for p in unet.parameters()),
                              "vae_params": sum(p.numel() for p in vae.parameters())}

    tok_fraction = 0.0 if warm else cfg.tokenizer_fraction  # warm start: the VAE stays as loaded
    # ---- phase 1: VAE (L1 + MSE reconstruction, small KL)
    def vae_loss(step: int) -> tuple[torch.Tensor, str]:
        x = data.float_images(torch.randint(0, len(data), (cfg.tokenizer_batch,), generator=gen).to(dev))
        with _autocast(dev):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / z[0].numel()
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl, f"psnr {_psnr(rec, x):.2f} dB "

    clock = fit(vae, vae_loss, seconds=cfg.minutes * 60 * tok_fraction, lr=cfg.tokenizer_lr, warmup=100, log=log,
                tag="vae")

    # ---- latents of every training image (posterior mean), scaling factor = 1 / std
    means, stds = [], []
    with torch.no_grad(), _autocast(dev):
        for i in range(0, len(data), 512):
            post = vae.encode(data.float_images(torch.arange(i, min(i + 512, len(data)), device=dev))).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
    latents = torch.cat(means)
    scale = float(vae.config.scaling_factor) if warm else float(1.0 / latents.std())  # warm: the UNet's scale
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    with torch.no_grad():
        k = torch.arange(0, min(256, len(data)), device=dev)
        rec = vae.decode(latents[k] / scale).sample.float()
        psnr = _psnr(rec, data.float_images(k))
    record["vae"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "psnr_db": round(psnr, 2),
                     "scaling_factor": scale, "posterior_std": float(torch.cat(stds).mean())}
    log(f"vae done: {clock.step} steps, PSNR {psnr:.2f} dB, scaling factor {scale:.3f}")

    # ---- text: every caption encoded once by the frozen encoders
    captions, index = caption_table()
    with torch.no_grad():
        emb = [bb.encode_prompt(captions[i:i + 64]) for i in range(0, len(captions), 64)]
    prompt_embeds = torch.cat([e.prompt_embeds for e in emb]).float()
    pooled = torch.cat([e.pooled for e in emb]).float()
    time_ids = bb.time_ids(1, dtype=torch.float32).to(dev)

    # ---- phase 2: UNet, epsilon prediction (the SDXL scheduler), min-SNR-5 weighting
    sched = bb.noise_scheduler
    alphas = sched.alphas_cumprod.to(dev)
    snr = alphas / (1 - alphas)

    def unet_loss(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        cap, empty = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen)
        idx, cap = idx.to(dev), cap.to(dev)
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), device=dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pe, po = prompt_embeds[cap], pooled[cap]
        # half of the empty captions are zeros: the pipeline's negative branch for an empty prompt
        zero = (empty & (torch.rand(cfg.batch, generator=gen) < 0.5)).to(dev)
        pe = torch.where(zero.view(-1, 1, 1), torch.zeros_like(pe), pe)
        po = torch.where(zero.view(-1, 1), torch.zeros_like(po), po)
        with _autocast(dev):
            pred = unet(xt, t, encoder_hidden_states=pe, added_cond_kwargs={
                "text_embeds": po, "time_ids": time_ids.expand(cfg.batch, -1)}, return_dict=False)[0]
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # Eq. min-SNR-gamma (gamma 5) for epsilon targets
        loss = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        return (loss * w).mean(), ""

    clock = fit(unet, unet_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction), lr=cfg.lr, warmup=cfg.warmup_steps,
                log=log, tag="unet", ema=cfg.ema)
    record["unet"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "batch": cfg.batch,
                      "images_seen": clock.step * cfg.batch}
    log(f"unet done: {clock.step} steps in {clock.elapsed:.0f} s")

    # ---- save (diffusers layout, fp16) before evaluating
    folder = out / "sdxl"
    for name, size in save_sdxl_parts(unet, vae, folder).items():
        record[name]["file_mb"] = round(size / 1e6, 2)

    # ---- evaluation with the backbone's own sampler (the diffusers pipeline, Euler)
    vae.enable_slicing()
    results = evaluate_cfg_scales(
        lambda prompts, seeds, g: _sdxl_sample(bb, prompts, seeds, steps=cfg.eval_steps, guidance=g),
        cfg.eval_guidance, cfg, folder)
    record["eval"] = {"sampler": f"EulerDiscrete {cfg.eval_steps} steps", **results}
    return record


def save_sdxl_parts(unet: torch.nn.Module, vae: torch.nn.Module, folder: str | os.PathLike[str]) -> dict[str, int]:
    """Write the trained UNet and VAE as the ``world`` preset reads them: diffusers' layout
    (``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``, same for ``vae/``), fp16.
    Returns the file sizes in bytes."""
    folder = Path(folder)
    sizes = {}
    for name, module in (("unet", unet), ("vae", vae)):
        module.save_config(folder / name)
        config = folder / name / "config.json"  # no trace of where a continued run loaded it from
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
        sizes[name] = _save_st_fp16(module.state_dict(), folder / name / "diffusion_pytorch_model.safetensors")
    return sizes


@torch.no_grad()
def _sdxl_sample(bb: Any, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                 chunk: int = 128) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from the SDXL pipeline; image i starts from CPU noise of seeds[i]."""
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), chunk):
        p = prompts[i:i + chunk]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + chunk]]
        with _autocast(bb.device):
            res = pipe(prompt=p, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                       height=bb.resolution, width=bb.resolution, output_type="pt")
        out.append(res.images.float().cpu() * 2 - 1)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Infinity: BSQ-VAE, then the transformer (official teacher-forcing loss) on a frozen tiny T5
# ---------------------------------------------------------------------------------------------
def _bsq_st(features: torch.Tensor, schedule: list[tuple[int, int]]) -> torch.Tensor:
    """Multi-scale BSQ of ``features`` with straight-through gradients: the accumulated codes the
    decoder reads (what :func:`multiscale_targets` quantises, differentiable w.r.t. the features)."""
    from cstoolkit.backbones.infinity.quantizer import resize_area, resize_up

    final = tuple(features.shape[-2:])
    acc = torch.zeros_like(features)
    d = features.shape[1]
    for h, w in schedule:
        r = F.normalize(resize_area(features - acc, (h, w)), dim=1)
        q = torch.where(r > 0, 1.0, -1.0) / d**0.5
        acc = acc + resize_up(r + (q - r).detach(), final)
    return acc


def _train_infinity(cfg: TrainConfig, data: WorldData, out: Path, log: Log) -> dict[str, Any]:
    from cstoolkit.backbone import ScaleTargets
    from cstoolkit.backbones.infinity import InfinityBackbone, InfinityConfig
    from cstoolkit.backbones.infinity.backbone import WORLD_TEXT_SEED
    from cstoolkit.backbones.infinity.quantizer import multiscale_targets
    from cstoolkit.backbones.infinity.text import T5TextEncoder
    from cstoolkit.backbones.infinity.transformer import build_transformer
    from cstoolkit.backbones.infinity.vae import build_vae

    dev = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    preset = WORLD_PRESET["infinity"]
    config = InfinityConfig(preset="tiny")
    warm = _warm_start("infinity", cfg, lambda: InfinityBackbone.from_config(InfinityConfig(preset="world"),
                                                                             device=dev))
    if warm is not None:
        tr, vae, text = warm.transformer.float(), warm.vae.float(), warm.text_encoder
    else:
        tr = build_transformer(preset, device=dev, seed=cfg.seed)
        vae = build_vae(preset, device=dev, seed=cfg.seed)
        text = T5TextEncoder.tiny(WORLD_TEXT_SEED, max_length=tr.cfg.text_maxlen).to(dev)  # frozen, from its seed
    bb = InfinityBackbone(config, tr, vae, text, resolution=cfg.size, weight_dtype=torch.float32)
    schedule = bb.scale_schedule(cfg.size)
    record: dict[str, Any] = {"backbone": "infinity", "schedule": schedule,
                              "transformer_params": sum(p.numel() for p in tr.parameters()),
                              "vae_params": sum(p.numel() for p in vae.parameters())}

    tok_fraction = 0.0 if warm is not None else cfg.tokenizer_fraction  # warm start: the BSQ-VAE as loaded
    # ---- phase 1: BSQ-VAE (L1 + MSE reconstruction through the multi-scale quantiser, commitment)
    def bsq_loss(step: int) -> tuple[torch.Tensor, str]:
        x = data.float_images(torch.randint(0, len(data), (cfg.tokenizer_batch,), generator=gen).to(dev))
        with _autocast(dev):
            f = vae.encoder(x).float()
            acc = _bsq_st(f, schedule)
            rec = vae.decoder(acc).float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.25 * F.mse_loss(f, acc.detach())
        return loss, f"psnr {_psnr(rec, x):.2f} dB "

    clock = fit(vae, bsq_loss, seconds=cfg.minutes * 60 * tok_fraction, lr=cfg.tokenizer_lr, warmup=100, log=log,
                tag="bsq-vae")
    feats = []
    with torch.no_grad(), _autocast(dev):
        for i in range(0, len(data), 512):
            feats.append(vae.encoder(data.float_images(torch.arange(i, min(i + 512, len(data)), device=dev))).float())
    features = torch.cat(feats)
    with torch.no_grad():
        k = torch.arange(0, min(256, len(data)), device=dev)
        bits, _ = multiscale_targets(features[k], schedule)
        from cstoolkit.backbones.infinity.quantizer import accumulate

        psnr = _psnr(vae.decode(accumulate(bits, schedule)), data.float_images(k))
    record["vae"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "psnr_db": round(psnr, 2)}
    log(f"bsq-vae done: {clock.step} steps, PSNR {psnr:.2f} dB (quantised, {len(schedule)} scales)")

    # ---- text: T5 features of every caption, padded to the longest (recomputed each step when the T5 trains)
    captions, index = caption_table()
    text.float()
    ids, attention = text.tokenize(captions)
    mask = attention.bool()
    tokens = None
    if not cfg.train_text:  # frozen: the caption features once
        with torch.no_grad():
            tokens = text(input_ids=ids, attention_mask=attention).float()
    trained = torch.nn.ModuleDict({"transformer": tr, "text": text.model}) if cfg.train_text else tr
    record["text_encoder"] = {"trained": cfg.train_text, "params": sum(p.numel() for p in text.parameters())}

    # ---- phase 2: transformer, teacher forcing; empty captions read cfg_uncond (as generation does)
    # official per-token weights sqrt(last area / area), normalised: scale i holds sqrt(area_i) / sum
    roots = [math.sqrt(h * w) for h, w in schedule]
    scale_weights = balanced_scale_weights(schedule, [r / sum(roots) for r in roots]) if cfg.scale_balance else None
    record["scale_weights"] = scale_weights

    def transformer_loss(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        cap, empty = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen)
        idx, cap, empty = idx.to(dev), cap.to(dev), empty.to(dev)
        with torch.no_grad():
            bits, inputs = multiscale_targets(features[idx], schedule, self_correction=cfg.self_correction,
                                              generator=gen)
        feats = text(input_ids=ids, attention_mask=attention).float() if tokens is None else tokens
        tk, mk = feats[cap], mask[cap]
        tk = torch.where(empty.view(-1, 1, 1), tr.null_text(mk), tk)
        with _autocast(dev):
            cond = tr.condition(tk, mk)
            logits = tr.teacher_forcing(cond, inputs, schedule)
        logits = list(logits.float().split([h * w for h, w in schedule], dim=1))
        targets = ScaleTargets(targets=bits, inputs=inputs, schedule=schedule)
        return bb.teacher_forcing_loss(logits, targets, scale_weights=scale_weights), ""

    clock = fit(trained, transformer_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction), lr=cfg.lr,
                warmup=cfg.warmup_steps, log=log, tag="transformer", ema=cfg.ema)
    record["transformer"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "batch": cfg.batch,
                             "images_seen": clock.step * cfg.batch}
    log(f"transformer done: {clock.step} steps in {clock.elapsed:.0f} s")

    folder = out / "infinity"
    for name, size in save_infinity_parts(tr, vae, folder, text if cfg.train_text else None).items():
        record[name]["file_mb"] = round(size / 1e6, 2)

    results = evaluate_cfg_scales(lambda prompts, seeds, c: _scalewise_sample(bb, prompts, seeds, cfg=c),
                                  (1.0, 3.0), cfg, folder)
    record["eval"] = {"sampler": "generate(tau=1, top_k=0, top_p=0)", **results}
    return record


def save_infinity_parts(transformer: torch.nn.Module, vae: torch.nn.Module, folder: str | os.PathLike[str],
                        text: Any = None) -> dict[str, int]:
    """Write the trained transformer and BSQ-VAE as the ``world`` preset reads them: flat fp16
    safetensors with the official state-dict keys (``transformer.safetensors``, ``vae.safetensors``);
    a trained T5 (:class:`T5TextEncoder`) as a transformers folder ``text_encoder/`` (fp16 weights and
    the byte-level tokenizer, what ``backbone.text_encoder`` loads). Returns the file sizes in bytes."""
    folder = Path(folder)
    sizes = {"transformer": _save_st_fp16(transformer.state_dict(), folder / "transformer.safetensors"),
             "vae": _save_st_fp16(vae.state_dict(), folder / "vae.safetensors")}
    if text is not None:
        half = {k: v.detach().to("cpu", torch.float16) for k, v in text.model.state_dict().items()}
        text.model.save_pretrained(folder / "text_encoder", state_dict=half)
        text.tokenizer.save_pretrained(folder / "text_encoder")
        sizes["text_encoder"] = (folder / "text_encoder" / "model.safetensors").stat().st_size
    return sizes


@torch.no_grad()
def _scalewise_sample(bb: Any, prompts: list[str], seeds: list[int], *, cfg: float, chunk: int = 256
                      ) -> torch.Tensor:
    """Images of a scale-wise backbone (Infinity, Switti) with its own sampler defaults, ``chunk`` prompts
    at a time."""
    out = []
    for i in range(0, len(prompts), chunk):
        with _autocast(bb.device):
            res = bb.generate_codes(prompts[i:i + chunk], cfg=cfg, seed=seeds[i:i + chunk])
        out.append(bb.decode(res.codes).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Switti: VAR's multi-scale VQ-VAE, then the transformer (official cross-entropy) on frozen CLIPs
# ---------------------------------------------------------------------------------------------
def _vq_st(vq: Any, f: torch.Tensor, patch_nums: Sequence[int], beta: float = 0.25
           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """VAR's training-time multi-scale residual quantisation of ``f`` (B, C, H, W): the
    straight-through ``f_hat``, the VQ loss (codebook + beta * commitment, mean over scales) and the
    indices. Same steps as :meth:`VQVAE.img_to_idx` (area down, nearest code, bicubic up, Phi)."""
    b, c, h, w = f.shape
    f_hat = torch.zeros_like(f)
    f_ng = f.detach()
    loss = f.new_zeros(())
    out = []
    for si, pn in enumerate(patch_nums):
        rest = f_ng - f_hat.detach()
        if si != len(patch_nums) - 1:
            rest = F.interpolate(rest, size=(pn, pn), mode="area")
        idx = vq.quantize.nearest(rest.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
        f_hat = f_hat + vq.quantize.upsampled(vq.embed(idx, pn), si, len(patch_nums), (h, w))
        loss = loss + F.mse_loss(f_hat, f_ng) + beta * F.mse_loss(f_hat.detach(), f)
        out.append(idx)
    return f + (f_hat - f).detach(), loss / len(patch_nums), out


def _train_switti(cfg: TrainConfig, data: WorldData, out: Path, log: Log) -> dict[str, Any]:
    from cstoolkit.backbone import ScaleTargets, TextContext
    from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig, build_transformer, build_vqvae, preset_row
    from cstoolkit.backbones.switti.text import DualCLIPText

    dev = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    row = preset_row("world")
    warm = _warm_start("switti", cfg, lambda: SwittiBackbone.from_config(SwittiConfig(preset="world"), device=dev))
    if warm is not None:
        tr, vq, text = warm.transformer.float(), warm.vae.float(), warm.text_encoder
    else:
        tr = build_transformer(row.transformer, device=dev, seed=cfg.seed)
        vq = build_vqvae(row.vqvae, device=dev, seed=cfg.seed)
        text = DualCLIPText.random(row.text.clip_l_config, row.text.clip_g_config, 0, row.text.max_length,
                                   device=dev)  # frozen, from the seed the world preset rebuilds them with
    bb = SwittiBackbone(SwittiConfig(preset="tiny"), tr, vq, text, resolution=cfg.size, weight_dtype=torch.float32)
    schedule = bb.scale_schedule(cfg.size)
    pns = [h for h, _ in schedule]
    record: dict[str, Any] = {"backbone": "switti", "schedule": schedule,
                              "transformer_params": sum(p.numel() for p in tr.parameters()),
                              "vae_params": sum(p.numel() for p in vq.parameters())}

    tok_fraction = 0.0 if warm is not None else cfg.tokenizer_fraction  # warm start: the VQ-VAE as loaded
    # ---- phase 1: VQ-VAE (L1 + MSE reconstruction + VQ loss); dead codes restarted from features
    hits = torch.zeros(vq.cfg.vocab_size, device=dev)
    last: dict[str, Any] = {}  # the step's features and codes, for the dead-code restart after the update

    def vq_loss_fn(step: int) -> tuple[torch.Tensor, str]:
        x = data.float_images(torch.randint(0, len(data), (cfg.tokenizer_batch,), generator=gen).to(dev))
        with _autocast(dev):
            f = vq.quant_conv(vq.encoder(x)).float()
            if step == 0:  # codebook initialised from features (avoids dead codes from the start)
                with torch.no_grad():
                    flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                    pick = torch.randint(0, flat.shape[0], (vq.cfg.vocab_size,), generator=gen).to(dev)
                    vq.quantize.embedding.weight.copy_(flat[pick] * 0.5)
            with torch.autocast(dev.type, enabled=False):  # nearest-code search in fp32
                f_st, vq_loss, ids = _vq_st(vq, f, pns)
            rec = vq.decoder(vq.post_quant_conv(f_st)).float()
        last.update(f=f.detach(), ids=ids)
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + vq_loss, f"psnr {_psnr(rec, x):.2f} dB "

    @torch.no_grad()
    def restart_dead_codes(step: int) -> None:
        hits.add_(torch.bincount(torch.cat([i.flatten() for i in last["ids"]]), minlength=vq.cfg.vocab_size).float())
        if step % 100 == 99:
            dead = (hits == 0).nonzero().flatten()
            if len(dead):
                flat = last["f"].permute(0, 2, 3, 1).reshape(-1, last["f"].shape[1])
                pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen).to(dev)
                vq.quantize.embedding.weight[dead] = flat[pick]
            hits.zero_()

    clock = fit(vq, vq_loss_fn, seconds=cfg.minutes * 60 * tok_fraction, lr=cfg.tokenizer_lr, warmup=100, log=log,
                tag="vq-vae", after_step=restart_dead_codes)
    codes = []
    with torch.no_grad():
        for i in range(0, len(data), 512):
            ids = vq.img_to_idx(data.float_images(torch.arange(i, min(i + 512, len(data)), device=dev)), pns)
            codes.append(torch.cat(ids, dim=1))
    codes = torch.cat(codes)  # (N, L) code indices of every scale
    splits = [p * p for p in pns]
    with torch.no_grad():
        k = torch.arange(0, min(256, len(data)), device=dev)
        f_hat, _ = vq.idx_to_inputs(list(codes[k].split(splits, dim=1)), pns)
        psnr = _psnr(vq.fhat_to_img(f_hat), data.float_images(k))
        usage = int(codes.unique().numel())
    record["vae"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "psnr_db": round(psnr, 2),
                     "codes_used": usage}
    log(f"vq-vae done: {clock.step} steps, PSNR {psnr:.2f} dB (quantised), {usage} codes used")

    # ---- text: every caption encoded once by the frozen CLIPs
    captions, index = caption_table()
    ctx = bb.encode_text(captions)

    # ---- phase 2: transformer, teacher forcing (official loss); empty captions = CFG's null text
    # official loss: mean over all L tokens, so scale i holds area_i / L
    scale_weights = (balanced_scale_weights(schedule, [s_ / sum(splits) for s_ in splits])
                     if cfg.scale_balance else None)
    record["scale_weights"] = scale_weights

    def transformer_loss(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        cap, _ = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen)
        idx, cap = idx.to(dev), cap.to(dev)
        ids = list(codes[idx].split(splits, dim=1))
        with torch.no_grad():
            _, inputs = vq.idx_to_inputs(ids, pns)
        targets = ScaleTargets(targets=ids, inputs=inputs, schedule=schedule)
        with _autocast(dev):
            logits = bb.teacher_forcing_logits(TextContext(ctx.tokens[cap], ctx.mask[cap], ctx.pooled[cap]), targets)
        return bb.teacher_forcing_loss([lg.float() for lg in logits], targets, scale_weights=scale_weights), ""

    clock = fit(tr, transformer_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction), lr=cfg.lr,
                warmup=cfg.warmup_steps, log=log, tag="transformer", ema=cfg.ema)
    record["transformer"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "batch": cfg.batch,
                             "images_seen": clock.step * cfg.batch}
    log(f"transformer done: {clock.step} steps in {clock.elapsed:.0f} s")

    folder = out / "switti"
    for name, size in save_switti_parts(tr, vq, folder).items():
        record["vae" if name == "vqvae" else name]["file_mb"] = round(size / 1e6, 2)

    results = evaluate_cfg_scales(lambda prompts, seeds, c: _scalewise_sample(bb, prompts, seeds, cfg=c),
                                  (3.0, 6.0), cfg, folder)
    record["eval"] = {"sampler": "generate(tau=1, top_k=400, top_p=0.95)", **results}
    return record


def save_switti_parts(transformer: torch.nn.Module, vqvae: torch.nn.Module, folder: str | os.PathLike[str]
                      ) -> dict[str, int]:
    """Write the trained transformer and VQ-VAE as the ``world`` preset reads them: the official
    folders (``transformer/`` and ``vqvae/``, each ``model.safetensors`` + ``config.json``), fp16."""
    from cstoolkit.backbones.switti import save_transformer, save_vqvae
    from cstoolkit.backbones.switti.loading import REBUILT_BUFFERS

    folder = Path(folder)
    sizes = {}
    for name, module, save in (("transformer", transformer, save_transformer), ("vqvae", vqvae, save_vqvae)):
        save(module, folder / name)  # config.json (+ an fp32 state dict, replaced by fp16 below)
        state = {k: v for k, v in module.state_dict().items() if k not in REBUILT_BUFFERS}  # rebuilt on load
        sizes[name] = _save_st_fp16(state, folder / name / "model.safetensors")
    return sizes


#: generator batch per backbone (SDXL: the probe's 512; Infinity: 256 images x 521 tokens)
DEFAULT_BATCH = {"sdxl": 512, "infinity": 256, "switti": 256}
#: generator peak learning rate (SDXL: the probe's 1e-3; the 8 x 256 transformers a little lower)
DEFAULT_LR = {"sdxl": 1e-3, "infinity": 6e-4, "switti": 6e-4}

#: architecture preset each trainer builds (the backbones' ``world`` rows)
WORLD_PRESET = {"sdxl": "tiny", "infinity": "world", "switti": "world"}

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
    cache = Path(cfg.cache) if cfg.cache else out / f"cache_{cfg.size}px_{cfg.images_per_pair}.npz"
    render_cache(cache, images_per_pair=cfg.images_per_pair, size=cfg.size, seed=seed, workers=cfg.workers)
    names = list(backbones or TRAINERS)
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
    p.add_argument("--frozen-text", dest="train_text", action="store_false", default=None,
                   help="Infinity: keep the world T5 frozen and random (default: it trains with the transformer)")


def cmd_train(args: argparse.Namespace) -> int:
    """Run a parsed ``world train`` command line."""
    options = {k: getattr(args, k) for k in ("cache", "batch", "tokenizer_batch", "images_per_pair", "eval_images",
                                             "eval_train_pairs", "eval_steps", "workers", "size", "lr",
                                             "init_from", "scale_balance", "train_text", "self_correction")
               if getattr(args, k, None) is not None}
    if args.init_from:
        init_root(args.init_from)  # a wrong folder stops here, before the image cache is rendered
    if args.backbone == "all":
        names = [b.strip() for b in args.backbones.split(",")] if args.backbones else None
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


if __name__ == "__main__":
    sys.exit(main())
