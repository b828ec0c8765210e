"""Pieces shared by the LoRA methods on diffusion backbones (not a method: skipped by discovery).

Target selection by module name, the training images as latents (with their prompts), and
sampling with saved LoRAs loaded into the backbone's diffusers pipeline (``load_lora_weights`` +
``set_adapters``), so the images a user gets are made from exactly the files we save.

File layout shared by the LoRA methods (what ``Method.part``/``combine`` rely on): the content LoRA
in ``content/pytorch_lora_weights.safetensors``, the style LoRA in ``style/...``; ``meta["loras"]``
may name other files for a use (e.g. ``{"both": ["fused/pytorch_lora_weights.safetensors"]}``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from cstoolkit.backbone import DiffusionBackbone, PromptEmbeds
from cstoolkit.compile import CompiledForward
from cstoolkit.io import image_to_tensor, load_image
from cstoolkit.lora import LoRASet, lora_state_dict_to_layers
from cstoolkit.method import GenerateConfig, expand_placeholders

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from cstoolkit.runtime import Runtime

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"


def block_of(name: str) -> str:
    """'up_blocks.0.attentions.1.transformer_blocks.0.attn2' -> 'up_blocks.0.attentions.1'."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return ".".join(parts[:3])
    return ".".join(parts[:4])


def target_linears(backbone: DiffusionBackbone, *, blocks: Iterable[str] | None = None,
                   attentions: Sequence[str] = ("attn1", "attn2"),
                   projections: Sequence[str] = PROJECTIONS) -> list[str]:
    """Names of the attention projections to adapt, optionally only inside ``blocks`` (prefixes)."""
    prefixes = tuple(blocks) if blocks is not None else None
    names = []
    for name, _ in backbone.attention_layers():
        if name.rsplit(".", 1)[-1] not in attentions:
            continue
        if prefixes is not None and not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        names.extend(f"{name}.{p}" for p in projections)
    return names


def is_cross_attention_kv(name: str) -> bool:
    """k/v projections of cross-attention read the text, not the image."""
    return ".attn2.to_k" in name or ".attn2.to_v" in name


def image_latents(backbone: DiffusionBackbone, path: str, where: str, resolution: int | None = None) -> torch.Tensor:
    """Load, crop and encode a training image to (1, C, h, w) latents."""
    size = resolution or backbone.resolution
    pixels = image_to_tensor(load_image(path, where), size).unsqueeze(0)
    with torch.no_grad():
        return backbone.encode_images(pixels.to(backbone.device)).detach()


def embeds_cat(embeds: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """Prompt embeddings of several batches as one batch (rows in order)."""
    extra_keys = set.intersection(*(set(e.extra) for e in embeds))
    pooled = None if any(e.pooled is None for e in embeds) else torch.cat([e.pooled for e in embeds])
    return PromptEmbeds(torch.cat([e.prompt_embeds for e in embeds]), pooled,
                        {k: torch.cat([e.extra[k] for e in embeds]) for k in sorted(extra_keys)})


def embeds_rows(cond: PromptEmbeds, rows: slice) -> PromptEmbeds:
    """Some rows of a batch of prompt embeddings."""
    return PromptEmbeds(cond.prompt_embeds[rows], None if cond.pooled is None else cond.pooled[rows],
                        {k: v[rows] for k, v in cond.extra.items()})


class TrainingImages:
    """Latents of training images with the prompt of each: one at a time (batch 1) or all at once."""

    def __init__(self, latents: torch.Tensor, cond: PromptEmbeds):
        if len(cond) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} images but {len(cond)} prompts")
        self.latents, self.cond = latents, cond

    @classmethod
    def encode(cls, backbone: DiffusionBackbone, paths: Sequence[str], prompts: Sequence[str],
               where: Sequence[str]) -> "TrainingImages":
        """Load, crop and encode ``paths``; ``where[i]`` names image i in errors (``inputs.images[i]``)."""
        latents = torch.cat([image_latents(backbone, p, w) for p, w in zip(paths, where)])
        return cls(latents, backbone.encode_prompt(list(prompts)))

    def __len__(self) -> int:
        return self.latents.shape[0]

    def pick(self, step: int) -> tuple[torch.Tensor, PromptEmbeds]:
        """Image ``step mod n`` and its prompt (round-robin: deterministic, resumable)."""
        i = step % len(self)
        return self.latents[i:i + 1], embeds_rows(self.cond, slice(i, i + 1))

    def all(self) -> tuple[torch.Tensor, PromptEmbeds]:
        return self.latents, self.cond


class StaticBatch:
    """One step's latents, prompt embeddings, noise and timesteps in fixed tensors, filled eagerly before
    the step (:meth:`fill`), so that a step reading only these can be replayed as a CUDA graph.

    The draws are those of ``training_loss`` with a generator: noise first, then the timesteps.
    """

    def __init__(self, backbone: DiffusionBackbone, latents: torch.Tensor, cond: PromptEmbeds):
        device = backbone.device
        self.backbone = backbone
        self.latents = latents.to(device=device, dtype=torch.float32, copy=True)
        self.cond = cond.to(device=device, copy=True)
        self.noise = torch.zeros_like(self.latents)
        self.timesteps = torch.zeros(latents.shape[0], dtype=torch.long, device=device)

    def fill(self, latents: torch.Tensor, cond: PromptEmbeds, generator: torch.Generator) -> None:
        """Copy in the step's images and prompts and draw its noise and timesteps from ``generator``."""
        self.latents.copy_(latents)
        self.cond.prompt_embeds.copy_(cond.prompt_embeds)
        if self.cond.pooled is not None and cond.pooled is not None:
            self.cond.pooled.copy_(cond.pooled)
        for k, v in self.cond.extra.items():
            v.copy_(cond.extra[k])
        self.draw(generator)

    def draw(self, generator: torch.Generator) -> None:
        """Draw the step's noise, then its timesteps, from ``generator`` (images and prompts stay)."""
        self.noise.copy_(torch.randn(self.noise.shape, generator=generator, device=generator.device))
        steps = self.backbone.noise_scheduler.config.num_train_timesteps
        self.timesteps.copy_(torch.randint(0, steps, self.timesteps.shape, generator=generator,
                                           device=generator.device))

    def split(self, micro_batch: int) -> list[tuple["StaticBatch", float]]:
        """Views of ``micro_batch`` images each with their weight k/n (``0``: the whole batch).

        Summing ``weight * part.loss()`` gives the batch's mean loss; backward part by part
        accumulates the same gradient at the memory of ``micro_batch`` images.
        """
        n = self.latents.shape[0]
        if micro_batch <= 0 or micro_batch >= n:
            return [(self, 1.0)]
        parts = []
        for start in range(0, n, micro_batch):
            rows = slice(start, min(n, start + micro_batch))
            part = StaticBatch.__new__(StaticBatch)
            part.backbone = self.backbone
            part.latents, part.noise, part.timesteps = self.latents[rows], self.noise[rows], self.timesteps[rows]
            part.cond = embeds_rows(self.cond, rows)
            parts.append((part, (rows.stop - rows.start) / n))
        return parts

    def loss(self) -> torch.Tensor:
        """Mean denoising loss of the UNet (as it is now) on this batch."""
        return self.backbone.training_loss(self.latents, self.cond, noise=self.noise, timesteps=self.timesteps)

    def noisy(self) -> torch.Tensor:
        """The noised latents of this batch (for methods comparing predictions, e.g. ZipLoRA)."""
        return self.backbone.noise_scheduler.add_noise(self.latents, self.noise, self.timesteps)


def drop_step_tensors(loras: LoRASet, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Free what one training step makes anew: the banks' merged weights and the gradients (of the LoRAs
    and of whatever else ``optimizer`` trains, e.g. mergers). Called before a CUDA graph capture
    (``GraphedStep(before_capture=...)``), so that their blocks are not kept reserved beside its pool."""
    loras.release()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for bank in loras.banks.values():
        bank.lora_A.grad = bank.lora_B.grad = None


@contextlib.contextmanager
def compiled_unet(backbone: DiffusionBackbone, runtime: "Runtime", *, steps: int, label: str
                  ) -> Iterator[CompiledForward | None]:
    """The backbone's UNet (with whatever LoRA banks get injected into it) compiled for a training run of
    ``steps`` steps where ``runtime.compile`` says so (:meth:`Runtime.compiled`), else ``None``; its plain
    forward is back when the block ends (sampling runs eagerly)."""
    compiler = runtime.compiled(backbone.unet, steps=steps, label=label)
    try:
        yield compiler
    finally:
        if compiler is not None:
            compiler.remove()


def compiled_step(compiler: CompiledForward | None, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with its first compiled call timed as the compile (:meth:`CompiledForward.step`); as it is
    without a compiler."""
    return fn if compiler is None else compiler.step(fn)


def uncompiled(compiler: CompiledForward | None) -> contextlib.AbstractContextManager:
    """Run the UNet's plain forward inside (steps that record per-layer gradients, e.g. UnZipLoRA's scoring)."""
    return contextlib.nullcontext() if compiler is None else compiler.eager()


def unet_prediction(backbone: DiffusionBackbone, noisy: torch.Tensor, timesteps: torch.Tensor,
                    cond: PromptEmbeds) -> torch.Tensor:
    """The UNet's output (float32) on noisy latents with SDXL conditioning, as inside ``training_loss``
    (ZipLoRA compares the outputs of two weightings instead of regressing the noise)."""
    unet, device = backbone.unet, backbone.device
    dtype = next(unet.parameters()).dtype
    time_ids = cond.extra.get("time_ids")
    if cond.pooled is None or time_ids is None:
        raise ValueError("SDXL needs pooled text embeddings and time ids (from encode_prompt)")
    added = {"text_embeds": cond.pooled.to(device=device, dtype=dtype), "time_ids": time_ids.to(device=device,
                                                                                               dtype=dtype)}
    out = unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.prompt_embeds.to(device=device, dtype=dtype),
               added_cond_kwargs=added, return_dict=False)[0]
    return out.float()


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Cheap identity of a LoRA: every key with its shape, sums and a strided sample of its values
    (LoRAs that share parts, like Break-for-Make's frozen halves, still differ)."""
    h = hashlib.sha1()
    for key in sorted(state):
        t = state[key].detach().float().flatten()
        h.update(f"{key}{tuple(state[key].shape)}".encode())
        sample = t[:: max(1, t.numel() // 256)]
        h.update(torch.stack([t.double().sum(), t.double().abs().sum()]).cpu().numpy().tobytes())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        dlogging.set_verbosity(level)


def unload_loras(backbone: DiffusionBackbone) -> None:
    """Remove every LoRA loaded into the backbone's pipeline (the UNet is the base model again)."""
    loaded = getattr(backbone, "_cstoolkit_loaded_loras", None)
    if loaded:
        backbone.pipeline().unload_lora_weights()
        loaded.clear()


def activate_loras(backbone: DiffusionBackbone, loras: dict[str, dict[str, torch.Tensor]],
                   weights: dict[str, float] | None = None) -> None:
    """Load LoRA state dicts (diffusers layout) into the pipeline once, then activate exactly these."""
    pipe = backbone.pipeline()
    loaded: dict[str, str] = backbone.__dict__.setdefault("_cstoolkit_loaded_loras", {})
    names = []
    for role, state in loras.items():
        adapter = f"{role}-{_fingerprint(state)}"
        if adapter not in loaded.values():
            with _quiet():  # diffusers/PEFT warn about absent text-encoder keys and a second adapter
                pipe.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name=adapter)
            loaded[adapter] = adapter
        names.append(adapter)
    if names:
        pipe.set_adapters(names, [float((weights or {}).get(r, 1.0)) for r in loras])
        pipe.enable_lora()
    elif loaded:
        pipe.disable_lora()


def lora_file_metadata(state: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, str]:
    """safetensors metadata diffusers reads to configure a LoRA state dict (alpha = rank: scale 1), with a
    rank pattern where layers differ in rank (as ``LoRASet.diffusers_metadata``, for any subset of layers)."""
    layers = lora_state_dict_to_layers(state, prefix)
    ranks = {name: int(a.shape[0]) for name, (a, _) in layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    meta: dict[str, Any] = {f"{prefix}.r": r, f"{prefix}.lora_alpha": r, f"{prefix}.target_modules": sorted(layers)}
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    if pattern:
        meta[f"{prefix}.rank_pattern"] = pattern
        meta[f"{prefix}.alpha_pattern"] = dict(pattern)
    return {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def loras_for_use(decomposition: Any, use: str, file_name: str = LORA_FILE) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA state dicts a use activates, by role: ``meta["loras"][use]`` (a list of files) when the
    method recorded one, else ``content/`` and/or ``style/`` (both for ``both``) ``<file_name>`` (diffusers'
    file by default; the scale-wise methods' PEFT ``adapter_model.safetensors``)."""
    listed = (decomposition.meta.get("loras") or {}).get(use)
    if listed:
        files = list(listed)
    else:
        files = [f"{r}/{file_name}" for r in (("content", "style") if use == "both" else (use,))]
    return {rel.rsplit("/", 1)[0].replace("/", "_"): decomposition.files[rel] for rel in files}


def generate_with_loras(backbone: DiffusionBackbone, decomposition: Any, prompts: Sequence[str], use: str, *,
                        num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True
                        ) -> list[list["Image.Image"]]:
    """``Method.generate`` of the LoRA methods: the LoRAs of :func:`loras_for_use`, then sampling."""
    return sample_with_loras(backbone, loras_for_use(decomposition, use), prompts, decomposition.placeholders,
                             num_images=num_images, seed=seed, options=options or GenerateConfig(),
                             progress=progress)


def sample_with_loras(backbone: DiffusionBackbone, loras: dict[str, dict[str, torch.Tensor]],
                      prompts: Sequence[str], placeholders: dict[str, str], *, num_images: int, seed: int,
                      options: Any, progress: bool, weights: dict[str, float] | None = None
                      ) -> list[list["Image.Image"]]:
    """Sample every prompt with the given LoRAs active; ``num_images`` per prompt."""
    activate_loras(backbone, loras, weights)
    images = backbone.sample([expand_placeholders(p, placeholders) for p in prompts], num_images=num_images,
                             seed=seed, steps=options.steps, guidance_scale=options.guidance_scale,
                             height=options.height, width=options.width, progress=progress,
                             negative_prompt=getattr(options, "negative_prompt", None))
    return per_prompt(images, num_images)


def per_prompt(images: Sequence[Any], num_images: int) -> list[list[Any]]:
    """:meth:`DiffusionBackbone.sample`'s flat list (grouped by prompt) as one list per prompt."""
    return [list(images[k:k + num_images]) for k in range(0, len(images), num_images)]
