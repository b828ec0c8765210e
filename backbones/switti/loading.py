"""Reading and writing Switti's files in the official layout (no pickled code runs).

The official releases are ``PyTorchModelHubMixin`` folders: ``model.safetensors`` (fp32 state dict,
persistent buffers included) + ``config.json`` (the constructor's arguments): ``yresearch/Switti``,
``yresearch/Switti-1024``, ``yresearch/Switti-AR`` (``SwittiHF``: depth, rope, rope_theta, rope_size,
use_swiglu_ffn, use_ar, use_crop_cond, reso) and ``yresearch/VQVAE-Switti`` (``VQVAEHF``). A location
is a hub repo id, a local folder holding ``model.safetensors``, or the file itself (its
``config.json``, when beside it, is read too). ``.pth``/``.bin`` state dicts load weights-only.

:func:`save_transformer` / :func:`save_vqvae` write the same layout; a config the official
constructor cannot express (the tiny presets) is kept under the extra ``cstoolkit`` key of
``config.json``, which the official loader ignores.

The buffers ``lvl_1L`` and ``attn_bias_for_masking`` are rebuilt from the config, never read (a file
without them loads); ``quantize.ema_vocab_hit_SV`` (training statistics) is not read either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstoolkit.errors import UserError
from cstoolkit.io import save_safetensors, write_json

from ..infinity.loading import load_file, resolve_file
from .transformer import SwittiTransformer, TransformerConfig
from .vqvae import VQVAE, VQVAEConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REBUILT_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "quantize.ema_vocab_hit_SV")


def resolve(spec: str, where: str) -> tuple[Path, dict[str, Any] | None]:
    """The weights file of a location and its ``config.json`` (None when there is none)."""
    path = resolve_file(spec, where, WEIGHT_FILES)
    config_path = path.parent / "config.json"
    if not config_path.is_file() and not Path(spec).expanduser().exists():  # a hub repo: fetch its config too
        try:
            config_path = resolve_file(f"{spec.partition(':')[0]}:config.json", where)
        except UserError:
            return path, None
    if not config_path.is_file():
        return path, None
    try:
        return path, json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(where, f"cannot read {config_path} ({exc.__class__.__name__})",
                        "expected a JSON file") from None


def transformer_config(config: Mapping[str, Any]) -> TransformerConfig:
    """The architecture of a ``config.json``: our full config where we wrote one, else ``SwittiHF``'s arguments."""
    ours = config.get("cstoolkit")
    if isinstance(ours, Mapping):
        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ours.items() if k in fields}
        return TransformerConfig(**kw)
    return TransformerConfig.from_official(dict(config))


def check_config(expected: TransformerConfig, config: Mapping[str, Any] | None, where: str, preset: str) -> None:
    """A file whose config.json describes another architecture than the preset is refused."""
    if config is None:
        return
    try:
        found = transformer_config(config)
    except (ValueError, TypeError) as exc:
        log.warning("%s: cannot read the architecture in config.json (%s)", where, exc)
        return
    names = [f.name for f in dataclasses.fields(TransformerConfig)]
    diff = [n for n in names if getattr(found, n) != getattr(expected, n)]
    if diff:
        name = diff[0]
        raise UserError(where, f"the checkpoint has {name}={getattr(found, name)!r}, preset '{preset}' has "
                        f"{getattr(expected, name)!r}", "expected the preset of this checkpoint (switti-ar for "
                        "Switti-AR, switti-512, switti-1024)")


def infer_preset(spec: str, where: str, default: str = "switti-ar") -> str:
    """The preset whose transformer equals the architecture in ``spec``'s config.json (else ``default``)."""
    from .presets import PRESETS

    _, config = resolve(spec, where)
    if config is None:
        return default
    try:
        found = transformer_config(config)
    except (ValueError, TypeError):
        return default
    return next((name for name, row in PRESETS.items() if row.transformer == found), default)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``module`` by key; shapes must match. Missing weights are an error;
    :data:`REBUILT_BUFFERS` are neither required nor read."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in REBUILT_BUFFERS]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(where, f"the file lacks {len(missing)} weights: {', '.join(missing[:5])}{more}",
                        "expected an official Switti / VQ-VAE checkpoint of this architecture (check the preset)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected keys, e.g. %s", where, len(unexpected), ", ".join(unexpected[:5]))
    with torch.no_grad():
        for key, target in own.items():
            if key in REBUILT_BUFFERS:
                continue
            value = state[key]
            if value.shape != target.shape:
                raise UserError(where, f"{key} has shape {tuple(value.shape)} in the file, {tuple(target.shape)} here",
                                "expected a checkpoint of this architecture (check the preset)")
            target.copy_(value)


def _state(path: Path, where: str) -> dict[str, torch.Tensor]:
    raw = load_file(path, where)
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def load_transformer(model: SwittiTransformer, spec: str, where: str, preset: str) -> None:
    path, config = resolve(spec, where)
    check_config(model.cfg, config, where, preset)
    load_into(model, _state(path, where), where)
    model.reset_buffers()


def load_vqvae(model: VQVAE, spec: str, where: str) -> None:
    path, _ = resolve(spec, where)
    load_into(model, _state(path, where), where)


def _write(folder: str | Path, module: nn.Module, config: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    save_safetensors(state, folder / "model.safetensors", finite=False)  # buffers may hold -inf masks
    write_json(folder / "config.json", config)
    return folder


def save_transformer(model: SwittiTransformer, folder: str | Path) -> Path:
    """``model.safetensors`` (fp32, buffers included) + ``config.json`` as ``SwittiHF.save_pretrained`` writes."""
    config: dict[str, Any] = dict(model.cfg.to_official() or {})
    config["cstoolkit"] = dataclasses.asdict(model.cfg)
    return _write(folder, model, config)


def save_vqvae(model: VQVAE, folder: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` (``VQVAEHF`` arguments + our config)."""
    cfg: VQVAEConfig = model.cfg
    config: dict[str, Any] = dict(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch, test_mode=True,
                                  share_quant_resi=cfg.share_quant_resi, cstoolkit=dataclasses.asdict(cfg))
    return _write(folder, model, config)
