"""The world Infinity: BSQ-VAE, then the transformer (official teacher-forcing loss) with the tiny T5.

A warm start with ``keep_base`` (``--keep-base W``) adds W * KL(teacher || student) of the per-bit distributions on
the base-caption samples, the teacher a frozen copy of the loaded transformer (and of the T5 when it trains;
:class:`.common.KeepBase`), fed the same self-corrected inputs as the student: one more no-grad forward (of
those samples) per step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .captions import caption_table, draw_captions
from .common import (
    WORLD_PRESET,
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
    from cstoolkit.backbones.infinity.backbone import WORLD_TEXT_SEED, _token_weights
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
    check_keep_base(cfg, "infinity", warm)
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

    # ---- text: every caption tokenized once, padded to the longest; the T5 encodes the batch's captions at each
    # step while it trains (all of them once when frozen). Variants longer than the T5 reads are left out.
    captions, index = caption_table(seed=cfg.seed, max_chars=text.max_length - 1, repeats=cfg.caption_repeats)
    text.float()
    ids, attention = text.tokenize(captions)
    mask = attention.bool()
    tokens = None
    if not cfg.train_text:  # frozen: the caption features once
        with torch.no_grad():
            tokens = text(input_ids=ids, attention_mask=attention).float()
    trained = torch.nn.ModuleDict({"transformer": tr, "text": text.model}) if cfg.train_text else tr
    record["text_encoder"] = {"trained": cfg.train_text, "params": sum(p.numel() for p in text.parameters())}
    record["captions"] = {"table": len(captions), "augment": cfg.caption_augment, "repeats": list(cfg.caption_repeats),
                          "keep_base": cfg.keep_base}

    # ---- phase 2: transformer, teacher forcing; empty captions read cfg_uncond (as generation does)
    # official per-token weights sqrt(last area / area), normalised: scale i holds sqrt(area_i) / sum
    roots = [math.sqrt(h * w) for h, w in schedule]
    scale_weights = balanced_scale_weights(schedule, [r / sum(roots) for r in roots]) if cfg.scale_balance else None
    record["scale_weights"] = scale_weights
    keep: KeepBase | None = None
    teacher: torch.nn.Module | None = None
    teacher_text: torch.nn.Module | None = None
    if cfg.keep_base:  # the frozen warm-start transformer (and T5 when it trains)
        keep = KeepBase(cfg.keep_base, index, dev)
        teacher = KeepBase.frozen(tr)
        teacher_text = KeepBase.frozen(text) if tokens is None else None
        token_weights = _token_weights(schedule, schedule[-1], scale_weights).to(dev)  # the CE loss's

    def transformer_loss(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        cap, empty = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen,
                                  cfg.caption_augment)
        idx, cap, empty = idx.to(dev), cap.to(dev), empty.to(dev)
        with torch.no_grad():
            bits, inputs = multiscale_targets(features[idx], schedule, self_correction=cfg.self_correction,
                                              generator=gen)
        mk = mask[cap]
        tk = text(input_ids=ids[cap], attention_mask=attention[cap]).float() if tokens is None else tokens[cap]
        tk = torch.where(empty.view(-1, 1, 1), tr.null_text(mk), tk)
        with _autocast(dev):
            cond = tr.condition(tk, mk)
            logits = tr.teacher_forcing(cond, inputs, schedule)
        logits = list(logits.float().split([h * w for h, w in schedule], dim=1))
        targets = ScaleTargets(targets=bits, inputs=inputs, schedule=schedule)
        loss = bb.teacher_forcing_loss(logits, targets, scale_weights=scale_weights)
        if keep is None or teacher is None:
            return loss, ""
        base = keep.mask(cap)  # samples drawn with a base (or empty) caption: the teacher's behaviour is kept
        if not base.any():
            return loss, "kl - "
        c, mb = cap[base], mk[base]
        with torch.no_grad():  # the same (self-corrected) inputs as the student's
            tt = (tokens[c] if teacher_text is None
                  else teacher_text(input_ids=ids[c], attention_mask=attention[c]).float())
            tt = torch.where(empty[base].view(-1, 1, 1), teacher.null_text(mb), tt)
            with _autocast(dev):
                kept = teacher.teacher_forcing(teacher.condition(tt, mb), inputs[base], schedule).float()
        kl = keep.loss(torch.cat(logits, dim=1)[base], kept, token_weights)
        return loss + keep.weight * kl, f"kl {keep.steps[-1]:.4f} "

    clock = fit(trained, transformer_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction), lr=cfg.lr,
                warmup=cfg.warmup_steps, log=log, tag="transformer", ema=cfg.ema)
    record["transformer"] = {"steps": clock.step, "seconds": round(clock.elapsed, 1), "batch": cfg.batch,
                             "images_seen": clock.step * cfg.batch}
    if keep is not None:
        record["transformer"]["keep_base"] = keep.record()
        teacher = teacher_text = None  # their memory back before the evaluation
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
