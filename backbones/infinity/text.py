"""Text encoder of Infinity: the encoder of flan-t5-xl (2048-d tokens), or a tiny seeded T5.

Prompts are tokenised to at most 512 tokens and padded to the longest in the batch (T5 features of
real tokens do not depend on the padding); the mask travels with the features. Token embeddings
can be given instead of prompts (textual inversion backpropagates into them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..scalewise import DeviceCache

#: google/flan-t5-xl's encoder shape (config.json of the hub repo): 24 layers, 2048 wide, 32 heads
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
TINY_T5 = dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32)


class T5TextEncoder(nn.Module):
    """A T5 encoder with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 512):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._plans = DeviceCache(16)  # tokenised prompts of embed_with_learned

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def tiny(cls, seed: int = 0, max_length: int = 64) -> "T5TextEncoder":
        """A 2-layer T5 with a byte-level tokenizer (no files), initialised from ``seed``."""
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(T5Config(**TINY_T5))
        return cls(model.eval(), ByT5Tokenizer(), max_length)

    @classmethod
    def random(cls, config: Mapping[str, Any], seed: int = 0, max_length: int = 512, *,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "T5TextEncoder":
        """A T5 encoder of ``config``'s shape (e.g. :data:`FLAN_T5_XL`) with random weights from ``seed``,
        reading no files; built directly on ``device`` (``meta`` allocates nothing).

        The tokenizer is ByT5's byte-level one (no vocabulary file): a prompt gives one token per
        UTF-8 byte (ids < 384 of the 32128-row table), about 4x the tokens of flan-t5-xl's
        SentencePiece vocabulary. For speed and memory benchmarks of the real path; images are noise.
        """
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        device = torch.device(device)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.device(device):
            torch.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            model = T5EncoderModel(T5Config(**config))
        return cls(model.to(dtype).eval(), ByT5Tokenizer(), max_length)

    @classmethod
    def from_pretrained(cls, source: str, *, dtype: torch.dtype = torch.float32, max_length: int = 512,
                        ) -> "T5TextEncoder":
        """flan-t5-xl (or any T5) from a hub id or a local folder (tokenizer files included)."""
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            model = T5EncoderModel.from_pretrained(source, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = T5EncoderModel.from_pretrained(source, torch_dtype=dtype)
        return cls(model.eval(), tokenizer, max_length)

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(prompts), max_length=self.max_length, padding="longest", truncation=True,
                             return_tensors="pt")
        dev = self.model.get_input_embeddings().weight.device
        return tok.input_ids.to(dev), tok.attention_mask.to(dev)

    def word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (no ``</s>``)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def embed_with_learned(self, prompts: Sequence[str], learned: Mapping[str, torch.Tensor],
                           slots: list[list[tuple[int, str]]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (B, T, width) and mask (B, T) of ``prompts`` where every occurrence of a
        placeholder (a key of ``learned``) is its vectors (n, width); the rest is tokenised as usual,
        ``</s>`` appended, padded to the longest row. Gradients flow into the learned vectors.
        A ``slots`` list receives, per prompt, the (position, placeholder) of every learned vector."""
        table = self.model.get_input_embeddings()
        dev = table.weight.device
        counts = tuple(sorted((k, int(v.shape[0])) for k, v in learned.items()))
        plan = self._plans.get((tuple(prompts), counts, str(dev)), lambda: self._plan(prompts, dict(counts), dev))
        rows: list[torch.Tensor] = []
        for parts_plan, row_slots in plan:
            parts = [learned[part].to(dev).float() if isinstance(part, str) else table(part).float()
                     for part in parts_plan]
            rows.append(torch.cat(parts)[: self.max_length])
            if slots is not None:
                slots.append(list(row_slots))
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[-1], device=dev)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return embeds, mask

    def _plan(self, prompts: Sequence[str], counts: Mapping[str, int], dev: torch.device,
              ) -> list[tuple[list[torch.Tensor | str], list[tuple[int, str]]]]:
        """Per prompt: its pieces in order (token ids on ``dev``, or a placeholder's name) and the
        (position, placeholder) of every learned vector; tokenised once per prompts (cached by the caller)."""
        eos = self.tokenizer.eos_token_id
        pattern = re.compile("|".join(re.escape(k) for k in sorted(counts, key=len, reverse=True)))
        out: list[tuple[list[torch.Tensor | str], list[tuple[int, str]]]] = []
        for prompt in prompts:
            parts: list[torch.Tensor | str] = []
            row_slots: list[tuple[int, str]] = []
            pos = length = 0
            for match in [*pattern.finditer(prompt), None]:
                segment = prompt[pos:match.start()] if match is not None else prompt[pos:]
                ids = self.word_ids(segment) if segment.strip() else []
                if match is None:
                    ids = ids + [eos]
                if ids:
                    parts.append(torch.tensor(ids, device=dev))
                    length += len(ids)
                if match is not None:
                    n = counts[match.group(0)]
                    row_slots += [(length + i, match.group(0)) for i in range(n)]
                    parts.append(match.group(0))
                    length += n
                    pos = match.end()
            out.append((parts, [(i, ph) for i, ph in row_slots if i < self.max_length]))
        return out

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Masked mean of the last hidden states of each prompt (B, width), fp32."""
        ids, mask = self.tokenize(prompts)
        hidden = self.forward(input_ids=ids, attention_mask=mask)
        m = mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, width) in fp32."""
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.to(self.model.get_input_embeddings().weight.dtype)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return out.last_hidden_state.float()
