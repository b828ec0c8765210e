"""The world SDXL: AutoencoderKL, then the UNet on the frozen tiny CLIP-L / bigG (from the preset seed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
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
    """Hooks on the VAE decoder's up path that measure the spike behind the top-right dot of the shipped world
    decoder, the "water droplet" of StyleGAN2 (Karras et al., 2020, sec. 2): a few positions far larger than the
    rest that dominate the statistics of the next normalisation and leave the small coloured dot of every sample
    (issue #17 item 5).

    ``peaks``: per image, the largest normalised deviation any GroupNorm of the up blocks (and ``conv_norm_out``)
    sees, ``max |x - mean_g| / std_g`` over positions and groups (forward pre-hooks): 5-23 in the last up blocks
    of the shipped decoder on renders without the dot, 30-50 with it (mean 46 over 24 dark held-out renders, 22
    over 128 held-out renders of every pair). ``ratios``: per image and up block, the output's largest channel
    magnitude at any position over its mean across positions (the first measure; a decoder can lower it by
    raising the other channels, and the spike and the dot stay: measured, docs/world.md)."""

    def __init__(self, decoder: torch.nn.Module):
        self.ratios: list[torch.Tensor] = []
        self.peaks: list[torch.Tensor] = []
        norms = [m for block in decoder.up_blocks for m in block.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.handles = [block.register_forward_hook(self._ratio_hook) for block in decoder.up_blocks]
        self.handles += [m.register_forward_pre_hook(self._norm_hook) for m in (*norms, decoder.conv_norm_out)]

    def _ratio_hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        mag = output.float().abs().amax(1).flatten(1)  # (B, H*W): largest channel magnitude per position
        self.ratios.append(mag.amax(1) / (mag.mean(1) + 1e-6))

    def _norm_hook(self, module: torch.nn.GroupNorm, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        v = x.reshape(x.shape[0], module.num_groups, -1)  # (B, groups, channels per group x positions)
        z = (v - v.mean(-1, keepdim=True)).abs().amax(-1) / (v.std(-1) + module.eps)  # (B, groups)
        self.peaks.append(z.amax(1))

    def pop(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ratios, peaks) recorded since the last call, one (B,) tensor per hook call."""
        out = (self.ratios, self.peaks)
        self.ratios, self.peaks = [], []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def decoder_artifacts(vae: Any, x: torch.Tensor) -> dict[str, float]:
    """Artifacts of the VAE decoder on images ``x`` in [-1, 1] (the posterior mean decoded; means over images):
    ``peak_z``, the largest normalised deviation at the up path's GroupNorms, and ``peak_ratio``, the largest
    peak-to-typical ratio of the up blocks' outputs (both :class:`_PeakProbe`); ``worst_patch``, the largest
    mean absolute error of any 4x4 patch of the reconstruction (a dot is a few pixels far off); the mean absolute
    error in each 16 px corner (``corner_tl`` ... ``corner_br``; the shipped decoder's dot makes ``corner_tr``
    stand out from the other three); ``psnr_db``, the PSNR of the whole images ([-1, 1] range)."""
    probe = _PeakProbe(vae.decoder)
    errs, ratios, peaks, sq = [], [], [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), 64):
                rec = vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample.float().clamp(-1, 1)
                errs.append((rec - x[i:i + 64]).abs().mean(1))
                sq.append(((rec - x[i:i + 64]) ** 2).flatten(1).mean(1))
                r, z = probe.pop()
                ratios.append(torch.stack(r).amax(0))
                peaks.append(torch.stack(z).amax(0))
    finally:
        probe.close()
    err = torch.cat(errs)
    out = {"peak_z": float(torch.cat(peaks).mean()), "peak_ratio": float(torch.cat(ratios).mean()),
           "worst_patch": float(_worst_patch(err).mean()),
           "psnr_db": 10 * math.log10(4.0 / max(float(torch.cat(sq).mean()), 1e-10))}
    for name, r, c in (("tl", slice(0, 16), slice(0, 16)), ("tr", slice(0, 16), slice(-16, None)),
                       ("bl", slice(-16, None), slice(0, 16)), ("br", slice(-16, None), slice(-16, None))):
        out[f"corner_{name}"] = float(err[:, r, c].mean())
    return {k: round(v, 4) for k, v in out.items()}


def _worst_patch(err: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Per image, the largest mean of ``err`` (B, H, W) over any ``size`` x ``size`` patch: (B,)."""
    return F.avg_pool2d(err[:, None], size, stride=1).flatten(1).amax(1)


def repair_decoder(vae: Any, data: WorldData, *, seconds: float, batch: int, lr: float, gen: torch.Generator,
                   log: Log, weight: float = 0.01, allowed: float = 12.0, patch_weight: float = 0.1,
                   probe_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Fine-tune the VAE decoder (``post_quant_conv`` + ``decoder``; the encoder stays frozen, so the UNet's
    latents and the scaling factor do not move) against the spike behind the top-right dot of the shipped
    decoder, which L1 + MSE alone let grow (a few pixels cost little, and the spike is useful to the decoder's
    normalisation). Loss: L1 + MSE, plus ``weight`` x the normalised peaks at the up path's GroupNorms above
    ``allowed`` (:class:`_PeakProbe` ``peaks``, mean over GroupNorms and images), plus ``patch_weight`` x the
    worst 4x4 patch of each image's absolute error (mean over images): the peak term alone spread the spike and
    turned the dot into a larger streak (measured, docs/world.md), the patch term charges the visible artifact.
    :func:`decoder_artifacts` before and after are measured on ``probe_images`` (default: the first 256
    training images)."""
    dev = next(vae.parameters()).device
    if probe_images is None:
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
        peaks = torch.stack(probe.pop()[1])  # (GroupNorms, B)
        excess = F.relu(peaks - allowed).mean()
        worst = _worst_patch((rec - x).abs().mean(1)).mean()
        return (F.l1_loss(rec, x) + F.mse_loss(rec, x) + weight * excess + patch_weight * worst,
                f"peak z {float(peaks.detach().amax(0).mean()):.1f} worst patch {float(worst.detach()):.3f} ")

    try:
        clock = fit(part, loss_fn, seconds=seconds, lr=lr, warmup=20, log=log, tag="vae-decoder")
    finally:
        probe.close()
    after = decoder_artifacts(vae, probe_images)
    log(f"vae decoder repaired: {clock.step} steps; artifacts before {before}, after {after}")
    return {"steps": clock.step, "seconds": round(clock.elapsed, 1), "weight": weight, "allowed_z": allowed,
            "patch_weight": patch_weight,
            "batch": batch, "lr": lr, "before": before, "after": after}


def regroup_vae(teacher: Any, groups: int, data: WorldData, *, seconds: float, batch: int, lr: float,
                gen: torch.Generator, log: Log, distill_weight: float = 1.0, reinit_decoder: bool = False,
                probe_images: torch.Tensor | None = None,
                sampled: tuple[torch.Tensor, torch.Tensor] | None = None, sample_weight: float = 1.0
                ) -> tuple[Any, dict[str, Any]]:
    """The VAE of ``teacher`` rebuilt with ``groups`` GroupNorm groups and fitted back to it, which removes the
    cause of the top-right dot instead of charging its symptom (:func:`repair_decoder`).

    With one channel per group (the world VAE's 32-channel blocks at 32 groups) each channel of the decoder's
    last GroupNorms is normalised alone, so a flat region's level after ``conv_norm_out`` depends only on the
    shape of that channel's map: to draw a dark or a light background the decoder plants a spike whose size sets
    the level (StyleGAN2's droplet). With several channels per group (SDXL's own VAE has 4 at its last level) a
    flat channel next to a varying one carries the level, and the spike has no use. GroupNorm weights do not
    depend on the group count, so the student starts from the teacher's weights and is trained on both sides:
    the encoder to the teacher's posterior (mean and log-variance, relative to the teacher's spread: the UNet was
    trained on those latents and the scaling factor stays), the decoder to reconstruct the images from the
    teacher's posterior samples (what the UNet generates). ``reinit_decoder``: the decoder (and ``post_quant_conv``)
    starts from fresh random weights (seeded from ``gen``) instead of the teacher's, so it inherits no spike.
    ``sampled``: (latents the UNet sampled, the images a reference decoder made of them); each step also decodes
    ``batch`` of those latents and adds ``sample_weight`` x L1 + MSE to the reference images outside the top-right
    corner (:func:`dot_mask`), so the decoder learns the sampler's latents and not only the encoder's (a fresh
    decoder trained on the encoder's alone drew the UNet's dark samples as pale noise: docs/world.md). Returns
    the student (eval mode, no gradients) and the
    record: steps, :func:`decoder_artifacts` of teacher and student on ``probe_images``, and ``latent_rel_err``,
    the student's posterior-mean error over the teacher's latent variance on those images."""
    from diffusers import AutoencoderKL

    dev = next(teacher.parameters()).device
    if probe_images is None:
        probe_images = data.float_images(torch.arange(0, min(256, len(data)), device=dev))
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = AutoencoderKL.from_config({**config, "norm_num_groups": groups}).to(dev)
    student.load_state_dict(teacher.state_dict())
    if reinit_decoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
            fresh = AutoencoderKL.from_config({**config, "norm_num_groups": groups}).to(dev)
        student.decoder.load_state_dict(fresh.decoder.state_dict())
        student.post_quant_conv.load_state_dict(fresh.post_quant_conv.state_dict())
    student.disable_slicing()
    teacher.eval().requires_grad_(False)
    before = decoder_artifacts(teacher, probe_images)
    with torch.no_grad():
        spread = teacher.encode(probe_images[:64]).latent_dist.mean.var().clamp_min(1e-8)
    if sampled is not None:  # moved once, not every step
        sampled = (sampled[0].to(dev), sampled[1].to(dev))
        mask = dot_mask(probe_images.shape[-1]).to(dev)

    def loss_fn(step: int) -> tuple[torch.Tensor, str]:
        x = data.float_images(torch.randint(0, len(data), (batch,), generator=gen).to(dev))
        with torch.no_grad(), _autocast(dev):
            post = teacher.encode(x).latent_dist
            z = post.sample().float()
        with _autocast(dev):
            mine = student.encode(x).latent_dist
            rec = student.decode(z).sample.float()
        distill = (F.mse_loss(mine.mean.float(), post.mean.float()) / spread
                   + 0.1 * F.mse_loss(mine.logvar.float(), post.logvar.float()))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + distill_weight * distill
        if sampled is None:
            return loss, f"latent err {float(distill.detach()):.4f} "
        pick = torch.randint(0, len(sampled[0]), (batch,), generator=gen)
        with _autocast(dev):
            out = student.decode(sampled[0][pick]).sample.float()
        on_samples = dot_masked_error(out, sampled[1][pick], mask)
        return (loss + sample_weight * on_samples,
                f"latent err {float(distill.detach()):.4f} samples {float(on_samples.detach()):.4f} ")

    clock = fit(student, loss_fn, seconds=seconds, lr=lr, warmup=20, log=log, tag=f"vae-groups-{groups}")
    after = decoder_artifacts(student, probe_images)
    with torch.no_grad():
        t = teacher.encode(probe_images).latent_dist.mean
        err = float(F.mse_loss(student.encode(probe_images).latent_dist.mean, t) / t.var())
    log(f"vae regrouped to {groups} groups: {clock.step} steps; latent error {err:.4f}; artifacts before {before}, "
        f"after {after}")
    return student, {"groups": groups, "reinit_decoder": reinit_decoder, "steps": clock.step,
                     "seconds": round(clock.elapsed, 1), "batch": batch, "lr": lr, "distill_weight": distill_weight,
                     "latent_rel_err": round(err, 5),
                     "unet_samples": 0 if sampled is None else len(sampled[0]), "sample_weight": sample_weight,
                     "before": before, "after": after}


def dot_mask(size: int, corner: int = 16) -> torch.Tensor:
    """(1, 1, size, size): 1 everywhere but the top-right ``corner`` x ``corner`` pixels (at 128 px; scaled with
    ``size``), where the world SDXL's old one-channel-group decoder drew its dot."""
    k = max(1, corner * size // 128)
    m = torch.ones(1, 1, size, size)
    m[..., :k, size - k:] = 0
    return m


def dot_masked_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 + MSE of ``out`` against ``target`` where ``mask`` is 1 (:func:`dot_mask`: all but the dot's corner)."""
    diff = (out - target) * mask
    return diff.abs().mean() + (diff ** 2).mean()


@torch.no_grad()
def unet_samples(bb: Any, reference_vae: Any, n: int, *, seed: int = 50_000, steps: int = 25, guidance: float = 4.0,
                 chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` latents the backbone's UNet samples for the training pairs' captions (pairs in turn, CPU noise of
    seeds ``seed``, ``seed + 1``, ...; the trainer's evaluation uses seeds from 1000) and ``reference_vae``'s
    decodings of them in [-1, 1]: the targets :func:`regroup_vae` gives a rebuilt decoder on the sampler's latents."""
    from cstoolkit.world.generator import caption, train_pairs

    pairs = train_pairs()
    prompts = [caption(*pairs[i % len(pairs)]) for i in range(n)]
    z = sdxl_pipeline_outputs(bb, prompts, [seed + k for k in range(n)], steps=steps, guidance=guidance,
                              output_type="latent", chunk=chunk) / reference_vae.config.scaling_factor
    dev = next(reference_vae.parameters()).device
    images = []
    for i in range(0, n, chunk):
        with _autocast(dev):
            x = reference_vae.decode(z[i:i + chunk].to(dev, reference_vae.dtype)).sample
        images.append(x.float().clamp(-1, 1).cpu())
    return z, torch.cat(images)


#: Pairs with dark backgrounds, where the old one-channel-group decoder's top-right dot showed most.
DARK_PAIRS: tuple[tuple[str, str], ...] = (("fish", "neon"), ("tree", "mosaic"), ("star", "gradient"))


def dark_renders(n: int = 24, *, seed: int = 5, size: int = 128) -> torch.Tensor:
    """``n`` renders (B, 3, size, size) in [-1, 1] of :data:`DARK_PAIRS` (the dot's probe; deterministic)."""
    from cstoolkit.world.generator import sample_batch

    return sample_batch(n, seed=seed, size=size, pairs=DARK_PAIRS)[0]


def dot_ratio(artifacts: dict[str, float]) -> float:
    """The top-right corner's error over the mean of the other three corners' (:func:`decoder_artifacts`): about 1
    without the dot, 2.68 for the old decoder on :func:`dark_renders`."""
    others = (artifacts["corner_tl"] + artifacts["corner_bl"] + artifacts["corner_br"]) / 3
    return artifacts["corner_tr"] / max(others, 1e-8)


def held_out_renders(n: int, *, seed: int = 1, size: int = 128) -> torch.Tensor:
    """``n`` renders (B, 3, size, size) in [-1, 1] of the held-out pairs, which no world backbone trained on
    (the decoder repair's probe images; deterministic from ``seed``)."""
    from cstoolkit.world.generator import HELD_OUT, sample_batch

    return sample_batch(n, seed=seed, size=size, pairs=HELD_OUT)[0]


def repair_world_decoder(out_dir: str | os.PathLike[str], *, init_from: str = "shipped", minutes: float = 12.0,
                         seed: int = 0, device: str = "cpu", images_per_pair: int = 32, batch: int = 8,
                         lr: float = 3e-4, cache: str | None = None, workers: int = 0,
                         probe_images: int = 64, weight: float = 0.01, allowed: float = 12.0,
                         patch_weight: float = 0.1, groups: int | None = None,
                         reinit_decoder: bool = False, unet_latents: int = 0,
                         sample_reference: str = "shipped") -> dict[str, Any]:
    """Run only the decoder repair (:func:`repair_decoder`) on trained world SDXL weights, without touching the
    UNet: small enough for a CPU (the VAE has 1.0 M parameters at 128 px).

    Loads ``init_from`` (a folder laid out like world/weights, or "shipped") through the ``world`` preset,
    renders ``images_per_pair`` training images per training pair (``cache``: reused where it exists), fine-tunes
    the decoder for ``minutes`` of wall time, and writes ``out_dir/sdxl/``: the repaired ``vae/`` (diffusers
    layout, fp16, the same config and scaling factor), the ``unet/`` folder copied unchanged, and ``world.json``,
    the record of the weights repaired with ``vae_decoder_repair`` added (steps, seconds, device, threads, and
    :func:`decoder_artifacts` before and after on ``probe_images`` held-out renders); ``weight``, ``allowed``
    and ``patch_weight`` are :func:`repair_decoder`'s. With ``groups``, the VAE is rebuilt with that many GroupNorm
    groups and fitted back to the trained one instead (:func:`regroup_vae`; the encoder then moves, within the
    recorded ``latent_rel_err``, and ``config.json`` carries the new ``norm_num_groups``; ``reinit_decoder``: its
    decoder starts from fresh weights; ``unet_latents``: that many latents sampled by the loaded UNet, decoded by
    ``sample_reference``'s VAE (a folder laid out like world/weights, or "shipped"), train the decoder too:
    :func:`unet_samples`). Load the result with ``CSTOOLKIT_WORLD_WEIGHTS=out_dir``. Returns the
    ``vae_decoder_repair`` record."""
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig
    from cstoolkit.errors import UserError

    from .common import init_root, render_cache

    if minutes <= 0:
        raise UserError("world train --minutes", f"{minutes}", "expected a positive number of minutes")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("world train --device", "CUDA is not available", "expected a GPU machine or --device cpu")
    source = init_root(init_from) / "sdxl"
    if not (source / "vae").is_dir() or not (source / "unet").is_dir():
        raise UserError("world train --init-from", f"{source} has no unet/ and vae/",
                        "expected trained world SDXL weights (<dir>/sdxl/{unet,vae}/), or 'shipped'")
    if reinit_decoder and groups is None:
        raise UserError("world train --reinit-decoder", "without --vae-groups",
                        "expected --vae-groups G as well (the repair fine-tunes the trained decoder)")
    if unet_latents and groups is None:
        raise UserError("world train --decoder-unet-latents", "without --vae-groups",
                        "expected --vae-groups G as well (the UNet's latents train a rebuilt decoder)")
    if unet_latents < 0:
        raise UserError("world train --decoder-unet-latents", f"{unet_latents}", "expected a count >= 0")
    reference = init_root(sample_reference) / "sdxl" / "vae" if unet_latents else None
    if reference is not None and not (reference / "config.json").is_file():
        raise UserError("world train --decoder-sample-reference", f"{reference} has no config.json",
                        "expected world SDXL weights (<dir>/sdxl/vae/), or 'shipped'")
    if groups is not None:  # before anything is written
        narrowest = min(json.loads((source / "vae" / "config.json").read_text())["block_out_channels"])
        if groups < 1 or narrowest % groups:
            raise UserError("world train --vae-groups", f"{groups}",
                            f"expected a divisor of {narrowest} (the VAE's narrowest block)")
    out = Path(out_dir) / "sdxl"
    if out.resolve() == source.resolve():
        raise UserError("world train --out", f"{out_dir} is the folder the weights are read from",
                        "expected another output folder (the repaired files are copied in by hand)")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out, "sdxl-decoder", 20.0)
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    cfg = TrainConfig(minutes=minutes, seed=seed, device=device, init_from=str(source.parent))
    bb = _warm_start("sdxl", cfg, lambda: SDXLBackbone.from_config(SDXLConfig(preset="world"), device=dev))
    vae = bb.vae.float()
    vae.disable_slicing()
    size = int(vae.config.sample_size)
    cache_path = Path(cache) if cache else Path(out_dir) / f"cache_{size}px_{images_per_pair}.npz"
    render_cache(cache_path, images_per_pair=images_per_pair, size=size, seed=seed, workers=workers)
    data = WorldData.load(cache_path, dev)
    log(f"decoder repair of {source}: {len(data)} training images, {minutes} min on {device} "
        f"({torch.get_num_threads()} threads), batch {batch}, lr {lr:g}")
    probes = held_out_renders(probe_images, seed=seed + 1, size=size).to(dev)
    if groups is not None:
        sampled = None
        if unet_latents:
            from diffusers import AutoencoderKL

            ref = AutoencoderKL.from_pretrained(reference).to(dev).float().eval()
            t1 = time.time()
            sampled = unet_samples(bb, ref, unet_latents)
            log(f"{unet_latents} UNet latents sampled and decoded by {reference} in {time.time() - t1:.0f} s")
            del ref
        vae, record = regroup_vae(vae, groups, data, seconds=minutes * 60, batch=batch, lr=lr, gen=gen, log=log,
                                  reinit_decoder=reinit_decoder, probe_images=probes, sampled=sampled)
        if sampled is not None:
            record["sample_reference"] = str(reference)
    else:
        frozen = {k: v.clone() for k, v in vae.state_dict().items()
                  if not k.startswith(("decoder.", "post_quant_conv."))}
        record = repair_decoder(vae, data, seconds=minutes * 60, batch=batch, lr=lr, gen=gen, log=log,
                                weight=weight, allowed=allowed, patch_weight=patch_weight, probe_images=probes)
        state = vae.state_dict()
        if any(not torch.equal(v, state[k]) for k, v in frozen.items()):  # the UNet's latents would move
            raise RuntimeError("decoder repair changed the encoder, quant_conv or a buffer")
    sizes = save_sdxl_parts(None, vae, out)
    if (out / "unet").resolve() != (source / "unet").resolve():
        shutil.copytree(source / "unet", out / "unet", dirs_exist_ok=True)
    record.update({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), "training_images": len(data),
                   "probe": f"{probe_images} held-out renders (seed {seed + 1})", "unet": "unchanged",
                   "vae_file_mb": round(sizes["vae"] / 1e6, 2), "wall_seconds": round(time.time() - t0, 1),
                   "versions": {"torch": torch.__version__}})
    prior = source / "world.json"
    full = json.loads(prior.read_text()) if prior.is_file() else {"backbone": "sdxl"}
    if "vae_decoder_repair" in full:  # an earlier repair of these weights stays in the history
        record["previous"] = full["vae_decoder_repair"]
    full["vae_decoder_repair"] = record
    (out / "world.json").write_text(json.dumps(full, indent=1, default=str))
    log(f"wrote {out}/vae and world.json in {record['wall_seconds']} s")
    return record


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
    captions, index = caption_table(seed=cfg.seed, repeats=cfg.caption_repeats)
    record["captions"] = {"table": len(captions), "augment": cfg.caption_augment, "repeats": list(cfg.caption_repeats)}
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


def save_sdxl_parts(unet: torch.nn.Module | None, vae: torch.nn.Module, folder: str | os.PathLike[str]
                    ) -> dict[str, int]:
    """Write the trained UNet and VAE as the ``world`` preset reads them: diffusers' layout
    (``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``, same for ``vae/``), fp16.
    ``unet=None`` writes the VAE alone. Returns the file sizes in bytes."""
    folder = Path(folder)
    sizes = {}
    for name, module in (("unet", unet), ("vae", vae)):
        if module is None:
            continue
        module.save_config(folder / name)
        config = folder / name / "config.json"  # no trace of where a continued run loaded it from
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
        sizes[name] = _save_st_fp16(module.state_dict(), folder / name / "diffusion_pytorch_model.safetensors")
    return sizes


@torch.no_grad()
def sdxl_pipeline_outputs(bb: Any, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                          output_type: str, chunk: int = 64) -> torch.Tensor:
    """The backbone's diffusers pipeline (Euler) on ``prompts`` in chunks, output i from CPU noise of ``seeds[i]``:
    its ``images`` (float, on the CPU) concatenated: latents with ``output_type="latent"``, [0, 1] images with
    ``"pt"``."""
    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + chunk]]
        with _autocast(bb.device):
            res = pipe(prompt=prompts[i:i + chunk], generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                       height=bb.resolution, width=bb.resolution, output_type=output_type)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def _sdxl_sample(bb: Any, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                 chunk: int = 128) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from the SDXL pipeline; image i starts from CPU noise of seeds[i]."""
    return sdxl_pipeline_outputs(bb, prompts, seeds, steps=steps, guidance=guidance, output_type="pt",
                                 chunk=chunk) * 2 - 1
