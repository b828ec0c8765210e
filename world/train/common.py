"""The shared half of the world trainers: configuration, training images, the one training loop
(:func:`fit` with :class:`Clock`, :class:`EMA`, :class:`Log`), saving, warm starts, the "keep the base captions"
distillation of warm starts (:class:`KeepBase`) and the oracle evaluation.

Every backbone's trainer (:mod:`.sdxl`, :mod:`.infinity`, :mod:`.switti`) runs its phases through
:func:`fit` and evaluates through :func:`evaluate_cfg_scales`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cstoolkit.errors import UserError

#: architecture preset each trainer builds (the backbones' ``world`` rows)
WORLD_PRESET = {"sdxl": "tiny", "infinity": "world", "switti": "world"}


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
    #: share of training captions drawn from the augmented variants of :func:`.captions.caption_table`
    #: (templates, synonyms, repeated class words, word dropout; issue #17 item 5); 0 = the base captions only
    caption_augment: float = 0.5
    #: how often the repeated-word caption variants repeat a class word (empty: none of those variants)
    caption_repeats: tuple[int, ...] = (2, 3, 4)
    #: scale-wise backbones, warm starts only: weight W of the "keep the base captions" term, W * KL(teacher ||
    #: student) over the logits of the batch's samples whose caption is a base caption (or empty), the teacher
    #: being a frozen copy of the ``init_from`` generator (:class:`KeepBase`). Keeps the shipped model's
    #: behaviour on base captions while the augmented ones are learned (issue #17 item 5); 1.0 is a sensible
    #: value, 0 = off (the shipped recipe). Costs one no-grad teacher forward of the base-caption samples a step
    keep_base: float = 0.0
    #: SDXL: share of the budget spent fine-tuning the VAE decoder alone against local artifacts (the top-right
    #: dot of the shipped decoder; :func:`.sdxl.repair_decoder`), after the tokenizer phase; 0 = off
    decoder_repair: float = 0.15
    decoder_lr: float = 3e-4
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The world: names, images
# ---------------------------------------------------------------------------------------------
def _gen() -> Any:
    from cstoolkit.world import generator

    return generator


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
        threads = torch.get_num_threads()  # the worker sets 1 thread: not for the rest of this process
        try:
            parts = [_render_chunk(j) for j in jobs]
        finally:
            torch.set_num_threads(threads)
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


# ---------------------------------------------------------------------------------------------
# "Keep the base captions": distillation from the warm-start generator (TrainConfig.keep_base)
# ---------------------------------------------------------------------------------------------
def base_caption_indices(index: dict[tuple[str, int, int], list[int]]) -> torch.Tensor:
    """Sorted indices of the base captions of a caption table (``index[key][0]`` of every key of
    :func:`.captions.caption_table`; the empty caption is one of them)."""
    return torch.tensor(sorted({rows[0] for rows in index.values()}), dtype=torch.long)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per sample (B,) of logits (B, L, ..., K): the KL of the two softmax
    distributions over the last dim, averaged over the dims between tokens and classes (Infinity's bits,
    as its loss averages its per-bit cross-entropy), then summed over the L tokens with ``token_weights``
    (L,) (the CE loss's per-token weights: a weighted mean over tokens). Computed in fp32; no gradient
    reaches ``teacher``."""
    t = teacher.detach().float().log_softmax(-1)
    s = student.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, L, ...)
    kl = kl.flatten(2).mean(-1) if kl.dim() > 2 else kl  # (B, L)
    return (kl * token_weights.to(kl.device)).sum(-1)


class KeepBase:
    """The "keep the base captions" term of a warm-started generator training (``--keep-base W``).

    Holds a frozen copy of the warm-start generator (the teacher: eval mode, no gradients, same dtype and
    device as the student at construction) and the base-caption indices of the caption table.
    :meth:`mask` picks the batch's samples whose drawn caption is a base caption (empty captions included);
    the trainer runs the teacher on those samples, with the same inputs as the student, and adds
    ``weight * loss(student_logits, teacher_logits)``. Cost: one extra no-grad forward of the base-caption
    samples (about half of the batch) per step, and the teacher's weights in memory.
    """

    def __init__(self, weight: float, index: dict[tuple[str, int, int], list[int]], device: torch.device):
        self.weight = float(weight)
        self.base = base_caption_indices(index).to(device)
        self.steps: list[float] = []  # the KL of every step with a base-caption sample (for the record)

    @staticmethod
    def frozen(module: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of ``module`` (the teacher): eval mode, no gradients, same dtype and device."""
        return copy.deepcopy(module).eval().requires_grad_(False)

    def mask(self, captions: torch.Tensor) -> torch.Tensor:
        """Bool (B,): which of the batch's caption indices are base captions."""
        return torch.isin(captions, self.base.to(captions.device))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        """Mean over samples of :func:`distill_kl` (logits of the base-caption samples only); the value is
        kept for :meth:`record`."""
        kl = distill_kl(student, teacher, token_weights).mean()
        self.steps.append(float(kl.detach()))
        return kl

    def record(self) -> dict[str, Any]:
        """Weight and the mean KL over the first and the last 50 steps that had base-caption samples."""
        head, tail = self.steps[:50], self.steps[-50:]
        return {"weight": self.weight, "steps": len(self.steps),
                "kl_first50": round(sum(head) / len(head), 5) if head else None,
                "kl_last50": round(sum(tail) / len(tail), 5) if tail else None}


def check_keep_base(cfg: TrainConfig, backbone: str, warm: Any) -> None:
    """One-line :class:`UserError` unless ``--keep-base`` has a teacher: a warm start of ``backbone``."""
    if cfg.keep_base and warm is None:
        root = init_root(cfg.init_from) if cfg.init_from else None
        raise UserError("world train --keep-base", f"no {backbone} weights in {root}/{backbone}" if root else
                        "without --init-from", "it needs --init-from (the frozen teacher is the warm-start model)")


def init_root(init_from: str) -> Path:
    """The folder ``--init-from`` names ("shipped": the package's world/weights); a one-line
    :class:`UserError` if it is not a folder."""
    root = Path(__file__).resolve().parent.parent / "weights" if init_from == "shipped" else Path(init_from)
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
    """Index of an oracle verdict in ``names``; -1 (never a right answer) for a rejected image (``None``)."""
    if isinstance(value, dict):
        value = value.get("name", value.get("label"))
    if isinstance(value, (int, np.integer)):
        return int(value)
    # a rejected image (None) or a concept the backbones never saw (the oracle also knows the novel ones)
    return list(names).index(value) if value in names else -1


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
    content-only and style-only captions, and the held-out pairs in the augmented templates of
    :data:`.captions.EVAL_TEMPLATES` (``held_out_photo``, ``held_out_repeat``: the class words 4 times,
    as a 4-vector init of the word reads); ``eval_images`` samples each."""
    from .captions import EVAL_TEMPLATES

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
    for group, template in EVAL_TEMPLATES.items():
        for c, s in held:
            rows.append((group, template.format(c=g.CONTENTS[c], s=g.STYLES[s]), c, s))
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
    for group in dict.fromkeys(r[0] for r in rows):
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
