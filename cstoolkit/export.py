"""LoRA files for other tools: ``cstoolkit export RUN --format kohya [--out DIR] [--dtype fp16]``.

A decomposition's LoRA files are found by their layout (:func:`cstoolkit.lora.is_lora_state_dict`:
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` pairs), not by method name. Formats:

* ``kohya``: the layout of kohya-ss sd-scripts, read by AUTOMATIC1111, ComfyUI and diffusers'
  ``load_lora_weights``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
  Module names follow the original (SGM / LDM) UNet that kohya trains SDXL on:
  ``down_blocks.{i}.attentions.{j}`` -> ``input_blocks.{1 + (L+1) i + j}.1``, ``mid_block.attentions.0``
  -> ``middle_block.1``, ``up_blocks.{i}.attentions.{j}`` -> ``output_blocks.{(L+1) i + j}.1`` with L
  layers per block (2 in SD 1.x, 2.x and XL), the inside of each attention block unchanged. Text
  encoder LoRAs (``text_encoder.``, ``text_encoder_2.``) become ``lora_te1_`` / ``lora_te2_``. Our
  files fold the scale into the up weights (alpha = rank), so ``alpha`` is each layer's rank.
* ``diffusers``: the same keys and safetensors metadata as in the decomposition, in ``dtype``, one
  folder per part holding ``pytorch_lora_weights.safetensors`` (``OUT/content/``, ``OUT/style/``), so
  ``pipe.load_lora_weights("OUT/style")`` finds it without ``weight_name=``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .decomposition import Decomposition
from .errors import UserError
from .io import check_finite, make_writable_dir, save_safetensors
from .lora import is_lora_state_dict, lora_state_dict_to_layers

__all__ = ["FORMATS", "Exported", "describe", "export_loras", "kohya_module_name", "to_kohya"]

FORMATS = ("kohya", "diffusers")
#: the file name diffusers' ``load_lora_weights(folder)`` looks for
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: diffusers' key prefix -> kohya's
_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_module_name(name: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module name (``up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``) in the
    SGM naming kohya uses (``output_blocks.1.1.transformer_blocks.0.attn2.to_k``).

    Only modules inside attention blocks have an SGM name here (what our LoRAs adapt); others raise
    ``ValueError``.
    """
    per = layers_per_block + 1
    m = re.match(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m:
        return f"input_blocks.{1 + per * int(m[1]) + int(m[2])}.1.{m[3]}"
    m = re.match(r"^mid_block\.attentions\.0\.(.+)$", name)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m:
        return f"output_blocks.{per * int(m[1]) + int(m[2])}.1.{m[3]}"
    raise ValueError(f"{name} has no kohya name (only layers inside attention blocks are exported)")


def to_kohya(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16, layers_per_block: int = 2
             ) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA state dict in kohya's layout (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for prefix in sorted({k.split(".", 1)[0] for k in state}):
        if prefix not in _PREFIXES:
            raise ValueError(f"unknown LoRA prefix '{prefix}' (expected {', '.join(_PREFIXES)})")
        part = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        for name, (down, up) in sorted(lora_state_dict_to_layers(part, prefix).items()):
            module = kohya_module_name(name, layers_per_block) if prefix == "unet" else name
            key = f"{_PREFIXES[prefix]}_{module.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
            out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)  # scale alpha / rank = 1
    return out


@dataclass
class Exported:
    """One written file: where it came from and where it went."""

    source: str
    path: Path
    tensors: int


def export_loras(decomposition: str | Path, fmt: str = "kohya", out: str | Path | None = None,
                 dtype: str = "fp16", layers_per_block: int = 2) -> list[Exported]:
    """Write every LoRA file of a saved decomposition (a run folder or its ``decomposition/``) in ``fmt``.

    Files go to ``out`` (default ``<run>/export/<fmt>``) as ``<run>_<role>.safetensors``, e.g.
    ``balloon_content.safetensors`` for ``content/pytorch_lora_weights.safetensors`` (kohya), or as
    ``<role>/pytorch_lora_weights.safetensors`` (diffusers).
    """
    if fmt not in FORMATS:
        raise UserError("--format", f"unknown format '{fmt}'", f"expected one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError("--dtype", f"unknown dtype '{dtype}'", f"expected one of: {', '.join(DTYPES)}")
    folder = Path(decomposition)
    if (folder / "decomposition" / "manifest.json").is_file():
        folder = folder / "decomposition"
    dec = Decomposition.load(folder, where="RUN")
    run = folder.parent if folder.name == "decomposition" else folder
    loras = {rel: t for rel, t in dec.files.items() if is_lora_state_dict(t)}
    if not loras:
        raise UserError("RUN", f"the {dec.method} decomposition in {folder} has no LoRA files",
                        "expected a run of a LoRA method (files with unet.<module>.lora_A/B.weight keys)")
    converted = {}
    for rel, state in loras.items():
        try:
            if fmt == "kohya":
                tensors = to_kohya(state, DTYPES[dtype], layers_per_block)
                meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(_rank(state)),
                        "ss_network_alpha": str(_rank(state)), "cstoolkit_source": f"{dec.method}:{rel}"}
            else:
                tensors = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
                meta = dict(dec.file_metadata.get(rel) or {})
        except ValueError as exc:
            raise UserError("--format", f"{rel} cannot be written as {fmt} ({exc})", "try --format diffusers") \
                from None
        # nothing is written when any file would hold NaN or inf (a diverged run, or fp16 overflowing)
        check_finite(state, "RUN", str(folder / rel), "expected finite LoRA weights (the run diverged: run it again "
                     "with a lower learning rate); nothing was exported")
        check_finite(tensors, "--dtype", f"{rel} in {dtype}", "the weights overflow this dtype; try --dtype bf16 or "
                     "fp32; nothing was exported")
        converted[rel] = (tensors, {"format": "pt", **meta})
    target = make_writable_dir(Path(out) if out is not None else run / "export" / fmt, "--out")
    written = []
    for rel, (tensors, meta) in converted.items():
        role = rel.rsplit("/", 1)[0].replace("/", "_") if "/" in rel else Path(rel).stem
        # diffusers: a folder per part with diffusers' default file name, so that
        # ``pipe.load_lora_weights(folder)`` needs no ``weight_name=``
        path = (target / role / DIFFUSERS_WEIGHT_NAME if fmt == "diffusers"
                else target / f"{run.name}_{role}.safetensors")
        save_safetensors(tensors, path, metadata=meta)
        written.append(Exported(rel, path, len(tensors)))
    return written


def _rank(state: dict[str, torch.Tensor]) -> int:
    ranks = [int(v.shape[0]) for k, v in state.items() if k.endswith(("lora_A.weight", "lora.down.weight"))]
    return max(set(ranks), key=ranks.count) if ranks else 0


def describe(written: list[Exported]) -> str:
    """One line per file written (what the CLI prints)."""
    return "\n".join(f"{e.path}  ({e.tensors} tensors, from {e.source})" for e in written)
