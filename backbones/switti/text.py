"""Switti's text side: CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders (transformers ``CLIPTextModel``).

As the official ``SwittiPipeline``: both tokenisers pad to 77 tokens; the context is the two last
hidden states concatenated, (B, 77, 768 + 1280); the pooled vector is bigG's ``pooler_output``
(EOS token after the final LayerNorm, no projection), (B, 1280); the cross-attention mask is bigG's
attention mask. The unconditional text of CFG is the encoded empty prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstoolkit.backbone import HiddenEdit, apply_hidden_edit

from .. import clip_text
from ..scalewise import DeviceCache

HUB_CLIP_L = "openai/clip-vit-large-patch14"
HUB_CLIP_G = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
KEYS = ("clip_l", "clip_g")  # encoder keys of the learned-token interface

#: CLIPTextConfig arguments of the released encoders (random_weights builds them offline)
CLIP_L_CONFIG: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_G_CONFIG: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                     num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
TINY_CLIP_L: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   projection_dim=32, hidden_act="quick_gelu")
TINY_CLIP_G: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   projection_dim=64, hidden_act="gelu")


@dataclass
class TextConfig:
    """Where the two encoders come from: hub ids / folders, or CLIPTextConfig kwargs built from a seed."""

    clip_l: str | None = HUB_CLIP_L
    clip_g: str | None = HUB_CLIP_G
    clip_l_config: dict[str, Any] = field(default_factory=lambda: dict(CLIP_L_CONFIG))
    clip_g_config: dict[str, Any] = field(default_factory=lambda: dict(CLIP_G_CONFIG))
    max_length: int = 77

    @property
    def context_dim(self) -> int:
        return int(self.clip_l_config["hidden_size"]) + int(self.clip_g_config["hidden_size"])

    @property
    def pooled_dim(self) -> int:
        return int(self.clip_g_config["hidden_size"])


def _clip_config(kwargs: Mapping[str, Any], max_length: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=max_length, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **kwargs)


class DualCLIPText(nn.Module):
    """The two CLIP text encoders with their tokenizers; :meth:`forward` gives (context, mask, pooled)."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, tokenizer_l: Any, tokenizer_g: Any, max_length: int = 77):
        super().__init__()
        self.clip_l, self.clip_g = clip_l, clip_g
        self.tokenizer_l, self.tokenizer_g = tokenizer_l, tokenizer_g
        self.max_length = max_length
        self._ids_cache = DeviceCache(16)

    # ------------------------------------------------------------------ building
    @classmethod
    def random(cls, config_l: Mapping[str, Any], config_g: Mapping[str, Any], seed: int = 0,
               max_length: int = 77, device: torch.device | str = "cpu") -> "DualCLIPText":
        """Both encoders from CLIPTextConfig kwargs with random weights (seeded on the CPU, then moved;
        ``device="meta"`` allocates nothing) and tokenizers built offline."""
        from transformers import CLIPTextModel

        from ..sdxl import build_clip_tokenizer

        if str(device) == "meta":
            with torch.device("meta"):
                clip_l = CLIPTextModel(_clip_config(config_l, max_length))
                clip_g = CLIPTextModel(_clip_config(config_g, max_length))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip_l = CLIPTextModel(_clip_config(config_l, max_length)).to(device)
                clip_g = CLIPTextModel(_clip_config(config_g, max_length)).to(device)
        tok = build_clip_tokenizer("<|endoftext|>", max_length)
        return cls(clip_l.eval(), clip_g.eval(), tok, tok, max_length)

    @classmethod
    def from_pretrained(cls, clip_l: str, clip_g: str, *, dtype: torch.dtype = torch.float32,
                        max_length: int = 77) -> "DualCLIPText":
        """Both encoders (+ tokenizers) from hub ids or folders written by :meth:`save_pretrained`."""
        from transformers import CLIPTextModel, CLIPTokenizer

        models = []
        for source in (clip_l, clip_g):
            try:
                models.append(CLIPTextModel.from_pretrained(source, dtype=dtype))
            except TypeError:  # transformers < 4.56 names it torch_dtype
                models.append(CLIPTextModel.from_pretrained(source, torch_dtype=dtype))
        return cls(models[0].eval(), models[1].eval(), CLIPTokenizer.from_pretrained(clip_l),
                   CLIPTokenizer.from_pretrained(clip_g), max_length)

    def save_pretrained(self, folder_l: str | Path, folder_g: str | Path) -> None:
        parts = ((self.clip_l, self.tokenizer_l, folder_l), (self.clip_g, self.tokenizer_g, folder_g))
        for model, tok, folder in parts:
            model.save_pretrained(folder)
            tok.save_pretrained(folder)

    # ------------------------------------------------------------------ interface
    @property
    def widths(self) -> dict[str, int]:
        return {"clip_l": int(self.clip_l.config.hidden_size), "clip_g": int(self.clip_g.config.hidden_size)}

    @property
    def device(self) -> torch.device:
        return self.clip_l.get_input_embeddings().weight.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """bigG token ids and mask (B, 77) (both tokenisers give the same ids up to padding)."""
        tok = self.tokenizer_g(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                               return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, model, tok in (("clip_l", self.clip_l, self.tokenizer_l), ("clip_g", self.clip_g, self.tokenizer_g)):
            ids = torch.tensor(clip_text.word_ids(tok, text), dtype=torch.long, device=self.device)
            out[key] = model.get_input_embeddings()(ids).detach().float()
        return out

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per encoder, the pooled (EOS) last hidden state of each prompt (B, width), fp32."""
        out = {}
        for key, model, tok in (("clip_l", self.clip_l, self.tokenizer_l), ("clip_g", self.clip_g, self.tokenizer_g)):
            enc = tok(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                      return_tensors="pt")
            res = model(input_ids=enc.input_ids.to(self.device), attention_mask=enc.attention_mask.to(self.device))
            out[key] = res.pooler_output.float()
        return out

    def _learned_ids(self, key: str, tok: Any, prompts: Sequence[str], counts: Mapping[str, int]) -> tuple[Any, ...]:
        """(ids, mask, slots, splice index) of prompts with learned slots, on the encoders' device; tokenised
        once per (encoder, prompts, slot counts): a training step repeats its prompts, and makes no
        tokenizer call and no host-to-device copy for them."""
        dev = self.device
        cache_key = (key, tuple(prompts), tuple(sorted(counts.items())), self.max_length, str(dev))

        def build() -> tuple[Any, ...]:
            ids, mask, slots = clip_text.tokenize_with_learned(tok, prompts, counts, self.max_length)
            return ids.to(dev), mask.to(dev), slots, clip_text.splice_index(slots, dev)

        return self._ids_cache.get(cache_key, build)

    def forward(self, prompts: Sequence[str], learned: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                input_embeds: Mapping[str, torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
                hidden_edit: HiddenEdit | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context (B, 77, Cl + Cg), mask (B, 77) bool, pooled (B, Cg)), fp32.

        ``learned`` (placeholder -> {"clip_l": (n, Cl), "clip_g": (n, Cg)}) splices vectors into
        the input embeddings; ``input_embeds`` ({"clip_l": (B, 77, Cl), "clip_g": ...}) replaces
        them entirely (``prompts`` then only gives the token ids, for EOS pooling). Gradients flow
        into either; call under ``torch.no_grad()`` for plain prompts. ``hidden_edit`` (with ``learned``)
        rewrites each encoder's last hidden state at the placeholders' slots; the pooled vector is
        taken before the edit (official CSD-VAR ``models/clip.py``).
        """
        dev = self.device
        if learned:
            counts = {p: int(next(iter(v.values())).shape[0]) for p, v in learned.items()}
        outs, hiddens = [], []
        mask_g = None
        for key, model, tok in (("clip_l", self.clip_l, self.tokenizer_l), ("clip_g", self.clip_g, self.tokenizer_g)):
            if learned:
                ids, mask, slots, index = self._learned_ids(key, tok, prompts, counts)
                table = model.get_input_embeddings()
                emb = clip_text.spliced_embeddings(table, ids, slots, {p: v[key] for p, v in learned.items()}, index)
                out = clip_text.encode_with_learned(model, ids, mask, emb)
                hidden = out.last_hidden_state.float()
                hiddens.append(apply_hidden_edit(hidden, slots, key, hidden_edit) if hidden_edit else hidden)
            else:
                enc = tok(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                          return_tensors="pt")
                ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
                if attention_mask is not None:
                    mask = attention_mask.to(dev).long()
                if input_embeds is not None:
                    emb = input_embeds[key].to(device=dev, dtype=model.get_input_embeddings().weight.dtype)
                    out = clip_text.encode_with_learned(model, ids, mask, emb)
                else:
                    out = model(input_ids=ids, attention_mask=mask)
                hiddens.append(out.last_hidden_state.float())
            outs.append(out)
            mask_g = mask
        context = torch.cat(hiddens, dim=-1)
        return context, mask_g.bool(), outs[1].pooler_output.float()
