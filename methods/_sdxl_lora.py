"""Pieces shared by the LoRA methods on diffusion backbones (not a method: skipped by discovery).

Target selection by module name, the training image as latents, and sampling with saved LoRAs
loaded into the backbone's diffusers pipeline (``load_lora_weights`` + ``set_adapters``), so the
images a user gets are made from exactly the files we save.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from cstoolkit.backbone import DiffusionBackbone
from cstoolkit.io import image_to_tensor, load_image
from cstoolkit.method import expand_placeholders

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


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


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for key in sorted(state)[:8]:
        h.update(key.encode())
        h.update(state[key].float().flatten()[:64].cpu().numpy().tobytes())
    h.update(str(len(state)).encode())
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


def sample_with_loras(backbone: DiffusionBackbone, loras: dict[str, dict[str, torch.Tensor]],
                      prompts: Sequence[str], placeholders: dict[str, str], *, num_images: int, seed: int,
                      options: Any, progress: bool, weights: dict[str, float] | None = None
                      ) -> list[list["Image.Image"]]:
    """Sample every prompt with the given LoRAs active; ``num_images`` per prompt."""
    activate_loras(backbone, loras, weights)
    out = []
    for prompt in prompts:
        text = expand_placeholders(prompt, placeholders)
        out.append(backbone.sample([text], num_images=num_images, seed=seed, steps=options.steps,
                                   guidance_scale=options.guidance_scale, height=options.height,
                                   width=options.width, progress=progress))
    return out
