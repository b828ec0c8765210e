"""The ``backbone:`` section of SDXL (:class:`SDXLConfig`) and the dtype it resolves to."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from cstoolkit.backbone import BackboneConfig
from cstoolkit.config import field_

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SDXLConfig(BackboneConfig):
    """The ``backbone:`` section for SDXL.

    The weights come from ``preset`` (built in code) or ``pretrained`` (hub id or local diffusers
    directory), one of which is required; ``pretrained`` wins if both are set.
    """

    name: str = "sdxl"
    preset: str | None = field_(None, help="tiny (random, toy size) | sdxl-base (with random_weights: true built "
                                           "in code, no download) | sdxl-base-random (alias)")
    pretrained: str | None = field_(
        None, help="hub id or local diffusers directory of SDXL 1.0 (unet/, vae/, text_encoder(_2)/, ...)",
        path=True, hub_id=True,
    )
    vae: str | None = field_(
        None, help="separate VAE: hub id or directory, e.g. madebyollin/sdxl-vae-fp16-fix", path=True, hub_id=True
    )
    variant: str | None = field_(None, help="weights variant of `pretrained`, e.g. fp16 (smaller download)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = field_(
        "auto", help="dtype of the frozen UNet and text encoders; auto = runtime.mixed_precision (fp32 on CPU)"
    )
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field_(
        "auto", help="auto = float32 when the weights are fp16 and the VAE is not fp16-safe (force_upcast)"
    )
    resolution: int | None = field_(None, min=64, help="training/sampling size in pixels; default 128 tiny, 1024 else")
    gradient_checkpointing: bool = field_(False, help="trade compute for memory in the UNet when training")
    sample_batch_size: int | None = field_(
        None, min=1, help="images denoised at once in sample(), across prompts; default: the pixels of 4 images "
        "at 1024 px (4 at 1024 px, 64 at the tiny presets' 128 px)"
    )


def _resolve_dtype(config: SDXLConfig, dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        resolved = _DTYPES[config.dtype]
    elif device.type == "cpu":
        resolved = torch.float32
    else:
        resolved = dtype or torch.float32
    if resolved == torch.float16 and device.type == "cpu":
        log.warning("backbone.dtype float16 is not supported on the CPU; using float32")
        resolved = torch.float32
    return resolved
