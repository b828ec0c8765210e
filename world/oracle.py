"""Oracle classifiers of the world: a content CNN and a style CNN (small, 64 px input).

Classes: the content head names every world content (``ALL_CONTENTS``: the 10 known ones and the 3
novel ones) or *rejects* the image ("no object"); the style head names every style (``ALL_STYLES``) or
rejects it ("no style"). Trained on renders of :func:`oracle_pairs` (every pair but the held-out ones
and the bench's novel pairs) and on non-objects (:func:`non_objects`): noise at several scales, smooth
colour fields, blank images, bare grounds (content and style rejected), patch-shuffled renders, bare
style textures and random smooth blobs in a style (content rejected, style kept). Augmentations mimic
imperfect generated images (blur, noise, colour gain, down/up-sampling, small shifts). Evaluated on renders
of the held-out pairs, of the novel pairs and on fresh non-objects; each head is also checked for invariance
to the other factor.

Shipped as fp16 safetensors in ``world/weights/oracle.safetensors`` with its measured report in
``oracle.json``; :func:`load_oracle` builds the model from them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from cstoolkit.errors import UserError

from .generator import (
    ALL_CONTENTS,
    ALL_STYLES,
    CONTENTS,
    HELD_OUT,
    NOVEL_HELD_OUT,
    STYLES,
    content_mask,
    draw_parts,
    render_array,
    style_array,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INPUT_SIZE = 64
#: class index of "no object" (content head) and "no style" (style head): one past the named classes
CONTENT_REJECT = len(ALL_CONTENTS)
STYLE_REJECT = len(ALL_STYLES)


def oracle_pairs() -> tuple[tuple[str, str], ...]:
    """The pairs the oracles train on: every (content, style) of ``ALL_CONTENTS`` x ``ALL_STYLES`` except
    ``HELD_OUT`` and the bench's novel pairs (``NOVEL_HELD_OUT``), which stay unseen for evaluation."""
    held = set(HELD_OUT) | {p for pairs in NOVEL_HELD_OUT.values() for p in pairs}
    return tuple((c, s) for c in ALL_CONTENTS for s in ALL_STYLES if (c, s) not in held)


class OracleNet(nn.Module):
    """A small CNN: 4 conv blocks (stride 2, 2, 2, 1) -> global mean+max pool -> linear.

    ``features`` is the pooled vector (2 * width[-1]); the content net's features define the bench's
    identity score.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 64)):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(3, w0, 5, stride=2, padding=2), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),  # (B, w0, 32, 32)
            nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),  # (B, w1, 16, 16)
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),  # (B, w2, 8, 8)
            nn.Conv2d(w2, w3, 3, stride=1, padding=1), nn.BatchNorm2d(w3), nn.ReLU(inplace=True),  # (B, w3, 8, 8)
        )
        self.head = nn.Linear(2 * w3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, 2 * w3) pooled features."""
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WorldOracle(nn.Module):
    """Content and style oracles. Inputs: PIL images, or a tensor (B, 3, H, W) in [-1, 1] (any H, W).

    ``num_contents`` / ``num_styles``: output classes; the default is every world concept plus the
    reject class. (10, 10), the first oracle's shape (known concepts only, no reject class), still
    loads: ``load_oracle`` reads the shape from the weights.
    """

    def __init__(self, num_contents: int = CONTENT_REJECT + 1, num_styles: int = STYLE_REJECT + 1):
        super().__init__()
        self.content = OracleNet(num_contents)
        self.style = OracleNet(num_styles)
        self.content_names: list[str | None] = _names(ALL_CONTENTS, num_contents)
        self.style_names: list[str | None] = _names(ALL_STYLES, num_styles)

    @staticmethod
    def preprocess(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images or a [-1, 1] tensor -> float32 (B, 3, 64, 64) in [-1, 1] (bilinear, antialiased)."""
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.dim() == 3:
                x = x[None]
        else:
            arrs = []
            for im in images:
                im = im.convert("RGB")
                if im.size != (INPUT_SIZE, INPUT_SIZE):
                    im = im.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR, reducing_gap=None)
                arrs.append(np.asarray(im, np.float32) / 127.5 - 1)
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) if arrs else torch.zeros(0, 3, 64, 64)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities and content features: ``content_probs`` (B, 10), ``style_probs``
        (B, 10), ``content_features`` (B, F)."""
        x = self.preprocess(images)
        dev = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {"content_probs": [], "style_probs": [], "content_features": []}
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            f = self.content.features(xb)
            out["content_probs"].append(self.content.head(f).softmax(-1).cpu())
            out["content_features"].append(f.cpu())
            out["style_probs"].append(self.style(xb).softmax(-1).cpu())
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}

    def classify(self, images: Sequence[Image.Image] | torch.Tensor) -> list[dict]:
        """One dict per image: ``content``, ``content_prob``, ``style``, ``style_prob`` (names as in
        recipes), ``rejected`` and ``style_rejected``. A rejected image ("no object") has ``content``
        None and ``rejected`` True (its style verdict stands); an image without a style (noise, blank,
        a smooth colour field) has ``style`` None and ``style_rejected`` True. ``*_prob`` is the
        probability of the verdict (of the reject class where rejected)."""
        p = self.predict(images)
        res = []
        for cp, sp in zip(p["content_probs"], p["style_probs"]):
            ci, si = int(cp.argmax()), int(sp.argmax())
            res.append({"content": self.content_names[ci], "content_prob": round(float(cp[ci]), 4),
                        "style": self.style_names[si], "style_prob": round(float(sp[si]), 4),
                        "rejected": self.content_names[ci] is None, "style_rejected": self.style_names[si] is None})
        return res


def _names(concepts: Sequence[str], num_classes: int) -> list[str | None]:
    """Class names of a head with ``num_classes`` outputs: the first concepts, then None (reject) if
    the head has one more class than there are concepts."""
    if num_classes == len(concepts) + 1:
        return [*concepts, None]
    if num_classes > len(concepts):
        raise ValueError(f"an oracle head with {num_classes} classes; expected at most {len(concepts) + 1}")
    return list(concepts[:num_classes])


_CACHE: dict[str, WorldOracle] = {}


def load_oracle(weights_dir: str | Path | None = None, device: str | torch.device = "cpu") -> WorldOracle:
    """Build the oracles from ``oracle.safetensors`` (default: the shipped weights), in eval mode, fp32."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    key = f"{d.resolve()}|{device}"
    if key in _CACHE:
        return _CACHE[key]
    f = d / "oracle.safetensors"
    if not f.is_file():
        raise UserError("oracle", f"no weights at {f}", "expected the shipped world/weights/oracle.safetensors "
                        "(or train them: cstoolkit world train-oracle)")
    state = load_file(str(f))
    shape = [state.get(f"{h}.head.weight") for h in ("content", "style")]
    if any(w is None or w.dim() != 2 for w in shape):
        raise UserError("oracle", f"{f} does not match the oracle architecture",
                        "expected weights written by cstoolkit world train-oracle")
    try:
        model = WorldOracle(int(shape[0].shape[0]), int(shape[1].shape[0]))
    except ValueError as exc:
        raise UserError("oracle", f"{f}: {exc}", "expected weights written by cstoolkit world train-oracle") from None
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UserError("oracle", f"{f} does not match the oracle architecture",
                        "expected weights written by cstoolkit world train-oracle")
    model.eval().to(device)
    _CACHE[key] = model
    return model


def classify(images: Sequence[Image.Image] | torch.Tensor) -> list[dict]:
    """Classify images with the shipped oracles (see :meth:`WorldOracle.classify`)."""
    return load_oracle().classify(images)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class OracleTrainConfig:
    """Training of the oracles (CPU-sized: about a quarter of an hour on one core)."""

    steps: int = 1600
    batch_size: int = 64  # renders of objects per step
    negatives: int = 32  # non-objects per step (:func:`non_objects`, every kind alike)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pool_per_pair: int = 60  # pre-rendered images per training pair (re-augmented every step)
    textures_per_style: int = 60  # pre-rendered bare textures and grounds per style
    blobs_per_style: int = 60  # pre-rendered blobs per style and blob kind (:data:`BLOB_KINDS`)
    eval_per_pair: int = 20  # renders per pair for evaluation (fresh seeds)
    eval_per_kind: int = 200  # non-objects per kind for evaluation (fresh seeds)
    seed: int = 0


def _to_input(a: np.ndarray) -> np.ndarray:
    """A float RGB array in [0, 1] of any size -> 64 px (bilinear, as :meth:`WorldOracle.preprocess`)."""
    if a.shape[0] == INPUT_SIZE:
        return a
    im = Image.fromarray((a * 255).astype(np.uint8)).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR,
                                                             reducing_gap=None)
    return np.asarray(im, np.float32) / 255


def _stack(arrs: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()


def _render_pool(pairs: Sequence[tuple[str, str]], per_pair: int, seed0: int,
                 sizes: Sequence[int] = (64, 64, 96, 128)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render ``per_pair`` images of each pair at mixed sizes, resized to 64 px: (x, content ids, style ids)
    (ids index ``ALL_CONTENTS`` / ``ALL_STYLES``)."""
    from tqdm import tqdm

    xs, cs, ss = [], [], []
    for k, (c, s) in enumerate(tqdm(pairs, desc="render", leave=False)):
        for j in range(per_pair):
            seed = seed0 + k * 100_003 + j
            xs.append(_to_input(render_array(c, s, seed=seed, size=sizes[j % len(sizes)])))
            cs.append(ALL_CONTENTS.index(c))
            ss.append(ALL_STYLES.index(s))
    return _stack(xs), torch.tensor(cs), torch.tensor(ss)


#: kinds of non-objects; the content head rejects all of them, the style head the STYLELESS ones and
#: names the style of the others (a bare texture or a shuffled render still shows its style)
NON_OBJECT_KINDS = ("noise", "noise 32 px", "noise 16 px", "smooth field", "blank", "ground", "shuffled 8 px",
                    "shuffled 16 px", "texture", "blob")
#: the kinds drawn from a pre-rendered pool of styled blob masks (:func:`blob_mask`)
BLOB_KINDS = ("blob",)
STYLELESS = ("noise", "noise 32 px", "noise 16 px", "smooth field", "blank", "ground")


def _texture_pool(per_style: int, seed0: int, bare: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every style over the whole frame (``bare`` False: the texture) or over nothing (True: the ground)."""
    xs, ss = [], []
    for k, s in enumerate(ALL_STYLES):
        for j in range(per_style):
            size = (64, 96, 128)[j % 3]
            seed = seed0 + 7919 * k + j
            mask = np.full((size, size), 0.0 if bare else 1.0, np.float32)
            xs.append(_to_input(style_array(mask, s, seed=seed)))
            ss.append(k)
    return _stack(xs), torch.tensor(ss)


def _shuffle_tiles(x: torch.Tensor, tile: int, g: torch.Generator) -> torch.Tensor:
    """Cut each (3, 64, 64) image into ``tile`` px tiles and put them back in a random order."""
    b, c, h, w = x.shape
    n = h // tile
    t = x.reshape(b, c, n, tile, n, tile).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, tile, tile)
    perm = torch.stack([torch.randperm(n * n, generator=g) for _ in range(b)])
    t = torch.gather(t, 1, perm[:, :, None, None, None].expand_as(t))
    return t.reshape(b, n, n, c, tile, tile).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------
# Blobs: smooth irregular closed shapes that are none of the world's contents (what a failed method
# draws), rendered in the world's styles by the generator's own ``style_array``. (Melted contents, a real
# mask blurred and warped, were tried and dropped: docs/world.md.)
# ----------------------------------------------------------------------------------------------
#: shape-bank resolution and size (masks of every content over poses and instances) for the "is it a
#: known shape?" check of a blob
_BANK_SIZE = 32
_BANK_PER_CONTENT = 40
#: a blob whose mask overlaps some real content mask of the bank (IoU) above this is dropped; set below
#: the median best IoU of a fresh real mask with its own class in the bank (0.71; docs/world.md)
BLOB_MAX_IOU = 0.65
_BANK: list[torch.Tensor] = []


def _shape_bank() -> torch.Tensor:
    """(13 * 40, 32 * 32) bool masks of every content (instances and poses from seeds 0..39), cached."""
    if not _BANK:
        ms = [content_mask(c, seed=900_000 + j, size=_BANK_SIZE) > 0.5 for c in ALL_CONTENTS
              for j in range(_BANK_PER_CONTENT)]
        _BANK.append(torch.from_numpy(np.stack(ms)).reshape(len(ms), -1))
    return _BANK[0]


def shape_iou(mask: np.ndarray) -> tuple[float, str]:
    """The best IoU of ``mask`` (H, W) in [0, 1] with a real content mask of the bank, and that content."""
    m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize((_BANK_SIZE, _BANK_SIZE), Image.BOX)
    v = torch.from_numpy(np.asarray(m) > 127).reshape(1, -1)
    bank = _shape_bank()
    inter = (bank & v).sum(1).float()
    union = (bank | v).sum(1).float().clamp_min(1)
    iou = inter / union
    k = int(iou.argmax())
    return float(iou[k]), ALL_CONTENTS[k // _BANK_PER_CONTENT]


def _warp(mask: np.ndarray, rng: np.random.Generator, strength: float, cells: int = 4) -> np.ndarray:
    """``mask`` displaced by a smooth random field (``cells`` x ``cells`` control points, bicubic) of about
    ``strength`` x the frame."""
    s = mask.shape[0]
    d = torch.from_numpy(rng.normal(0, strength, (1, 2, cells, cells)).astype(np.float32))
    d = F.interpolate(d, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, s)
    base = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)[None]
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    out = F.grid_sample(m, base + 2 * d, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def _soften(mask: np.ndarray, radius: float, level: float) -> np.ndarray:
    """Blur by ``radius`` px and re-threshold at ``level`` (an edge of about one pixel, like a render's)."""
    im = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    b = np.asarray(im, np.float32) / 255
    return np.clip((b - level) * 2.5 * radius + 0.5, 0, 1).astype(np.float32)


def _recentre(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move the mask's bounding box to the frame's centre +-8 % (as a content's pose), zeros shifted in."""
    s = mask.shape[0]
    ys, xs = np.nonzero(mask > 0.5)
    if not len(ys):
        return mask
    dy, dx = (np.round((0.5 + rng.uniform(-0.08, 0.08, 2)) * s - [(ys.min() + ys.max()) / 2,
                                                                  (xs.min() + xs.max()) / 2])).astype(int)
    out = np.zeros_like(mask)
    src = mask[max(0, -dy):s - max(0, dy), max(0, -dx):s - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _raw_blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """One candidate blob mask: a radius with random low harmonics, a union of 2-4 ellipses or a soft
    random polygon, posed like a content (scale 0.55-0.95 of the frame, centre +-8 %), then warped."""
    kind = int(rng.integers(3))
    if kind == 0:  # r(t) = 1 + sum_k a_k cos(k t + p_k), k = 2..5, strong enough not to be a disc
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        amp = rng.uniform(0, 0.3, 4)
        amp *= max(1.0, 0.35 / amp.sum())
        rad = 1 + sum(a * np.cos((k + 2) * t + rng.uniform(0, 2 * math.pi)) for k, a in enumerate(amp))
        rad = np.clip(rad, 0.25, None) / rad.max()
        pts = np.stack([rad * np.cos(t) * rng.uniform(0.6, 1.0), rad * np.sin(t)], 1)
        parts = [("poly", pts, 1)]
    elif kind == 1:  # 2-4 overlapping ellipses
        parts = []
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(-0.45, 0.45, 2)
            rx, ry = rng.uniform(0.25, 0.55, 2)
            th = rng.uniform(0, math.pi)
            e = np.stack([rx * np.cos(u := np.linspace(0, 2 * math.pi, 40, endpoint=False)), ry * np.sin(u)], 1)
            rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            parts.append(("poly", e @ rot.T + [cx, cy], 1))
    else:  # a random star-shaped polygon of 5-11 vertices, softened below
        n = int(rng.integers(5, 12))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = rng.uniform(0.45, 1.0, n)
        parts = [("poly", np.stack([rad * np.cos(t), rad * np.sin(t)], 1), 1)]
    scale = rng.uniform(0.55, 0.95) / 2
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08, 2)
    m = draw_parts(parts, rng.uniform(0, 360), scale, cx, cy, size)
    if kind == 2:
        m = _soften(m, size * rng.uniform(0.03, 0.07), rng.uniform(0.35, 0.55))
    if rng.random() < 0.6:
        m = _warp(m, rng, rng.uniform(0.02, 0.06))
    return _recentre(m, rng)


def blob_mask(kind: str, seed: int, size: int = 64, max_tries: int = 50) -> np.ndarray:
    """A non-object mask (H, W) in [0, 1] of ``kind`` "blob": a random smooth closed shape (:func:`_raw_blob`).

    Candidates that cover too little or too much of the frame, leave it, or whose best IoU with a real
    content mask (:func:`shape_iou`) exceeds ``BLOB_MAX_IOU`` are redrawn: the label "no object" must be
    true. Deterministic from ``seed`` and ``size``.
    """
    if kind != "blob":
        raise ValueError(f"blob kind {kind!r}; expected one of {BLOB_KINDS}")
    rng = np.random.default_rng([seed, 0])
    for _ in range(max_tries):
        m = _raw_blob(rng, size)
        cover, border = float(m.mean()), float(np.concatenate([m[:2].ravel(), m[-2:].ravel(), m[:, :2].ravel(),
                                                                     m[:, -2:].ravel()]).mean())
        if not 0.08 <= cover <= 0.6 or border > 0.03:  # an object's size, inside the frame
            continue
        if shape_iou(m)[0] > BLOB_MAX_IOU:
            continue
        return m
    raise RuntimeError(f"no {kind} mask in {max_tries} tries (seed {seed})")


def _blob_pool(kind: str, per_style: int, seed0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_style`` blobs of ``kind`` in every style (``style_array``), mixed sizes, resized to 64 px."""
    xs, ss = [], []
    for k, s in enumerate(ALL_STYLES):
        for j in range(per_style):
            seed = seed0 + 7919 * k + j
            m = blob_mask(kind, seed, size=(64, 96, 128)[j % 3])
            xs.append(_to_input(style_array(m, s, seed=seed)))
            ss.append(k)
    return _stack(xs), torch.tensor(ss)


def non_objects(kind: str, n: int, g: torch.Generator, renders: tuple[torch.Tensor, torch.Tensor] | None = None,
                textures: tuple[torch.Tensor, torch.Tensor] | None = None,
                grounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                blobs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a non-object ``kind`` (``NON_OBJECT_KINDS``) in [-1, 1], 64 px, and their style
    labels (``STYLE_REJECT`` for the styleless kinds).

    noise: per-pixel noise (uniform colour, grey, or around a random colour); noise 32/16 px: the
    same at 32 or 16 px, upsampled (nearest or bilinear); smooth field: 2-8 px random colours upsampled
    (bilinear or bicubic); blank: one colour, with faint noise or none; ground: a style with an empty
    mask (``grounds``); shuffled 8/16 px: ``renders`` (x, style ids) patch-shuffled; texture: a style
    over the whole frame (``textures``); blob: a random smooth shape in a style (``blobs[kind]``,
    :func:`blob_mask`), style kept.
    """
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    rej = torch.full((n,), STYLE_REJECT, dtype=torch.long)

    def pick(pool: tuple[torch.Tensor, torch.Tensor] | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if pool is None:
            raise ValueError(f"non_objects({kind!r}) needs {what}")
        idx = torch.randint(0, len(pool[0]), (n,), generator=g)
        return pool[0][idx], pool[1][idx]

    if kind.startswith("noise"):
        side = {"noise": INPUT_SIZE, "noise 32 px": 32, "noise 16 px": 16}[kind]
        mode = int(r(1).item() * 3)
        if mode == 0:
            z = r(n, 3, side, side) * 2 - 1
        elif mode == 1:
            z = (r(n, 1, side, side) * 2 - 1).expand(n, 3, side, side)
        else:
            z = (r(n, 3, 1, 1) * 2 - 1) + (r(n, 1, 1, 1) * 0.6) * torch.randn(n, 3, side, side, generator=g)
        if side != INPUT_SIZE:
            z = F.interpolate(z, size=(INPUT_SIZE, INPUT_SIZE), mode="nearest" if r(1).item() < 0.5 else "bilinear")
        return z.clamp(-1, 1), rej
    if kind == "smooth field":
        side = int(2 + r(1).item() * 7)
        z = r(n, 3, side, side) * 2 - 1
        z = F.interpolate(z, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic" if r(1).item() < 0.5 else "bilinear",
                          align_corners=False)
        return z.clamp(-1, 1), rej
    if kind == "blank":
        z = (r(n, 3, 1, 1) * 2 - 1).expand(n, 3, INPUT_SIZE, INPUT_SIZE)
        z = z + (r(n, 1, 1, 1) < 0.5) * 0.03 * torch.randn(n, 3, INPUT_SIZE, INPUT_SIZE, generator=g)
        return z.clamp(-1, 1), rej
    if kind == "ground":
        return pick(grounds, "grounds")[0], rej
    if kind.startswith("shuffled"):
        x, s = pick(renders, "renders")
        return _shuffle_tiles(x, 8 if kind == "shuffled 8 px" else 16, g), s
    if kind == "texture":
        return pick(textures, "textures")
    if kind in BLOB_KINDS:
        return pick((blobs or {}).get(kind), f"blobs[{kind!r}]")
    raise ValueError(f"non-object kind {kind!r}; expected one of {NON_OBJECT_KINDS}")


def decolour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Content-only augmentation: random channel order, grayscale, inversion (the palette belongs to
    the style, so the content head must not lean on it)."""
    b = x.shape[0]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])  # (B, 3)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = x.mean(1, keepdim=True).expand_as(x)
    x = torch.where((torch.rand(b, generator=g) < 0.3)[:, None, None, None], gray, x)
    return torch.where((torch.rand(b, generator=g) < 0.3)[:, None, None, None], -x, x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Imperfections of generated images: shift, down/up-sampling, blur, colour gain/offset, noise."""
    b = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    # random shift up to 4 px (reflect) and horizontal flip
    pad = 4
    xp = F.pad(x, (pad,) * 4, mode="replicate")
    ox, oy = (r(2) * 2 * pad).long().tolist()
    x = xp[:, :, oy:oy + INPUT_SIZE, ox:ox + INPUT_SIZE]
    flip = r(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # down/up-sampling for half the batch
    lo = int(16 + r(1).item() * 40)
    small = F.interpolate(x, size=(lo, lo), mode="bilinear", antialias=True, align_corners=False)
    small = F.interpolate(small, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    x = torch.where((r(b) < 0.3)[:, None, None, None], small, x)
    # gaussian blur sigma in [0, 1.2] for half the batch
    sigma = 0.3 + r(1).item() * 0.9
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k**2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    bl = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    bl = F.conv2d(F.pad(bl, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)
    x = torch.where((r(b) < 0.5)[:, None, None, None], bl, x)
    # colour: per-channel gain and offset, contrast
    gain = 1 + (r(b, 3, 1, 1) - 0.5) * 0.2
    off = (r(b, 3, 1, 1) - 0.5) * 0.16
    con = 1 + (r(b, 1, 1, 1) - 0.5) * 0.3
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * con + mean
    x = x * gain + off
    # noise
    std = r(b, 1, 1, 1) * 0.12
    x = x + torch.randn(x.shape, generator=g) * std
    return x.clamp(-1, 1)


def _acc(pred: torch.Tensor, want: torch.Tensor) -> float:
    return round(float((pred == want).float().mean()), 4) if len(want) else float("nan")


@torch.no_grad()
def evaluate(model: WorldOracle, per_pair: int = 20, per_kind: int = 200, seed0: int = 10_000_000) -> dict:
    """Accuracy on held-out pairs, on the novel pairs, on all pairs per style (content head) and per
    content (style head), rejection of non-objects per kind, and the content head's consistency
    across styles for one object instance. A rejected render counts as wrong."""
    model.eval()
    all_pairs = [(c, s) for c in ALL_CONTENTS for s in ALL_STYLES]
    x, ci, si = _render_pool(all_pairs, per_pair, seed0, sizes=(64, 128))
    p = model.predict(x)
    cpred, spred = p["content_probs"].argmax(-1), p["style_probs"].argmax(-1)
    names = [(ALL_CONTENTS[int(a)], ALL_STYLES[int(b)]) for a, b in zip(ci, si)]
    held = torch.tensor([n in set(HELD_OUT) for n in names])
    known = torch.tensor([c in CONTENTS and s in STYLES for c, s in names])
    rep: dict = {
        "held_out_content_acc": _acc(cpred[held], ci[held]),
        "held_out_style_acc": _acc(spred[held], si[held]),
        "known_content_acc": _acc(cpred[known], ci[known]),
        "known_style_acc": _acc(spred[known], si[known]),
        "all_content_acc": _acc(cpred, ci),
        "all_style_acc": _acc(spred, si),
        "rejected_renders": round(float((cpred == model.content.head.out_features - 1).float().mean()), 4),
    }
    for kind, pairs in NOVEL_HELD_OUT.items():
        m = torch.tensor([n in set(pairs) for n in names])
        rep[f"{kind}_content_acc"] = _acc(cpred[m], ci[m])
        rep[f"{kind}_style_acc"] = _acc(spred[m], si[m])
    rep["content_acc_per_style"] = {s: _acc(cpred[si == j], ci[si == j]) for j, s in enumerate(ALL_STYLES)}
    rep["style_acc_per_content"] = {c: _acc(spred[ci == j], si[ci == j]) for j, c in enumerate(ALL_CONTENTS)}
    rep.update(eval_images=len(x), held_out_images=int(held.sum()))
    # imperfect images: the held-out renders augmented as in training
    g = torch.Generator().manual_seed(seed0)
    pa = model.predict(augment(x[held], g))
    rep["held_out_augmented_content_acc"] = _acc(pa["content_probs"].argmax(-1), ci[held])
    rep["held_out_augmented_style_acc"] = _acc(pa["style_probs"].argmax(-1), si[held])
    # non-objects (fresh seeds): share rejected by the content head; style head: share rejected for the
    # styleless kinds, share right for bare textures and shuffled renders
    rep["non_objects"] = evaluate_non_objects(model, per_kind, seed0 + 1)
    # invariance: one object instance (same instance and pose seed) in every style -> one content answer
    agree = 0
    n_inst = 5
    for c in ALL_CONTENTS:
        for k in range(n_inst):
            arr = [render_array(c, s, seed=seed0 + 7 * k + 1, size=INPUT_SIZE) for s in ALL_STYLES]
            pr = model.predict(_stack(arr))["content_probs"].argmax(-1)
            agree += int((pr == ALL_CONTENTS.index(c)).all())
    rep["content_invariance"] = agree / (len(ALL_CONTENTS) * n_inst)
    return rep


@torch.no_grad()
def evaluate_non_objects(model: WorldOracle, per_kind: int = 200, seed0: int = 20_000_000) -> dict:
    """Per non-object kind: ``content_rejected`` (share the content head rejects; with an oracle without
    a reject class: 0 and ``top_content``, its most frequent answer and share) and ``style_rejected``
    (styleless kinds) or ``style_acc`` (textures, shuffled renders). ``all`` pools every kind."""
    g = torch.Generator().manual_seed(seed0)
    renders = _render_pool([(c, s) for c in ALL_CONTENTS for s in ALL_STYLES], max(1, per_kind // 100 + 1),
                           seed0, sizes=(64, 128))
    renders = (renders[0], renders[2])
    textures = _texture_pool(max(1, per_kind // len(ALL_STYLES) + 1), seed0, bare=False)
    grounds = _texture_pool(max(1, per_kind // len(ALL_STYLES) + 1), seed0 + 1, bare=True)
    blobs = {k: _blob_pool(k, max(1, per_kind // len(ALL_STYLES) + 1), seed0 + 2 + j) for j, k in enumerate(BLOB_KINDS)}
    out: dict = {}
    rejected, total = 0, 0
    for kind in NON_OBJECT_KINDS:
        x, s = non_objects(kind, per_kind, g, renders, textures, grounds, blobs)
        p = model.predict(x)
        cp, sp = p["content_probs"].argmax(-1), p["style_probs"].argmax(-1)
        crej = torch.tensor([model.content_names[int(i)] is None for i in cp], dtype=torch.bool)
        top = int(cp.mode().values)
        row = {"content_rejected": round(float(crej.float().mean()), 4), "top_content": model.content_names[top],
               "top_content_share": round(float((cp == top).float().mean()), 4)}
        if kind in STYLELESS:
            srej = torch.tensor([model.style_names[int(i)] is None for i in sp], dtype=torch.bool)
            ts = int(sp.mode().values)
            row.update(style_rejected=round(float(srej.float().mean()), 4), top_style=model.style_names[ts],
                       top_style_share=round(float((sp == ts).float().mean()), 4))
        else:
            row["style_acc"] = _acc(sp, s)
        out[kind] = row
        rejected += int(crej.sum())
        total += len(cp)
    out["all"] = {"content_rejected": round(rejected / total, 4), "images": total}
    return out


def train_oracle(cfg: OracleTrainConfig | None = None, out_dir: str | Path | None = None) -> dict:
    """Train both oracles on :func:`oracle_pairs` and non-objects, evaluate, save fp16 safetensors +
    ``oracle.json``.

    Returns the report (accuracies, rejection rates, training time). ``out_dir`` defaults to the
    package's weights folder.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from cstoolkit.io import atomic_write

    cfg = cfg or OracleTrainConfig()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    x, ci, si = _render_pool(oracle_pairs(), cfg.pool_per_pair, cfg.seed * 1_000_000)
    textures = _texture_pool(cfg.textures_per_style, cfg.seed * 1_000_000 + 500_000, bare=False)
    grounds = _texture_pool(max(1, cfg.textures_per_style // 4), cfg.seed * 1_000_000 + 600_000, bare=True)
    blobs = {k: _blob_pool(k, cfg.blobs_per_style, cfg.seed * 1_000_000 + 700_000 + 50_000 * j)
             for j, k in enumerate(BLOB_KINDS)}
    t_render = time.time() - t0
    model = WorldOracle()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    per_kind = [cfg.negatives // len(NON_OBJECT_KINDS) + (k < cfg.negatives % len(NON_OBJECT_KINDS))
                for k in range(len(NON_OBJECT_KINDS))]
    bar = tqdm(range(cfg.steps), desc="oracle", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        xs, cs, ss = [x[idx]], [ci[idx]], [si[idx]]
        for kind, n in zip(NON_OBJECT_KINDS, per_kind):
            if n:
                xn, sn = non_objects(kind, n, g, (x, si), textures, grounds, blobs)
                xs.append(xn)
                cs.append(torch.full((n,), CONTENT_REJECT, dtype=torch.long))
                ss.append(sn)
        xb, cb, sb = augment(torch.cat(xs), g), torch.cat(cs), torch.cat(ss)
        loss = F.cross_entropy(model.content(decolour(xb, g)), cb) + F.cross_entropy(model.style(xb), sb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    t_train = time.time() - t0 - t_render
    report = evaluate(model, cfg.eval_per_pair, cfg.eval_per_kind)
    report.update({"train_seconds": round(t_train, 1), "render_seconds": round(t_render, 1),
                   "torch_threads": torch.get_num_threads(), "config": asdict(cfg),
                   "train_images": len(x), "train_pairs": len(oracle_pairs()),
                   "final_loss": round(float(loss.item()), 4)})
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    tmp = out / "oracle.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "oracle.safetensors")
    atomic_write(out / "oracle.json", lambda fh: fh.write(json.dumps(report, indent=2) + "\n"), mode="w")
    for f in ("oracle.safetensors", "oracle.json"):  # package data: readable by everyone
        (out / f).chmod(0o644)
    _CACHE.clear()
    if not math.isfinite(report["final_loss"]):  # pragma: no cover
        raise RuntimeError("oracle training diverged")
    return report
