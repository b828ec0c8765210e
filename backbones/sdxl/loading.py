"""Building the SDXL modules: a preset from its configs and seeds, or pretrained diffusers weights
(a local directory or a hub id, an optional separate VAE)."""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstoolkit.errors import UserError

from .config import _DTYPES, SDXLConfig
from .presets import _PRESET_CONFIGS, PRESET_SEED, SDXL_BASE_ID, SDXL_SCHEDULER_CONFIG, WORLD_FILES
from .tokenizer import build_clip_tokenizer

#: Sub-folders of a diffusers SDXL directory that ``pretrained`` must have.
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


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



def _load_world_part(cls: Any, subfolder: str) -> nn.Module:
    """The trained UNet or VAE of the ``world`` preset, through diffusers' ``from_pretrained`` (fp32)."""
    from .._world import world_weights

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
