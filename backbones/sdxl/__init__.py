"""SDXL backbone: Stable Diffusion XL 1.0 (UNet, two CLIP text encoders, VAE) through diffusers.

Three ways to get one (the recipe's ``backbone:`` section)::

    backbone: {name: sdxl, preset: tiny}                 # built in code from a seed, CPU-friendly
    backbone: {name: sdxl, preset: sdxl-base-random}     # full SDXL 1.0 architecture, random weights
    backbone: {name: sdxl, pretrained: stabilityai/stable-diffusion-xl-base-1.0}   # or a local dir
    backbone: {name: sdxl, pretrained: ..., vae: madebyollin/sdxl-vae-fp16-fix, dtype: float16}

Nothing here downloads anything unless ``pretrained``/``vae`` names a hub id that is not on disk.
The tokenizers of the presets are built offline from open_clip's shipped CLIP BPE vocabulary.

Module-level helpers: :func:`build_pipeline` (a diffusers ``StableDiffusionXLPipeline``),
:func:`build_clip_tokenizer`, :func:`tiny_component_configs`, :func:`sdxl_base_component_configs`.
See docs/backbones/sdxl.md.

Modules: :mod:`.backbone` (the wrapper), :mod:`.config` (the ``backbone:`` section), :mod:`.presets`
(names, component configs), :mod:`.loading` (presets from seeds, pretrained diffusers weights),
:mod:`.tokenizer` (offline CLIP tokenizers), :mod:`.prompts` (learned vectors spliced into prompts).
"""

from .backbone import SDXLBackbone, build_pipeline
from .config import SDXLConfig
from .loading import PIPELINE_SUBFOLDERS
from .presets import (
    PRESET_SEED,
    PRESETS,
    RANDOM_PRESETS,
    SDXL_BASE_ID,
    SDXL_SCHEDULER_CONFIG,
    WORLD_FILES,
    sdxl_base_component_configs,
    tiny_component_configs,
)
from .prompts import TI_KEYS
from .tokenizer import build_clip_tokenizer, clip_bpe_path

__all__ = [
    "PIPELINE_SUBFOLDERS",
    "PRESETS",
    "PRESET_SEED",
    "RANDOM_PRESETS",
    "SDXLBackbone",
    "SDXLConfig",
    "SDXL_BASE_ID",
    "SDXL_SCHEDULER_CONFIG",
    "TI_KEYS",
    "WORLD_FILES",
    "build_clip_tokenizer",
    "build_pipeline",
    "clip_bpe_path",
    "sdxl_base_component_configs",
    "tiny_component_configs",
]
