"""Text encoder of Infinity: the encoder of flan-t5-xl (2048-d tokens), or a tiny seeded T5.

Prompts are tokenised to at most 512 tokens and padded to the longest in the batch (T5 features of
real tokens do not depend on the padding); the mask travels with the features. Token embeddings
can be given instead of prompts (textual inversion backpropagates into them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY_T5 = dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32)


class T5TextEncoder(nn.Module):
    """A T5 encoder with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 512):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

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

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, width) in fp32."""
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.to(self.model.get_input_embeddings().weight.dtype)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return out.last_hidden_state.float()
