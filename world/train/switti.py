"""The world Switti: VAR's multi-scale VQ-VAE, then the transformer (official cross-entropy) on frozen CLIPs.

A warm start with ``keep_base`` (``--keep-base W``) adds W * KL(teacher || student) on the base-caption samples,
the teacher a frozen copy of the loaded transformer (:class:`.common.KeepBase`): one more no-grad transformer
forward (of those samples) per step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .captions import caption_table, draw_captions
from .common import (
    KeepBase,
    Log,
    TrainConfig,
    WorldData,
    _autocast,
    _psnr,
    _save_st_fp16,
    _scalewise_sample,
    _warm_start,
    balanced_scale_weights,
    check_keep_base,
    evaluate_cfg_scales,
    fit,
)


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
    check_keep_base(cfg, "switti", warm)
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

    # ---- text: every caption (augmented variants included) encoded once by the frozen CLIPs
    captions, index = caption_table(seed=cfg.seed, repeats=cfg.caption_repeats)
    parts = [bb.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)]
    ctx = TextContext(*(torch.cat([getattr(p, k) for p in parts]) for k in ("tokens", "mask", "pooled")))
    record["captions"] = {"table": len(captions), "augment": cfg.caption_augment, "repeats": list(cfg.caption_repeats),
                          "keep_base": cfg.keep_base}

    # ---- phase 2: transformer, teacher forcing (official loss); empty captions = CFG's null text
    # official loss: mean over all L tokens, so scale i holds area_i / L
    scale_weights = (balanced_scale_weights(schedule, [s_ / sum(splits) for s_ in splits])
                     if cfg.scale_balance else None)
    record["scale_weights"] = scale_weights
    keep: KeepBase | None = None
    teacher: SwittiBackbone | None = None
    if cfg.keep_base:  # the frozen warm-start transformer, read through a backbone of its own
        keep = KeepBase(cfg.keep_base, index, dev)
        teacher = SwittiBackbone(SwittiConfig(preset="tiny"), KeepBase.frozen(tr), vq, text, resolution=cfg.size,
                                 weight_dtype=torch.float32)
        token_weights = torch.cat([torch.full((n,), float(w) / sum(splits))  # the CE loss's: a weighted token mean
                                   for n, w in zip(splits, scale_weights or [1.0] * len(splits))]).to(dev)

    def transformer_loss(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        cap, _ = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen, cfg.caption_augment)
        idx, cap = idx.to(dev), cap.to(dev)
        ids = list(codes[idx].split(splits, dim=1))
        with torch.no_grad():
            _, inputs = vq.idx_to_inputs(ids, pns)
        targets = ScaleTargets(targets=ids, inputs=inputs, schedule=schedule)
        with _autocast(dev):
            logits = bb.teacher_forcing_logits(TextContext(ctx.tokens[cap], ctx.mask[cap], ctx.pooled[cap]), targets)
        loss = bb.teacher_forcing_loss([lg.float() for lg in logits], targets, scale_weights=scale_weights)
        if keep is None or teacher is None:
            return loss, ""
        base = keep.mask(cap)  # samples drawn with a base (or empty) caption: the teacher's behaviour is kept
        if not base.any():
            return loss, "kl - "
        c = cap[base]
        with torch.no_grad(), _autocast(dev):  # the same inputs as the student's
            kept = teacher.teacher_forcing_logits(TextContext(ctx.tokens[c], ctx.mask[c], ctx.pooled[c]),
                                                  ScaleTargets(targets=[i[base] for i in ids], inputs=inputs[base],
                                                               schedule=schedule))
        kl = keep.loss(torch.cat(logits, dim=1)[base], torch.cat(kept, dim=1), token_weights)
        return loss + keep.weight * kl, f"kl {keep.steps[-1]:.4f} "

    clock = fit(tr, transformer_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction), lr=cfg.lr,
                warmup=cfg.warmup_steps, log=log, tag="transformer", ema=cfg.ema)
    record["transformer"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "batch": cfg.batch,
                             "images_seen": clock.step * cfg.batch}
    if keep is not None:
        record["transformer"]["keep_base"] = keep.record()
        teacher = None  # its memory back before the evaluation
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
