"""Learned tokens in CLIP text encoders (textual inversion), for any backbone with transformers' CLIP.

:func:`tokenize_with_learned` tokenises a prompt as usual except that every occurrence of a
placeholder string (``"<c>"``) becomes ``n`` slots for that placeholder's ``n`` learned vectors;
:func:`encode_with_learned` runs a ``CLIPTextModel`` on those ids with the learned vectors spliced
into its input embeddings (through a forward hook on the token-embedding table, so the model's own
forward, causal mask and EOS pooling stay as they are, in every transformers version). Gradients
flow into the learned vectors; the encoder's weights are not touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def split_prompt(prompt: str, placeholders: Sequence[str]) -> list[tuple[str, bool]]:
    """``prompt`` cut at the placeholders: (text, is_placeholder) pieces, longest placeholder first."""
    if not placeholders:
        return [(prompt, False)]
    pattern = "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True))
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in re.finditer(pattern, prompt):
        if m.start() > pos:
            pieces.append((prompt[pos:m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(prompt):
        pieces.append((prompt[pos:], False))
    return pieces


def tokenize_with_learned(tokenizer: Any, prompts: Sequence[str], counts: Mapping[str, int], max_length: int = 77,
                          filler: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, str]]]]:
    """Token ids (B, max_length), attention mask (B, max_length) and, per prompt, the
    (position, placeholder) of every learned slot (one per vector, in order).

    BOS, the text pieces' tokens and ``counts[p]`` slots per placeholder occurrence, EOS, then
    padding with the tokenizer's pad token; too long prompts are cut before EOS (slots past the
    cut are dropped). ``filler`` is the id written in the slots (default: the id of ``!``, below
    EOS so that legacy argmax pooling still finds EOS).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if filler is None:
        filler = tokenizer.convert_tokens_to_ids("!")
    all_ids, all_mask, all_slots = [], [], []
    for prompt in prompts:
        ids: list[int] = [bos]
        slots: list[tuple[int, str]] = []
        for text, is_placeholder in split_prompt(prompt, list(counts)):
            if is_placeholder:
                for _ in range(counts[text]):
                    slots.append((len(ids), text))
                    ids.append(filler)
            elif text.strip():
                ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        ids = ids[: max_length - 1] + [eos]
        slots = [(i, p) for i, p in slots if i < max_length - 1]
        mask = [1] * len(ids) + [0] * (max_length - len(ids))
        all_ids.append(ids + [pad] * (max_length - len(ids)))
        all_mask.append(mask)
        all_slots.append(slots)
    return torch.tensor(all_ids), torch.tensor(all_mask), all_slots


def splice_index(slots: list[list[tuple[int, str]]], device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, cols) of every learned slot of ``slots`` as index tensors on ``device`` (None: no slot);
    what :func:`spliced_embeddings` writes to, to be made once per prompt batch."""
    rows = [b for b, row_slots in enumerate(slots) for _ in row_slots]
    cols = [pos for row_slots in slots for pos, _ in row_slots]
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def spliced_embeddings(table: nn.Embedding, ids: torch.Tensor, slots: list[list[tuple[int, str]]],
                       learned: Mapping[str, torch.Tensor],
                       index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Input embeddings (B, T, W) of ``ids`` with the learned vectors written into their slots
    (``index``: :func:`splice_index` of ``slots`` on the table's device, made here when not given)."""
    emb = table(ids)
    vecs = []
    for row_slots in slots:
        seen: dict[str, int] = {}
        for _, p in row_slots:
            k = seen.get(p, 0)
            vec = learned[p]
            vecs.append(vec[k % vec.shape[0]])
            seen[p] = k + 1
    if not vecs:
        return emb
    if index is None:
        index = splice_index(slots, emb.device)
        assert index is not None
    emb = emb.clone()
    emb[index] = torch.stack(vecs).to(device=emb.device, dtype=emb.dtype)
    return emb


def encode_with_learned(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> Any:
    """``model(input_ids=ids, attention_mask=mask)`` with its token embeddings replaced by ``embeds``."""
    table = model.get_input_embeddings()

    def replace(_module: nn.Module, _inputs: Any, _output: torch.Tensor) -> torch.Tensor:
        return embeds

    handle = table.register_forward_hook(replace)
    try:
        return model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()


def word_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS/padding."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)
