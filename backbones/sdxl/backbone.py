"""The SDXL backbone (:class:`SDXLBackbone`) and :func:`build_pipeline`."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import BackboneConfig, DiffusionBackbone, PromptEmbeds
from cstoolkit.errors import UserError
from cstoolkit.registry import register_backbone

from .config import SDXLConfig, _resolve_dtype
from .loading import _build_preset, _load_pretrained, _move
from .presets import PRESETS, RANDOM_PRESETS, SDXL_BASE_ID
from .prompts import TI_KEYS, _ids_with_learned, _spliced_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

log = logging.getLogger(__name__)


def _cast_inputs_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: cast floating tensor inputs to the module's parameter dtype."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@register_backbone
class SDXLBackbone(DiffusionBackbone):
    """Stable Diffusion XL 1.0: UNet2DConditionModel, CLIP-L + OpenCLIP-bigG text encoders, AutoencoderKL.

    Built with :meth:`from_config`. The base model is frozen (``freeze``); methods add adapters to
    ``unet`` (see :meth:`attention_layers`) and sample through :meth:`sample` or :meth:`pipeline`.
    """

    name: ClassVar[str] = "sdxl"
    Config: ClassVar[type[BackboneConfig]] = SDXLConfig
    presets: ClassVar[dict[str, str]] = PRESETS

    config: SDXLConfig

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler: Any,
        config: SDXLConfig | None = None,
        weight_dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
    ):
        super().__init__()
        from diffusers import DDPMScheduler

        self.config = config or SDXLConfig()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        #: sampling scheduler (the pipeline's; Euler for SDXL 1.0)
        self.scheduler = scheduler
        #: training scheduler: DDPM with the same betas/prediction type (as diffusers' SDXL scripts)
        self.noise_scheduler = DDPMScheduler.from_config(dict(scheduler.config))
        self.weight_dtype = weight_dtype
        if resolution is None:
            # the UNet's native size (what the pipeline samples by default): 128 px tiny, 1024 px SDXL
            sample_size = getattr(unet.config, "sample_size", None) or 128
            resolution = self.config.resolution or int(sample_size) * self.vae_scale_factor
        self.resolution = int(resolution)
        self._pipe: Any = None
        # the VAE may run in another dtype than the UNet (fp32 vs fp16): cast its inputs on the way in,
        # so that encode_images and the diffusers pipeline work with any combination
        for part in (vae.encoder, vae.decoder, getattr(vae, "post_quant_conv", None)):
            if part is not None and not getattr(part, "_cstoolkit_casts_inputs", False):
                part.register_forward_pre_hook(_cast_inputs_hook)
                part._cstoolkit_casts_inputs = True
        if hasattr(vae, "enable_slicing"):
            vae.enable_slicing()  # decode one image at a time: memory at 1024 px, batch-independent output
        if self.config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, config: BackboneConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> "SDXLBackbone":
        """Build from a validated :class:`SDXLConfig` on ``device``.

        ``dtype`` (from the runtime's mixed precision) applies when ``config.dtype`` is ``auto``;
        on the CPU ``auto`` means float32. ``device="meta"`` builds a preset without memory
        (parameter counts, shapes).
        """
        if not isinstance(config, SDXLConfig):
            raise TypeError(f"expected an SDXLConfig, got {type(config).__name__}")
        device = torch.device(device)
        weight_dtype = _resolve_dtype(config, dtype, device)
        if config.random_weights:
            if config.pretrained:
                log.warning("backbone.random_weights is set: ignoring backbone.pretrained '%s'", config.pretrained)
            config = dataclasses.replace(config, pretrained=None, preset=config.preset or "sdxl-base")
        elif config.preset == "sdxl-base" and not config.pretrained:
            config = dataclasses.replace(config, pretrained=SDXL_BASE_ID)  # the preset's real weights
        if config.pretrained:
            if config.preset:
                log.warning("backbone.pretrained is set: ignoring backbone.preset '%s'", config.preset)
            modules = _load_pretrained(config, weight_dtype, device)
            for key in ("unet", "text_encoder", "text_encoder_2", "vae"):
                _move(modules[key], device)
        else:
            if config.preset is None:
                raise UserError("backbone.preset", "missing",
                                f"expected a preset ({', '.join(PRESETS)}) or backbone.pretrained")
            if config.preset not in PRESETS:
                raise UserError("backbone.preset", f"unknown preset '{config.preset}' for sdxl",
                                f"known: {', '.join(PRESETS)}")
            if config.vae is not None:
                log.warning("backbone.vae is only used with backbone.pretrained; ignoring it")
            modules = _build_preset(RANDOM_PRESETS.get(config.preset, config.preset), device, weight_dtype,
                                    config.vae_dtype)
        backbone = cls(**modules, config=config, weight_dtype=weight_dtype)
        backbone.freeze()
        return backbone

    @classmethod
    def from_pipeline(cls, pipe: Any, config: SDXLConfig | None = None) -> "SDXLBackbone":
        """Wrap the modules of an existing ``StableDiffusionXLPipeline`` (frozen, shared, not copied)."""
        parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
        missing = [p for p in parts if getattr(pipe, p, None) is None]
        if missing:
            raise ValueError(f"the pipeline has no {', '.join(missing)}")
        backbone = cls(**{p: getattr(pipe, p) for p in parts}, config=config, weight_dtype=pipe.unet.dtype)
        backbone._pipe = pipe
        backbone.freeze()
        return backbone

    def freeze(self) -> None:
        """Freeze every weight (UNet, VAE, text encoders) and put the modules in eval mode."""
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ accessors
    @property
    def text_encoder_modules(self) -> list[nn.Module]:
        """[CLIP-L text encoder, OpenCLIP-bigG text encoder with projection]."""
        return [self.text_encoder, self.text_encoder_2]

    def text_encoders(self) -> dict[str, int]:
        """Encoder key -> input-embedding width: ``{"clip_l": 768, "clip_g": 1280}`` (tiny: 32, 64)."""
        return {key: int(enc.get_input_embeddings().weight.shape[1])
                for key, enc in zip(TI_KEYS, self.text_encoder_modules)}

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Per encoder, the frozen input embeddings (n_tokens, width) of ``text`` (no BOS/EOS/padding)."""
        out = {}
        for key, tok, enc in zip(TI_KEYS, self.tokenizers, self.text_encoder_modules):
            table = enc.get_input_embeddings()
            ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, device=table.weight.device)
            out[key] = table(ids).detach().float()
        return out

    @property
    def tokenizers(self) -> list[Any]:
        """[tokenizer (pads with <|endoftext|>), tokenizer_2 (pads with "!")]."""
        return [self.tokenizer, self.tokenizer_2]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ conditioning
    def time_ids(
        self, batch_size: int = 1, height: int | None = None, width: int | None = None, *,
        dtype: torch.dtype | None = None, device: torch.device | None = None,
    ) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), shape (B, 6)."""
        h = height or self.resolution
        w = width or self.resolution
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype or self.weight_dtype, device=device or self.device)
        return ids.repeat(batch_size, 1)

    def encode_prompt(self, prompts: Sequence[str] | str, *,
                      learned: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> PromptEmbeds:
        """Encode prompts like diffusers' SDXL pipeline (no grad unless ``learned`` is given).

        ``prompt_embeds`` (B, 77, D1 + D2): penultimate hidden states of both encoders,
        concatenated; ``pooled`` (B, P): ``text_encoder_2``'s projected text embedding;
        ``extra["time_ids"]`` (B, 6): add_time_ids for the backbone's resolution. ``learned``
        (placeholder -> ``{"clip_l": (n, D1), "clip_g": (n, D2)}``) puts the n vectors in place of
        each occurrence of the placeholder, as ``load_textual_inversion`` does with tokens
        ``<c>``, ``<c>_1``, ...; gradients flow into them.
        """
        if learned:
            return self._encode_prompt(prompts, learned)
        with torch.no_grad():
            return self._encode_prompt(prompts, None)

    def _encode_prompt(self, prompts: Sequence[str] | str,
                       learned: Mapping[str, Mapping[str, torch.Tensor]] | None) -> PromptEmbeds:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for key, tokenizer, encoder in zip(TI_KEYS, self.tokenizers, self.text_encoder_modules):
            dev = next(encoder.parameters()).device
            if learned:
                ids, slots = _ids_with_learned(tokenizer, prompts, {k: v[key] for k, v in learned.items()})
                with _spliced_embeddings(encoder, slots):
                    out = encoder(ids.to(dev), output_hidden_states=True)
            else:
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
                if tokenizer is self.tokenizer:
                    self._warn_truncation(prompts, tokenizer)
                out = encoder(ids.to(dev), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection.text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        dtype = self.text_encoder_2.dtype
        prompt_embeds = torch.cat(hidden, dim=-1).to(dtype)
        assert pooled is not None
        time_ids = self.time_ids(len(prompts), dtype=prompt_embeds.dtype, device=prompt_embeds.device)
        return PromptEmbeds(prompt_embeds, pooled.to(dtype), {"time_ids": time_ids})

    @staticmethod
    def _warn_truncation(prompts: list[str], tokenizer: Any) -> None:
        for prompt in prompts:
            n = len(tokenizer(prompt).input_ids)
            if n > tokenizer.model_max_length:
                log.warning("prompt truncated to %d CLIP tokens (%d given): %r", tokenizer.model_max_length, n, prompt)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) times the VAE scaling factor, float32.

        Uses the posterior mean (deterministic); with ``generator`` a posterior sample instead.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        f = self.vae_scale_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(images.shape[-2:])}")
        dist = self.vae.encode(images.to(self.vae.device)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1], float32."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.device) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        latents: torch.Tensor,
        cond: PromptEmbeds,
        *,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | int | None = None,
        reduction: Literal["mean", "none"] = "mean",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss of the UNet, as in diffusers' SDXL DreamBooth-LoRA script.

        Noise ~ N(0, I) and timesteps ~ U{0..999} are drawn from ``generator`` (on its device,
        then moved), so a seeded generator gives the same loss on any device. The target is the
        noise (``epsilon``) or the velocity (``v_prediction``) per the scheduler config.
        ``cond`` has B rows or one row (broadcast). ``reduction="none"`` returns the per-sample
        loss (B,) (mean over latent elements); ``"mean"`` a scalar. Computed in float32.
        ``noise`` (and ``timesteps``) may be given instead of drawn, e.g. pre-drawn into static
        tensors for a step replayed as a CUDA graph.
        """
        b = latents.shape[0]
        if len(cond) not in (1, b):
            raise ValueError(f"cond has {len(cond)} rows for {b} latents")
        device = self.device
        latents = latents.to(device=device, dtype=torch.float32)
        gen_device = generator.device if generator is not None else device
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device=device, dtype=torch.float32)
        sched = self.noise_scheduler
        if timesteps is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device=gen_device)
        else:
            t = torch.as_tensor(timesteps).reshape(-1)
            t = t.expand(b) if t.numel() == 1 else t
        t = t.to(device=device, dtype=torch.long)
        noisy = sched.add_noise(latents, noise, t)
        prediction_type = sched.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = latents
        prompt_embeds = cond.prompt_embeds
        pooled = cond.pooled
        time_ids = cond.extra.get("time_ids")
        if pooled is None:
            raise ValueError("SDXL needs pooled text embeddings (PromptEmbeds.pooled)")
        if time_ids is None:
            time_ids = self.time_ids(len(cond))
        if len(cond) == 1 and b > 1:
            prompt_embeds, pooled, time_ids = (x.expand(b, *x.shape[1:]) for x in (prompt_embeds, pooled, time_ids))
        dtype = self.unet.dtype
        pred = self.unet(
            noisy.to(dtype),
            t,
            encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype),
            added_cond_kwargs={"text_embeds": pooled.to(device=device, dtype=dtype),
                               "time_ids": time_ids.to(device=device, dtype=dtype)},
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred.float(), target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return loss.mean() if reduction == "mean" else loss

    def attention_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, diffusers ``Attention``) for every attention of the UNet, e.g.
        ``up_blocks.0.attentions.1.transformer_blocks.0.attn2`` (attn1 = self, attn2 = cross)."""
        from diffusers.models.attention_processor import Attention

        for name, module in self.unet.named_modules():
            if isinstance(module, Attention):
                yield name, module

    # ------------------------------------------------------------------ sampling
    def pipeline(self) -> "StableDiffusionXLPipeline":
        """A diffusers ``StableDiffusionXLPipeline`` over this backbone's modules (built once, cached).

        It shares the module objects (adapters added to ``unet`` are used) and the sampling
        scheduler; no invisible watermark. ``save_pretrained`` writes a directory that
        ``pretrained:`` loads back.
        """
        from diffusers import StableDiffusionXLPipeline

        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "unet": self.unet,
                 "scheduler": self.scheduler}
        if self._pipe is None:
            self._pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            stale = {k: v for k, v in parts.items() if getattr(self._pipe, k, None) is not v}
            if stale:  # a module was replaced on the backbone (e.g. a wrapped UNet): follow it
                self._pipe.register_modules(**stale)
        return self._pipe

    def sample(
        self,
        prompts: Sequence[str] | str,
        *,
        num_images: int = 1,
        seed: int = 0,
        steps: int = 30,
        guidance_scale: float = 7.0,
        height: int | None = None,
        width: int | None = None,
        progress: bool = True,
        **pipeline_kwargs: Any,
    ) -> list["Image.Image"]:
        """Generate ``num_images`` PIL images per prompt, grouped by prompt in prompt order.

        Image ``i`` of every prompt starts from the noise of a CPU generator seeded ``seed + i``,
        so results do not depend on the device's RNG, the batch size or the other prompts.
        Images of all prompts are denoised :meth:`sample_batch` at a time (one batch may mix prompts:
        at small sizes the UNet's cost per call hardly grows with the batch). Extra keyword arguments
        go to the diffusers pipeline (``negative_prompt``, ``cross_attention_kwargs``, ...).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height = height or self.resolution
        width = width or self.resolution
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        rows = [(prompt, i) for prompt in prompts for i in range(num_images)]
        batch = self.sample_batch(height, width)
        images: list[Image.Image] = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            out = pipe(
                prompt=[prompt for prompt, _ in chunk],
                num_images_per_prompt=1,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for _, i in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                output_type="pil",
                **pipeline_kwargs,
            )
            images.extend(out.images)
        return images

    def sample_batch(self, height: int | None = None, width: int | None = None) -> int:
        """Images :meth:`sample` denoises at once: ``sample_batch_size``, or as many as 4 images at
        1024 px take in pixels (64 at most)."""
        if self.config.sample_batch_size:
            return int(self.config.sample_batch_size)
        pixels = (height or self.resolution) * (width or self.resolution)
        return max(1, min(64, 4 * 1024 * 1024 // pixels))


def build_pipeline(
    preset: str | None = "tiny",
    *,
    pretrained: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **options: Any,
) -> "StableDiffusionXLPipeline":
    """A diffusers ``StableDiffusionXLPipeline`` of a preset (default ``tiny``) or ``pretrained`` weights.

    ``options`` are other :class:`SDXLConfig` keys (``vae``, ``vae_dtype``, ``variant``,
    ``resolution``, ...). Weights are frozen. Example::

        pipe = build_pipeline("tiny")
        pipe.save_pretrained("tiny-sdxl")   # loads back with `pretrained: tiny-sdxl`
    """
    config = SDXLConfig(preset=None if pretrained else preset,
                        pretrained=str(pretrained) if pretrained else None, **options)
    return SDXLBackbone.from_config(config, device=device, dtype=dtype).pipeline()
