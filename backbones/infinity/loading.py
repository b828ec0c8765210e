"""Loading the official Infinity files without running pickled code.

* ``.pth`` files go through ``torch.load(weights_only=True)``; the only extra class allowed is
  ``argparse.Namespace`` (full training checkpoints keep their arguments in one). A file that needs
  anything else is refused with a :class:`~cstoolkit.errors.UserError`. ``.safetensors`` also load.
* The transformer file is a flat state dict (``infinity_2b_reg.pth``); full training checkpoints
  (``{"trainer": {"gpt_fsdp": ...}}``) are unwrapped. Buffers that older code versions stored
  (``lvl_1L``, ``attn_bias_for_masking``, ...) are ignored, ``cfg_uncond`` is cut or padded to
  ``text_maxlen`` and ``scale_mul_1H11`` is reshaped if it was saved in the flash layout.
* The VAE file holds ``{"vae": state_dict}``; keys may or may not carry the ``.conv.``/``.norm.``
  wrappers of the module tree (both load).
* A weights location is a local file, a local folder with the official file name, or a Hugging Face
  hub repo ``org/repo`` (official file name) / ``org/repo:file`` (downloaded on first use into the
  hub cache).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstoolkit.errors import UserError
from cstoolkit.io import load_weights_file

log = logging.getLogger(__name__)

# keys official files may hold that carry no weights of ours: buffers of older code versions, and the
# VAE quantiser registered twice (``quantize`` is an alias of ``quantizer`` in the official AutoEncoder)
IGNORED_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen",
                "quantize.lfq.mask")
# buffers that hold constants: absent from a file is fine
CONSTANT_BUFFERS = ("zero_k_bias", "quantizer.lfq.mask")


def resolve_file(spec: str, where: str, names: tuple[str, ...] = ()) -> Path:
    """Where a weights file is: a local file, a local folder holding one of ``names``, or on the
    Hugging Face hub as ``org/repo`` (file ``names[0]``) or ``org/repo:path/in/repo``.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise UserError(where, f"{path} holds none of {', '.join(names)}", "expected the official file name")
    repo, _, filename = spec.partition(":")
    if _looks_like_hub_repo(repo) and (filename or names):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo, filename or names[0]))
        except Exception as exc:  # network, missing file, auth
            raise UserError(where, f"cannot fetch {filename or names[0]} from the hub repo {repo} "
                            f"({exc.__class__.__name__})", "expected a local file or a reachable hub repo") from None
    raise UserError(where, f"file not found: {spec}",
                    "expected a local .pth/.safetensors file, a folder, or a hub repo (org/name[:file])")


def _looks_like_hub_repo(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text
            and not text.endswith((".pth", ".pt", ".bin", ".safetensors")))


def load_file(path: str | Path, where: str) -> dict[str, Any]:
    """Read a ``.pth`` (weights only) or ``.safetensors`` file."""
    return load_weights_file(path, where)


def _tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


def transformer_state_dict(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The transformer weights inside an official file (slim state dict or full training checkpoint)."""
    sd = raw
    if "trainer" in raw and isinstance(raw["trainer"], Mapping):
        trainer = raw["trainer"]
        sd = next((trainer[k] for k in ("gpt_fsdp", "gpt_wo_ddp") if isinstance(trainer.get(k), Mapping)), raw)
    else:
        sd = next((raw[k] for k in ("state_dict", "model", "module") if isinstance(raw.get(k), Mapping)), raw)
    out = _tensors(sd)
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def official_null_text(rows: int, channels: int) -> torch.Tensor:
    """The official initial ``cfg_uncond`` (seeded): pads a file whose null text is shorter."""
    t = torch.empty(rows, channels)
    torch.nn.init.trunc_normal_(t, std=1.2, generator=torch.Generator().manual_seed(0))
    return t / channels**0.5


def vae_state_dict(raw: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The VAE weights of an official file, renamed to this module tree's keys."""
    sd = raw["vae"] if isinstance(raw.get("vae"), Mapping) else raw
    own = set(model.state_dict())
    out = {}
    for key, value in _tensors(sd).items():
        if key in own:
            out[key] = value
            continue
        head, _, leaf = key.rpartition(".")
        for wrapper in ("conv", "norm"):
            if f"{head}.{wrapper}.{leaf}" in own:
                out[f"{head}.{wrapper}.{leaf}"] = value
                break
        else:
            out[key] = value  # reported as unexpected
    return out


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], where: str, *, text_maxlen: int | None = None,
              ) -> None:
    """Copy ``state`` into ``module`` by key; shapes must match. Missing weights are an error."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    missing = [k for k in own if k not in state and not k.endswith(CONSTANT_BUFFERS)]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(where, f"the file lacks {len(missing)} weights: {', '.join(missing[:5])}{more}",
                        "expected an official Infinity checkpoint of this architecture (check the preset)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected keys, e.g. %s", where, len(unexpected), ", ".join(unexpected[:5]))
    fixed = {}
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if key == "cfg_uncond" and text_maxlen is not None and value.shape[0] != target.shape[0]:
            rows = target.shape[0]
            value = value[:rows] if value.shape[0] >= rows else \
                torch.cat([value.float().cpu(), official_null_text(rows, value.shape[1])[value.shape[0]:]])
        if key.endswith("scale_mul_1H11") and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        if value.shape != target.shape:
            raise UserError(where, f"{key} has shape {tuple(value.shape)} in the file, {tuple(target.shape)} here",
                            "expected a checkpoint of this architecture (check the preset)")
        fixed[key] = value
    with torch.no_grad():
        for key, value in fixed.items():
            own[key].copy_(value)
