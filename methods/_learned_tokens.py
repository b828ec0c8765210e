"""Learned text tokens shared by ``textual_inversion`` and ``csd_var``: initialisation, files, sampling.

A learned token is a placeholder string (``<c>``, ``<s>``) with ``n`` vectors per text encoder of the
backbone (``backbone.text_encoders()``); backbones splice them into prompts
(``encode_text(..., learned=...)`` / ``encode_prompt(..., learned=...)``). On disk one safetensors
per placeholder holds one key per encoder, e.g. ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``: the
layout ``StableDiffusionXLPipeline.load_textual_inversion`` takes (one call per encoder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from cstoolkit.backbone import Backbone
from cstoolkit.errors import UserError

EMBEDS_FILE = "learned_embeds.safetensors"


InitMode = Literal["first_subtoken", "mean"]


def init_vectors(backbone: Backbone, word: str, n: int, where: str, mode: InitMode = "first_subtoken",
                 ) -> dict[str, torch.Tensor]:
    """``n`` vectors per encoder initialised from ``word`` (fp32, trainable).

    ``first_subtoken`` (the official CSD-VAR code, ``train.py``): the words of ``word`` (split on spaces
    and ``_``) each give the embedding of their first sub-token; one word is repeated ``n`` times, ``n``
    words give one vector each (the official code stops on any other count: here the words cycle, or
    the first ``n`` are kept). ``mean``: every vector is the mean embedding of all of ``word``'s tokens.
    """
    if not word.strip():
        raise UserError(where, "empty word", "expected a word to initialise the learned token, e.g. 'dog'")
    words = [w for w in re.split(r"[\s_]+", word.strip()) if w]
    out = {}
    for key, emb in backbone.word_embeddings(word).items():  # type: ignore[attr-defined]
        if emb.shape[0] == 0:
            raise UserError(where, f"'{word}' has no tokens for the {key} encoder", "expected a word")
        if mode == "mean":
            rows = emb.float().mean(0, keepdim=True).repeat(n, 1)
        else:
            firsts = [backbone.word_embeddings(w)[key][0].float() for w in words]  # type: ignore[attr-defined]
            rows = torch.stack([firsts[i % len(firsts)] for i in range(n)])
        out[key] = rows.clone().requires_grad_(True)
    return out


def hflip_targets(backbone: Any, image: torch.Tensor, schedule: Any, hflip: bool) -> list[Any]:
    """Teacher-forcing targets of ``image`` (1, 3, H, W), and of its mirror image when ``hflip``
    (the official CSD-VAR data pipeline flips each draw at random, ``utils/data.py``)."""
    out = [backbone.image_to_targets(image, schedule)]
    if hflip:
        out.append(backbone.image_to_targets(torch.flip(image, dims=[-1]), schedule))
    return out


def pick(options: Sequence[Any], generator: torch.Generator) -> Any:
    """One of ``options`` drawn with ``generator`` (no draw for a single option)."""
    return options[pick_index(len(options), generator)]


def pick_index(n: int, generator: torch.Generator) -> int:
    """The index :func:`pick` draws from ``n`` options (no draw for a single option)."""
    if n == 1:
        return 0
    return int(torch.randint(n, (1,), generator=generator))


def warmup_lr(step: int, lr: float, warmup: int, start_ratio: float = 0.005, end_ratio: float = 1.0,
              total: int | None = None) -> float:
    """Learning rate of ``step`` (0-based) under the official schedule (``utils/lr_control.py``, ``lin0``).

    Warm-up from ``start_ratio * lr`` to ``lr`` over ``warmup`` steps, then ``lin0``: constant for
    the first 5 % of the rest, then linear to ``end_ratio * lr`` at step ``total - 1``. The official
    run leaves ``wpe`` (``end_ratio``) at its default 1, so after warm-up the rate stays at ``lr``."""
    if warmup and step < warmup:
        return lr * (start_ratio + (1 - start_ratio) * step / warmup)
    if total is None or end_ratio == 1.0 or total - 1 <= warmup:
        return lr
    done = (step - warmup) / (total - 1 - warmup)
    if done < 0.05:
        return lr
    return lr * (end_ratio + (1 - end_ratio) * (1 - done) / 0.95)


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
    """``cfg``/``tau``/``top_k``/``top_p`` given in ``options`` (None = the backbone's default). A negative
    prompt (an SDXL option) stops with one line: the scale-wise guidance contrasts with the empty caption."""
    if getattr(options, "negative_prompt", None):
        raise UserError("generate.negative_prompt", "the scale-wise backbones take no negative prompt (their "
                        "guidance contrasts the prompt with the empty caption)", "leave it out on Infinity and Switti")
    return {k: getattr(options, k) for k in ("cfg", "tau", "top_k", "top_p")
            if getattr(options, k, None) is not None}
