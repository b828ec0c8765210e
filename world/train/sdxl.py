"""The world SDXL: AutoencoderKL, then the UNet on the frozen tiny CLIP-L / bigG (from the preset seed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .captions import caption_table, draw_captions
from .common import (
    Log,
    TrainConfig,
    WorldData,
    _autocast,
    _psnr,
    _save_st_fp16,
    _warm_start,
    evaluate_cfg_scales,
    fit,
)


class _PeakProbe:
    """Forward hooks on the VAE decoder's up blocks that keep each output's peak-to-typical ratio: the largest
    channel magnitude at any position over its mean across positions (per image). The shipped world decoder
    grows a spike at the top-right corner (ratio about 90 after the last up block on dark renders, 2-3 elsewhere)
    that dominates the GroupNorm statistics of the next layer, the "water droplet" of StyleGAN2 (Karras et al.,
    2020, sec. 2), and leaves the small coloured dot of every sample (issue #17 item 5)."""

    def __init__(self, decoder: torch.nn.Module):
        self.ratios: list[torch.Tensor] = []
        self.handles = [block.register_forward_hook(self._hook) for block in decoder.up_blocks]

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        mag = output.float().abs().amax(1).flatten(1)  # (B, H*W): largest channel magnitude per position
        self.ratios.append(mag.amax(1) / (mag.mean(1) + 1e-6))

    def pop(self) -> list[torch.Tensor]:
        out, self.ratios = self.ratios, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def decoder_artifacts(vae: Any, x: torch.Tensor) -> dict[str, float]:
    """Artifacts of the VAE decoder on images ``x`` in [-1, 1]: ``peak_ratio``, the largest peak-to-typical
    activation ratio of the up blocks (:class:`_PeakProbe`; mean over images), and the reconstruction's mean
    absolute error in each 16 px corner (``corner_tl`` ... ``corner_br``): the shipped decoder's dot makes
    ``corner_tr`` stand out from the other three."""
    probe = _PeakProbe(vae.decoder)
    errs, peaks = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), 64):
                rec = vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample.float()
                errs.append((rec.clamp(-1, 1) - x[i:i + 64]).abs().mean(1))
                peaks.append(torch.stack(probe.pop()).amax(0))
    finally:
        probe.close()
    err = torch.cat(errs)
    out = {"peak_ratio": float(torch.cat(peaks).mean())}
    for name, r, c in (("tl", slice(0, 16), slice(0, 16)), ("tr", slice(0, 16), slice(-16, None)),
                       ("bl", slice(-16, None), slice(0, 16)), ("br", slice(-16, None), slice(-16, None))):
        out[f"corner_{name}"] = float(err[:, r, c].mean())
    return {k: round(v, 4) for k, v in out.items()}


def repair_decoder(vae: Any, data: WorldData, *, seconds: float, batch: int, lr: float, gen: torch.Generator,
                   log: Log, weight: float = 0.05, allowed: float = 8.0) -> dict[str, Any]:
    """Fine-tune the VAE decoder (``post_quant_conv`` + ``decoder``; the encoder stays frozen, so the UNet's
    latents and the scaling factor do not move) with L1 + MSE plus ``weight`` x the up blocks' peak-to-typical
    activation ratio above ``allowed`` (:class:`_PeakProbe`): the spike behind the top-right dot of the shipped
    decoder, which L1 + MSE alone let grow (it is cheap in pixels and useful to the decoder's normalisation)."""
    dev = next(vae.parameters()).device
    probe_images = data.float_images(torch.arange(0, min(256, len(data)), device=dev))
    before = decoder_artifacts(vae, probe_images)
    part = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    probe = _PeakProbe(vae.decoder)

    def loss_fn(step: int) -> tuple[torch.Tensor, str]:
        x = data.float_images(torch.randint(0, len(data), (batch,), generator=gen).to(dev))
        with torch.no_grad(), _autocast(dev):
            z = vae.encode(x).latent_dist.sample()
        probe.pop()
        with _autocast(dev):
            rec = vae.decode(z.float()).sample.float()
        ratios = torch.stack(probe.pop())  # (blocks, B)
        peak = F.relu(ratios - allowed).mean()
        return (F.l1_loss(rec, x) + F.mse_loss(rec, x) + weight * peak,
                f"peak ratio {float(ratios.detach().amax(0).mean()):.1f} ")

    try:
        clock = fit(part, loss_fn, seconds=seconds, lr=lr, warmup=20, log=log, tag="vae-decoder")
    finally:
        probe.close()
    after = decoder_artifacts(vae, probe_images)
    log(f"vae decoder repaired: {clock.step} steps; artifacts before {before}, after {after}")
    return {"steps": clock.step, "seconds": round(clock.elapsed, 1), "weight": weight, "allowed_ratio": allowed,
            "batch": batch, "before": before, "after": after}


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

    # ---- decoder repair (frozen encoder): the top-right dot of the shipped decoder
    dec_fraction = cfg.decoder_repair
    if dec_fraction > 0:
        record["vae_decoder_repair"] = repair_decoder(
            vae, data, seconds=cfg.minutes * 60 * dec_fraction, batch=cfg.tokenizer_batch, lr=cfg.decoder_lr,
            gen=gen, log=log)

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

    # ---- text: every caption (augmented variants included) encoded once by the frozen encoders
    captions, index = caption_table(seed=cfg.seed)
    record["captions"] = {"table": len(captions), "augment": cfg.caption_augment}
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
        cap, empty = draw_captions(data.content[idx].cpu(), data.style[idx].cpu(), index, gen,
                                  cfg.caption_augment)
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

    clock = fit(unet, unet_loss, seconds=cfg.minutes * 60 * (1 - tok_fraction - dec_fraction), lr=cfg.lr,
                warmup=cfg.warmup_steps, log=log, tag="unet", ema=cfg.ema)
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
