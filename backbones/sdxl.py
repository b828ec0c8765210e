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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import importlib.util
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import BackboneConfig, DiffusionBackbone, PromptEmbeds
from cstoolkit.config import field_
from cstoolkit.errors import UserError
from cstoolkit.registry import register_backbone

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "SDXLBackbone",
    "SDXLConfig",
    "build_clip_tokenizer",
    "build_pipeline",
    "sdxl_base_component_configs",
    "tiny_component_configs",
]

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"

PRESETS: dict[str, str] = {
    "tiny": "SDXL block layout at toy width (UNet 32/64/128 ch, 2 tiny CLIPs, 8x VAE), seeded, 128 px, CPU",
    "sdxl-base": f"SDXL 1.0 base: weights of {SDXL_BASE_ID}; with random_weights: true the full architecture "
                 "(UNet 2.57 B params) with random weights, reading no files",
    "sdxl-base-random": "alias of sdxl-base with random_weights: true (benchmarks)",
    "world": "the tiny architecture trained on the synthetic world (cstoolkit world train sdxl): UNet + VAE from "
             "the shipped fp16 safetensors, the 2 tiny CLIPs from their seed; 128 px, CPU",
}
#: presets whose weights are always built from the seed (no file exists for them)
RANDOM_PRESETS = {"tiny": "tiny", "sdxl-base-random": "sdxl-base"}

#: Seed of the preset weights: every build of a preset gives the same weights.
PRESET_SEED = 0

#: Sub-folders of a diffusers SDXL directory that ``pretrained`` must have.
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# SDXL 1.0's scheduler/scheduler_config.json (sampling); training uses DDPMScheduler with the same betas.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
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
    sample_batch_size: int = field_(4, min=1, help="images denoised at once in sample() (memory at 1024 px)")


# ---------------------------------------------------------------------------------------------
# Tokenizers (offline)
# ---------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (as in OpenAI CLIP / open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` shipped with open_clip (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed: it ships the CLIP BPE vocabulary the tiny presets need")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49408-token CLIP vocabulary and its 48894 merges, identical to HF's vocab.json/merges.txt."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> "CLIPTokenizer":
    """transformers ``CLIPTokenizer`` of SD/SDXL, built offline from open_clip's BPE file.

    SDXL pads ``tokenizer`` with ``<|endoftext|>`` and ``tokenizer_2`` with ``!``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    try:  # transformers >= 5 builds it from the vocabulary and merges directly
        return CLIPTokenizer(
            vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
        )
    except TypeError:  # transformers 4.x wants files
        return _clip_tokenizer_from_files(pad_token, model_max_length)


def _clip_tokenizer_from_files(pad_token: str, model_max_length: int) -> "CLIPTokenizer":
    """Write HF's vocab.json + merges.txt to a temporary folder and load them with ``from_pretrained``."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="cstoolkit-clip-") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=model_max_length)


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def tiny_component_configs() -> dict[str, dict[str, Any]]:
    """Configs of the ``tiny`` preset: SDXL's block layout, toy widths.

    UNet: DownBlock2D / CrossAttnDownBlock2D x2, CrossAttnUpBlock2D x2 / UpBlock2D (so up_blocks.0
    and up_blocks.1 have attentions.0-2), 32/64/128 channels, head dim 16, 2 layers per block,
    transformer layers (1, 2, 2). Text encoders: CLIP 32-d (quick_gelu) + CLIP 64-d with a 64-d
    projection (gelu) -> cross_attention_dim 96. VAE: 4 blocks (8x down), 4 latent channels.
    """
    te1 = {
        "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 3, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    te2 = {**te1, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "hidden_act": "gelu",
           "projection_dim": 64}
    time_dim = 8
    unet = {
        **_SDXL_BLOCKS,
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 2,
        "attention_head_dim": (2, 4, 8),  # diffusers' name; it is the number of heads (head dim 16)
        "transformer_layers_per_block": (1, 2, 2),
        "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + te2["projection_dim"],
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 128,
        "scaling_factor": 5.0,  # posterior means of this random VAE have std ~0.17: scaled latents ~unit std
        "force_upcast": True,
    }
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def sdxl_base_component_configs() -> dict[str, dict[str, Any]]:
    """Configs of SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0), written out in code."""
    te1 = {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    te2 = {**te1, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
           "hidden_act": "gelu", "projection_dim": 1280}
    unet = {
        **_SDXL_BLOCKS,
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
        "upcast_attention": None,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


_PRESET_CONFIGS = {"tiny": tiny_component_configs, "sdxl-base": sdxl_base_component_configs,
                   "world": tiny_component_configs}


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG of ``device`` (and the CPU's) inside the block; every RNG state is restored after."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def _build_preset(preset: str, device: torch.device, dtype: torch.dtype, vae_dtype: str) -> dict[str, Any]:
    """Build the modules of a preset from its configs with fixed seeds.

    ``tiny`` is built on the CPU (identical weights everywhere) and then moved; other presets are
    constructed directly on ``device`` (``meta`` allocates nothing), one component at a time.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = _PRESET_CONFIGS[preset]()
    build_device = torch.device("cpu") if preset in ("tiny", "world") else device
    factories: list[tuple[str, Any]] = [
        ("unet", lambda: UNet2DConditionModel(**cfgs["unet"])),
        ("vae", lambda: AutoencoderKL(**cfgs["vae"])),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"]))),
    ]
    if preset == "world":  # trained UNet + VAE (diffusers layout, fp16); the CLIPs are tiny's, from their seeds
        factories[:2] = [(key, functools.partial(_load_world_part, cls, key))
                         for key, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))]
    modules: dict[str, Any] = {}
    for i, (key, factory) in enumerate(factories):
        # one seed per component: changing one config does not change the others' weights
        with _seeded(build_device, PRESET_SEED + i):
            module = factory()
        target = _vae_dtype(vae_dtype, dtype, module) if key == "vae" else dtype
        modules[key] = _move(module, device, target)
    modules["tokenizer"] = build_clip_tokenizer("<|endoftext|>")
    modules["tokenizer_2"] = build_clip_tokenizer("!")
    modules["scheduler"] = _euler_scheduler(SDXL_SCHEDULER_CONFIG)
    return modules


#: files of the ``world`` preset under world/weights/sdxl/ (written by ``cstoolkit world train sdxl``)
WORLD_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
               "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


def _load_world_part(cls: Any, subfolder: str) -> nn.Module:
    """The trained UNet or VAE of the ``world`` preset, through diffusers' ``from_pretrained`` (fp32)."""
    from ._world import world_weights

    root = world_weights("sdxl", WORLD_FILES)
    with _quiet_hub():
        return cls.from_pretrained(str(root), subfolder=subfolder, torch_dtype=torch.float32, local_files_only=True)


def _move(module: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """``nn.Module.to`` (diffusers' override warns about fp32-kept modules SDXL does not have)."""
    current = next(module.parameters())
    if dtype is not None and current.dtype == dtype:
        dtype = None
    if device is not None and current.device == torch.device(device):
        device = None
    if device is None and dtype is None:
        return module
    return nn.Module.to(module, device=device, dtype=dtype)


def _euler_scheduler(config: dict[str, Any]) -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def _vae_dtype(setting: str, weight_dtype: torch.dtype, vae: Any) -> torch.dtype:
    """dtype the VAE runs in: ``auto`` keeps it out of fp16 unless its config says fp16 is safe."""
    if setting != "auto":
        return _DTYPES[setting]
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return weight_dtype


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # org/name


def _locate(value: str, where: str) -> tuple[str, bool]:
    """(source, is_local): a value is local if it exists on disk, else it must look like a hub id."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path), True
    if _HUB_ID.match(value):
        return value, False
    raise UserError(
        where, f"no such directory: {value}",
        "expected a local diffusers directory or a Hugging Face Hub id such as " + SDXL_BASE_ID,
    )


def _load_error(where: str, source: str, is_local: bool, exc: Exception) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    if is_local:
        return UserError(where, f"could not load {source} ({reason})",
                         "expected a diffusers SDXL directory as written by StableDiffusionXLPipeline.save_pretrained")
    return UserError(
        where, f"could not load hub id '{source}': not in the local Hugging Face cache and not downloadable ({reason})",
        "a hub id needs network access (or HF_HUB_OFFLINE=1 with the model already cached); on an offline machine "
        "download it elsewhere and give the local directory",
    )


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence a deprecation warning diffusers' hub calls raise on every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _load_pretrained(config: SDXLConfig, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Any]:
    """Load every component of a diffusers SDXL directory or hub repository (and an optional VAE).

    On a GPU the weights go from the files straight to ``device`` (``device_map``), not through CPU
    copies (an H200 run's build phase, full SDXL from local disk: 16.6 -> 11.8 s).
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    assert config.pretrained is not None
    where = "backbone.pretrained"
    source, local = _locate(config.pretrained, where)
    if local:
        root = Path(source)
        if not root.is_dir():
            raise UserError(where, f"{source} is a file",
                            "expected a diffusers directory (unet/, vae/, text_encoder/, ...); single-file "
                            "checkpoints are not supported")
        missing = [s for s in PIPELINE_SUBFOLDERS if not (root / s).is_dir()]
        if config.vae is not None and "vae" in missing:
            missing.remove("vae")
        if missing:
            raise UserError(where, f"{source} has no {', '.join(m + '/' for m in missing)}",
                            "expected a diffusers SDXL directory (model_index.json, unet/, vae/, text_encoder/, "
                            "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
    files_kw: dict[str, Any] = {"local_files_only": True} if local else {}  # configs and tokenizers
    kw = {**files_kw, "device_map": str(device)} if device is not None and device.type == "cuda" else files_kw
    variant = {"variant": config.variant} if config.variant else {}
    try:
        with _quiet_hub():
            sched_cfg = diffusers.EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **files_kw)
            sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name", "")), diffusers.EulerDiscreteScheduler)
            modules: dict[str, Any] = {
                "scheduler": sched_cls.from_config(sched_cfg),
                "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **files_kw),
                "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **files_kw),
                "unet": UNet2DConditionModel.from_pretrained(
                    source, subfolder="unet", torch_dtype=dtype, **variant, **kw
                ),
                "text_encoder": CLIPTextModel.from_pretrained(
                    source, subfolder="text_encoder", dtype=dtype, **variant, **kw
                ),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", dtype=dtype, **variant, **kw
                ),
            }
            if config.vae is None:
                modules["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", **variant, **kw)
    except (OSError, ValueError) as exc:
        raise _load_error(where, config.pretrained, local, exc) from exc
    if config.vae is not None:
        modules["vae"] = _load_vae(config.vae)
    _move(modules["vae"], dtype=_vae_dtype(config.vae_dtype, dtype, modules["vae"]))
    return modules


def _load_vae(value: str) -> Any:
    """A separate AutoencoderKL: a directory with config.json (or a pipeline directory with vae/), or a hub id."""
    from diffusers import AutoencoderKL

    where = "backbone.vae"
    source, local = _locate(value, where)
    subfolder = None
    if local:
        root = Path(source)
        if (root / "vae" / "config.json").is_file() and not (root / "config.json").is_file():
            subfolder = "vae"
        elif not (root / "config.json").is_file():
            raise UserError(where, f"{source} has no config.json", "expected a diffusers AutoencoderKL directory")
    try:
        with _quiet_hub():
            return AutoencoderKL.from_pretrained(source, subfolder=subfolder, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise _load_error(where, value, local, exc) from exc


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
def _cast_inputs_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: cast floating tensor inputs to the module's parameter dtype."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


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


#: textual-inversion keys of the two text encoders (the layout of SDXL embedding files)
TI_KEYS = ("clip_l", "clip_g")


def _ids_with_learned(tokenizer: Any, prompts: list[str], learned: Mapping[str, torch.Tensor],
                      ) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Token ids (B, max_length) of ``prompts`` with a filler id where learned vectors go, and the
    slots ``(row, start, vectors)``: BOS, the text between placeholders tokenised as usual, n
    slots per placeholder, EOS, padding (what diffusers' multi-vector tokens give)."""
    pattern = re.compile("|".join(re.escape(k) for k in sorted(learned, key=len, reverse=True)))
    length = tokenizer.model_max_length
    filler = tokenizer.convert_tokens_to_ids("!")
    pad = tokenizer.pad_token_id
    rows: list[list[int]] = []
    slots: list[tuple[int, int, torch.Tensor]] = []
    for b, prompt in enumerate(prompts):
        ids = [tokenizer.bos_token_id]
        pos = 0
        for match in pattern.finditer(prompt):
            ids += tokenizer(prompt[pos:match.start()], add_special_tokens=False).input_ids
            vec = learned[match.group(0)]
            if len(ids) + vec.shape[0] < length:
                slots.append((b, len(ids), vec))
            ids += [filler] * vec.shape[0]
            pos = match.end()
        ids += tokenizer(prompt[pos:], add_special_tokens=False).input_ids
        ids = ids[: length - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), slots


@contextlib.contextmanager
def _spliced_embeddings(encoder: nn.Module, slots: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
    """While active, the encoder's token embeddings at ``slots`` are the given vectors (with grad)."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        rows, cols, vecs = [], [], []
        for b, start, vec in slots:
            n = min(vec.shape[0], out.shape[1] - 1 - start)
            rows += [b] * n
            cols += list(range(start, start + n))
            vecs.append(vec[:n])
        if not vecs:
            return out
        out = out.clone()
        out[torch.tensor(rows), torch.tensor(cols)] = torch.cat(vecs).to(device=out.device, dtype=out.dtype)
        return out

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
        Images are denoised ``sample_batch_size`` at a time. Extra keyword arguments go to the
        diffusers pipeline (``negative_prompt``, ``cross_attention_kwargs``, ...).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height = height or self.resolution
        width = width or self.resolution
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        batch = max(1, int(self.config.sample_batch_size))
        images: list[Image.Image] = []
        for prompt in prompts:
            for start in range(0, num_images, batch):
                n = min(batch, num_images - start)
                generators = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(n)]
                out = pipe(
                    prompt=prompt,
                    num_images_per_prompt=n,
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    output_type="pil",
                    **pipeline_kwargs,
                )
                images.extend(out.images)
        return images


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

