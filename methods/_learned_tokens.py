"""Learned text tokens shared by ``textual_inversion`` and ``csd_var``: initialisation, files, sampling.

A learned token is a placeholder string (``<c>``, ``<s>``) with ``n`` vectors per text encoder of the
backbone (``backbone.text_encoders()``); backbones splice them into prompts
(``encode_text(..., learned=...)`` / ``encode_prompt(..., learned=...)``). On disk one safetensors
per placeholder holds one key per encoder, e.g. ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``: the
layout ``StableDiffusionXLPipeline.load_textual_inversion`` takes (one call per encoder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cstoolkit.backbone import Backbone
from cstoolkit.errors import UserError

EMBEDS_FILE = "learned_embeds.safetensors"


def init_vectors(backbone: Backbone, word: str, n: int, where: str) -> dict[str, torch.Tensor]:
    """``n`` vectors per encoder, each the mean input embedding of ``word``'s tokens (fp32, trainable)."""
    if not word.strip():
        raise UserError(where, "empty word", "expected a word to initialise the learned token, e.g. 'dog'")
    out = {}
    for key, emb in backbone.word_embeddings(word).items():  # type: ignore[attr-defined]
        if emb.shape[0] == 0:
            raise UserError(where, f"'{word}' has no tokens for the {key} encoder", "expected a word")
        out[key] = emb.float().mean(0, keepdim=True).repeat(n, 1).clone().requires_grad_(True)
    return out


def token_file(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vectors of one placeholder as saved: ``{encoder key: (n, width)}`` fp32, contiguous, on CPU."""
    return {k: v.detach().float().cpu().contiguous() for k, v in vectors.items()}


def load_token(files: Mapping[str, Mapping[str, torch.Tensor]], role: str, backbone: Backbone,
               ) -> dict[str, torch.Tensor] | None:
    """The saved vectors of ``role`` (``content``/``style``) on the backbone's device, or None."""
    tensors = files.get(f"{role}/{EMBEDS_FILE}")
    if tensors is None:
        return None
    widths = backbone.text_encoders()  # type: ignore[attr-defined]
    for key, width in widths.items():
        if key not in tensors or tensors[key].shape[-1] != width:
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            raise UserError("decomposition", f"{role} embeddings {got} do not fit this backbone",
                            f"expected keys {dict(widths)} (encoder -> width)")
    return {k: tensors[k].to(backbone.device) for k in widths}


def learned_for(prompts: Sequence[str], tokens: Mapping[str, Mapping[str, torch.Tensor] | None],
                ) -> dict[str, Mapping[str, torch.Tensor]]:
    """The learned tokens a batch of prompts uses (placeholders that occur and have vectors)."""
    return {ph: v for ph, v in tokens.items() if v is not None and any(ph in p for p in prompts)}


def scalewise_sample_options(options: Any) -> dict[str, Any]:
    """``cfg``/``tau``/``top_k``/``top_p`` given in ``options`` (None = the backbone's default)."""
    return {k: getattr(options, k) for k in ("cfg", "tau", "top_k", "top_p")
            if getattr(options, k, None) is not None}
