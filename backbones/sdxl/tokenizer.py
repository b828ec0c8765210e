"""CLIP tokenizers of SD/SDXL built offline from open_clip's shipped BPE vocabulary (no download)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (as in OpenAI CLIP / open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` shipped with open_clip (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed: it ships the CLIP BPE vocabulary the tiny presets need")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49408-token CLIP vocabulary and its 48894 merges, identical to HF's vocab.json/merges.txt."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> "CLIPTokenizer":
    """transformers ``CLIPTokenizer`` of SD/SDXL, built offline from open_clip's BPE file.

    SDXL pads ``tokenizer`` with ``<|endoftext|>`` and ``tokenizer_2`` with ``!``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    try:  # transformers >= 5 builds it from the vocabulary and merges directly
        return CLIPTokenizer(
            vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
        )
    except TypeError:  # transformers 4.x wants files
        return _clip_tokenizer_from_files(pad_token, model_max_length)


def _clip_tokenizer_from_files(pad_token: str, model_max_length: int) -> "CLIPTokenizer":
    """Write HF's vocab.json + merges.txt to a temporary folder and load them with ``from_pretrained``."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="cstoolkit-clip-") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=model_max_length)
