"""Learned token vectors in SDXL prompts: the placeholder slots of a prompt and the embedding splice."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

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
