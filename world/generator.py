"""A procedural world whose content and style are known by construction.

Every image is one *content* (a simple object drawn as a mask: star, house, fish, ...) rendered in one
*style* (a palette x a rendering: stripes, dots, checker, gradient, outline, hatching, mosaic, ...).

* Content identity: ``instance`` seeds the object's details (a star's number of points, a house's
  door and chimney, a fish's tail, ...); the same instance keeps its details in every style.
* Pose: ``seed`` jitters rotation (+-15 deg), scale (0.75-0.95 of the frame) and position (+-8 %).
* Style jitter: ``seed`` also jitters stripe phase/angle, dot spacing and colours a little, never
  enough to mix two styles.

Everything is deterministic from ``(content, style, seed, size, instance)`` and drawn with numpy/PIL
(about a millisecond per 64 px image on one core; see docs/world.md for the measured speed).

Names here are an API that other modules (oracles, backbone training, bench) import: keep them stable.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cstoolkit.errors import UserError

CONTENTS: tuple[str, ...] = (
    "star", "heart", "house", "tree", "fish", "cup", "moon", "flower", "mushroom", "boat",
)
STYLES: tuple[str, ...] = (
    "striped", "polka dot", "checkered", "gradient", "outline",
    "hatched", "mosaic", "neon", "watercolor", "pixel art",
)

#: Concepts no world backbone saw in training (never in ``CONTENTS``/``STYLES``, so never in
#: ``train_pairs()`` nor in world/train.py's captions): the oracles know them, the bench's ``novel_*``
#: item kinds ask a method to learn them from one image, as a user with a new subject or style would.
NOVEL_CONTENTS: tuple[str, ...] = ("kite", "key", "anchor")
NOVEL_STYLES: tuple[str, ...] = ("zigzag", "brick", "concentric")
#: every content / style the generator draws and the oracles name (known first, in their order)
ALL_CONTENTS: tuple[str, ...] = CONTENTS + NOVEL_CONTENTS
ALL_STYLES: tuple[str, ...] = STYLES + NOVEL_STYLES

# Held-out content-style pairs: every content and every style exactly once (a derangement-like shift
# by 3), never drawn by ``train_pairs()``.
HELD_OUT: tuple[tuple[str, str], ...] = tuple(
    (CONTENTS[i], STYLES[(i + 3) % len(STYLES)]) for i in range(len(CONTENTS))
)

CAPTION_KINDS = ("both", "content", "style")

#: The world bench's pairs with a novel concept, per item kind (never in the oracles' training either):
#: ``novel_content`` a novel content in each known style, ``novel_style`` each known content in a novel
#: style, ``novel_both`` a novel content in a novel style (a shift by one, like ``HELD_OUT``).
NOVEL_HELD_OUT: dict[str, tuple[tuple[str, str], ...]] = {
    "novel_content": tuple((NOVEL_CONTENTS[i % 3], STYLES[(3 * i + 1) % len(STYLES)]) for i in range(len(STYLES))),
    "novel_style": tuple((CONTENTS[i], NOVEL_STYLES[i % 3]) for i in range(len(CONTENTS))),
    "novel_both": tuple((NOVEL_CONTENTS[i], NOVEL_STYLES[(i + 1) % 3]) for i in range(3)),
}


def train_pairs() -> tuple[tuple[str, str], ...]:
    """All content-style pairs except ``HELD_OUT``, in (content, style) order."""
    held = set(HELD_OUT)
    return tuple((c, s) for c in CONTENTS for s in STYLES if (c, s) not in held)


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_content(content: str, where: str = "content") -> str:
    """Return ``content`` if it is a world content (known or novel), else raise a one-line ``UserError``."""
    if content not in ALL_CONTENTS:
        raise UserError(where, f"unknown content {content!r}{_did_you_mean(content, ALL_CONTENTS)}",
                        f"expected one of: {', '.join(ALL_CONTENTS)}")
    return content


def check_style(style: str, where: str = "style") -> str:
    """Return ``style`` if it is a world style (known or novel), else raise a one-line ``UserError``."""
    if style not in ALL_STYLES:
        raise UserError(where, f"unknown style {style!r}{_did_you_mean(style, ALL_STYLES)}",
                        f"expected one of: {', '.join(ALL_STYLES)}")
    return style


def caption(content: str | None, style: str | None, kind: str = "both") -> str:
    """Caption of a world image: ``a {content} in {style} style``, ``a {content}``, ``an image in {style} style``."""
    if kind == "both":
        return f"a {content} in {style} style"
    if kind == "content":
        return f"a {content}"
    if kind == "style":
        return f"an image in {style} style"
    raise ValueError(f"caption kind {kind!r}; expected one of {CAPTION_KINDS}")


def _rng(*parts: object) -> np.random.Generator:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


# ----------------------------------------------------------------------------------------------
# Contents: each returns a list of (kind, points, fill) drawn in order on a mask, coordinates in
# [-1, 1] (y down); kind "poly" (polygon) or "ellipse" (cx, cy, rx, ry as a polygon); fill 1 adds,
# 0 cuts a hole. ``r`` is the instance's generator (identity details).
# ----------------------------------------------------------------------------------------------
Part = tuple[str, np.ndarray, int]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _star(r: np.random.Generator) -> list[Part]:
    n = int(r.integers(5, 8))
    inner = r.uniform(0.38, 0.52)
    t = np.arange(2 * n) * math.pi / n - math.pi / 2
    rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    parts: list[Part] = [("poly", np.stack([rad * np.cos(t), rad * np.sin(t)], 1), 1)]
    if r.random() < 0.5:
        parts.append(("poly", _ellipse(0, 0, 0.14, 0.14), 0))
    return parts


def _heart(r: np.random.Generator) -> list[Part]:
    t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    w = r.uniform(0.85, 1.1)
    pts = np.stack([x / 17 * w, (y + 2) / 17], 1)
    parts: list[Part] = [("poly", pts, 1)]
    if r.random() < 0.5:  # a small heart-shaped window
        parts.append(("poly", pts * 0.35 + [0, -0.05], 0))
    return parts


def _house(r: np.random.Generator) -> list[Part]:
    w = r.uniform(0.6, 0.8)
    top = r.uniform(-0.1, 0.15)
    peak = top - r.uniform(0.5, 0.8)
    parts: list[Part] = [("poly", _rect(-w, top, w, 0.9), 1),
                         ("poly", np.array([[-w - 0.15, top + 0.02], [0, peak], [w + 0.15, top + 0.02]]), 1)]
    if r.random() < 0.6:  # chimney
        cx = w * 0.55
        parts.append(("poly", _rect(cx - 0.1, peak + 0.2, cx + 0.1, top - 0.1), 1))
    dx = float(r.choice([-0.4, 0.0, 0.4])) * w
    parts.append(("poly", _rect(dx - 0.15, 0.45, dx + 0.15, 0.9), 0))  # door
    if r.random() < 0.7:  # window on the other side
        wx = -0.45 * w if dx >= 0 else 0.45 * w
        parts.append(("poly", _rect(wx - 0.14, top + 0.2, wx + 0.14, top + 0.45), 0))
    return parts


def _tree(r: np.random.Generator) -> list[Part]:
    tw = r.uniform(0.13, 0.2)
    parts: list[Part] = [("poly", _rect(-tw, 0.0, tw, 0.95), 1)]
    if r.random() < 0.5:  # round crown: a cloud of three overlapping discs, wider than tall
        rad = r.uniform(0.36, 0.44)
        for cx, cy in ((-0.38, -0.2), (0.38, -0.2), (0.0, -0.5)):
            parts.append(("poly", _ellipse(cx, cy, rad, rad * r.uniform(0.9, 1.0)), 1))
    else:  # fir: 2-3 stacked triangles
        layers = int(r.integers(2, 4))
        for i in range(layers):
            y1 = 0.45 - i * 1.2 / layers
            half = 0.8 - i * 0.45 / layers
            parts.append(("poly", np.array([[-half, y1], [0, y1 - 0.9], [half, y1]]), 1))
    return parts


def _fish(r: np.random.Generator) -> list[Part]:
    bl = r.uniform(0.55, 0.7)
    bh = r.uniform(0.32, 0.45)
    tail = r.uniform(0.3, 0.45)
    cx = -0.15
    parts: list[Part] = [
        ("poly", _ellipse(cx, 0, bl, bh), 1),
        ("poly", np.array([[cx + bl - 0.1, 0], [cx + bl + tail, -tail * 0.9], [cx + bl + tail, tail * 0.9]]), 1),
    ]
    if r.random() < 0.6:  # dorsal fin
        parts.append(("poly", np.array([[cx - 0.15, -bh + 0.05], [cx + 0.15, -bh - 0.25], [cx + 0.3, -bh + 0.1]]), 1))
    parts.append(("poly", _ellipse(cx - bl * 0.6, -bh * 0.25, 0.08, 0.08, 16), 0))  # eye
    return parts


def _cup(r: np.random.Generator) -> list[Part]:
    w = r.uniform(0.4, 0.55)
    top, bot = r.uniform(-0.7, -0.5), 0.6
    taper = r.uniform(0.0, 0.12)
    hr = r.uniform(0.25, 0.35)
    hy = (top + bot) / 2
    parts: list[Part] = [
        ("poly", _ellipse(w + 0.05, hy, hr, hr * 1.2), 1),
        ("poly", _ellipse(w + 0.05, hy, hr * 0.55, hr * 0.7), 0),
        ("poly", np.array([[-w, top], [w, top], [w - taper, bot], [-w + taper, bot]]), 1),
    ]
    if r.random() < 0.5:  # saucer
        parts.append(("poly", _rect(-w - 0.25, bot, w + 0.25, bot + 0.14), 1))
    return parts


def _moon(r: np.random.Generator) -> list[Part]:
    off = r.uniform(0.35, 0.6)
    rc = r.uniform(0.75, 0.9)
    parts: list[Part] = [("poly", _ellipse(0, 0, 0.9, 0.9), 1), ("poly", _ellipse(off, -0.15, rc, rc), 0)]
    return parts


def _flower(r: np.random.Generator) -> list[Part]:
    n = int(r.integers(5, 8))
    pl = r.uniform(0.36, 0.42)  # petals apart: gaps between them
    cy = -0.2
    parts: list[Part] = [("poly", _rect(-0.05, cy, 0.05, 0.95), 1)]
    if r.random() < 0.6:  # leaf
        parts.append(("poly", np.array([[0.03, 0.6], [0.4, 0.35], [0.05, 0.75]]), 1))
    for k in range(n):
        a = 2 * math.pi * k / n
        parts.append(("poly", _ellipse(math.cos(a) * pl, cy + math.sin(a) * pl, 0.17, 0.17, 24), 1))
    parts.append(("poly", _ellipse(0, cy, r.uniform(0.1, 0.16), r.uniform(0.1, 0.16), 24), 0))
    return parts


def _mushroom(r: np.random.Generator) -> list[Part]:
    cw = r.uniform(0.75, 0.95)
    ch = r.uniform(0.45, 0.65)
    sw = r.uniform(0.18, 0.28)
    t = np.linspace(math.pi, 2 * math.pi, 30)
    cap = np.stack([cw * np.cos(t), 0.05 + ch * np.sin(t)], 1)
    parts: list[Part] = [("poly", _rect(-sw, 0.0, sw, 0.85), 1), ("poly", cap, 1)]
    for _ in range(int(r.integers(1, 4))):  # spots
        sx, sy = r.uniform(-0.5, 0.5) * cw, -r.uniform(0.15, 0.7) * ch
        parts.append(("poly", _ellipse(sx, sy, 0.09, 0.09, 16), 0))
    return parts


def _boat(r: np.random.Generator) -> list[Part]:
    hl = r.uniform(0.75, 0.95)
    parts: list[Part] = [
        ("poly", np.array([[-hl - 0.1, 0.4], [hl + 0.1, 0.4], [hl - 0.2, 0.75], [-hl + 0.2, 0.75]]), 1),
        ("poly", _rect(-0.04, -0.85, 0.04, 0.4), 1),  # mast
        ("poly", np.array([[0.08, -0.85], [0.08, 0.3], [r.uniform(0.55, 0.8), 0.3]]), 1),  # main sail
    ]
    if r.random() < 0.6:  # jib
        parts.append(("poly", np.array([[-0.08, -0.7], [-0.08, 0.3], [-r.uniform(0.4, 0.6), 0.3]]), 1))
    return parts


def _kite(r: np.random.Generator) -> list[Part]:
    w = r.uniform(0.45, 0.6)
    cross = r.uniform(-0.45, -0.25)  # height of the cross spar
    parts: list[Part] = [("poly", np.array([[0, -0.95], [w, cross], [0, 0.45], [-w, cross]]), 1)]
    if r.random() < 0.6:  # spars showing through
        parts += [("poly", _rect(-0.025, -0.85, 0.025, 0.38), 0), ("poly", _rect(-w + 0.1, cross - 0.025,
                                                                                w - 0.1, cross + 0.025), 0)]
    side = float(r.choice([-1.0, 1.0]))
    pts = np.array([[0, 0.45 + 0.5 * t] for t in np.linspace(0, 1, 9)])
    pts[:, 0] = side * 0.12 * np.sin(np.linspace(0, 2 * math.pi, 9))
    tail = np.concatenate([pts + [0.025, 0], pts[::-1] - [0.025, 0]])
    parts.append(("poly", tail, 1))
    for k in range(int(r.integers(2, 4))):  # bows on the tail
        y = 0.6 + 0.13 * k
        x = side * 0.12 * math.sin(2 * math.pi * (y - 0.45) / 0.5)
        parts.append(("poly", np.array([[x - 0.12, y - 0.06], [x + 0.12, y + 0.06], [x + 0.12, y - 0.06],
                                        [x - 0.12, y + 0.06]]), 1))
    return parts


def _key(r: np.random.Generator) -> list[Part]:
    hr = r.uniform(0.3, 0.4)
    hx = -0.95 + hr
    th = r.uniform(0.07, 0.1)
    end = r.uniform(0.8, 0.95)
    parts: list[Part] = [("poly", _ellipse(hx, 0, hr, hr * r.uniform(0.85, 1.05)), 1),
                         ("poly", _rect(hx, -th, end, th), 1)]
    hole = r.uniform(0.35, 0.55) * hr
    parts.append(("poly", _ellipse(hx, 0, hole, hole), 0))
    n = int(r.integers(2, 5))
    for k in range(n):  # bit: teeth of random depth below the shaft
        x0 = end - 0.1 - k * 0.16
        parts.append(("poly", _rect(x0 - 0.12, th - 0.01, x0, th + r.uniform(0.12, 0.32)), 1))
    return parts


def _anchor(r: np.random.Generator) -> list[Part]:
    arm = r.uniform(0.55, 0.75)
    stock = r.uniform(0.3, 0.5)
    t = np.linspace(0, math.pi, 24)
    cy = 0.2
    outer = np.stack([arm * np.cos(t), cy + arm * np.sin(t)], 1)
    inner = np.stack([(arm - 0.14) * np.cos(t[::-1]), cy + (arm - 0.14) * np.sin(t[::-1])], 1)
    parts: list[Part] = [
        ("poly", _ellipse(0, -0.8, 0.16, 0.16, 24), 1), ("poly", _ellipse(0, -0.8, 0.08, 0.08, 16), 0),  # ring
        ("poly", _rect(-0.065, -0.68, 0.065, cy + arm - 0.05), 1),  # shank
        ("poly", _rect(-stock, -0.56, stock, -0.46), 1),  # stock
        ("poly", np.concatenate([outer, inner]), 1),  # arms
    ]
    if r.random() < 0.7:  # flukes
        for sx in (-1, 1):
            x = sx * (arm - 0.07)
            parts.append(("poly", np.array([[x - 0.16, cy + 0.05], [x + 0.16, cy + 0.05], [x, cy - 0.22]]), 1))
    return parts


_SHAPES: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "star": _star, "heart": _heart, "house": _house, "tree": _tree, "fish": _fish,
    "cup": _cup, "moon": _moon, "flower": _flower, "mushroom": _mushroom, "boat": _boat,
    "kite": _kite, "key": _key, "anchor": _anchor,
}
assert tuple(_SHAPES) == ALL_CONTENTS


def instance_parts(content: str, instance: int) -> list[Part]:
    """The parts of one instance of ``content`` (its identity details), in shape coordinates [-1, 1]."""
    check_content(content)
    return _SHAPES[content](_rng("instance", content, instance))


def pose_of(content: str, seed: int) -> tuple[float, float, float, float]:
    """The pose ``seed`` gives ``content``: ``(angle in degrees, radius as a share of the frame, x, y)``,
    the object's centre ``(x, y)`` a share of the frame."""
    pose = _rng("pose", content, seed)
    ang = pose.uniform(-15, 15)
    scale = pose.uniform(0.75, 0.95) / 2
    ox, oy = pose.uniform(-0.08, 0.08, size=2)
    return ang, scale, 0.5 + ox, 0.5 + oy


def draw_parts(parts: Sequence[Part], angle: float, scale: float, x: float, y: float, size: int,
               supersample: int = 2) -> np.ndarray:
    """``parts`` rotated by ``angle`` degrees, scaled by ``scale`` (share of the frame per shape unit) and
    centred at ``(x, y)`` (shares of the frame): coverage float32 (size, size) in [0, 1], anti-aliased by
    ``supersample``x supersampling (1: none)."""
    ang = math.radians(angle)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    ss = supersample * size
    canvas = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    for _kind, pts, fill in parts:
        p = pts @ rot.T * scale + [x, y]
        draw.polygon([tuple(q) for q in (p * ss)], fill=255 * fill)
    if supersample > 1:
        canvas = canvas.resize((size, size), Image.BILINEAR)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def content_mask(content: str, *, seed: int = 0, size: int = 128, instance: int | None = None) -> np.ndarray:
    """The object's coverage mask, float32 (size, size) in [0, 1] (anti-aliased by 2x supersampling)."""
    parts = instance_parts(content, seed if instance is None else instance)
    return draw_parts(parts, *pose_of(content, seed), size)


# ----------------------------------------------------------------------------------------------
# Styles: palette x rendering. Each takes the mask (H, W) in [0, 1], a generator for style jitter,
# and returns float32 RGB (H, W, 3) in [0, 1].
# ----------------------------------------------------------------------------------------------
def _c(hexstr: str, r: np.random.Generator, jitter: float = 0.04) -> np.ndarray:
    rgb = np.array([int(hexstr[i:i + 2], 16) for i in (1, 3, 5)], np.float32) / 255
    return np.clip(rgb + r.uniform(-jitter, jitter, 3), 0, 1).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    im = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """A band of about ``width`` px around the mask's boundary (dilation - erosion)."""
    im = Image.fromarray((mask * 255).astype(np.uint8))
    k = 2 * max(1, width // 2) + 1
    dil = np.asarray(im.filter(ImageFilter.MaxFilter(k)), np.float32)
    ero = np.asarray(im.filter(ImageFilter.MinFilter(k)), np.float32)
    return np.clip((dil - ero) / 255, 0, 1)


def _compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return fg * m + bg * (1 - m)


def _full(color: np.ndarray, size: int) -> np.ndarray:
    return np.broadcast_to(color, (size, size, 3)).astype(np.float32)


def _striped(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    ang = math.radians(45 + r.uniform(-10, 10))
    period = s / 10 * r.uniform(0.9, 1.1)
    u = (x * math.cos(ang) + y * math.sin(ang)) / period + r.uniform(0, 1)
    band = (np.sin(2 * math.pi * u) > 0).astype(np.float32)[..., None]
    fg = band * _c("#d7263d", r) + (1 - band) * _c("#ffffff", r, 0.02)
    return _compose(mask, fg, _full(_c("#8d99ae", r), s))


def _polka(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    period = s / 9 * r.uniform(0.9, 1.1)
    px, py = r.uniform(0, period, 2)
    dx = (x + px) % period - period / 2
    dy = (y + py) % period - period / 2
    dot = (np.hypot(dx, dy) < period * 0.3).astype(np.float32)[..., None]
    fg = dot * _c("#ffffff", r, 0.02) + (1 - dot) * _c("#1d4ed8", r)
    return _compose(mask, fg, _full(_c("#fde68a", r), s))


def _checkered(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    cell = s / 10 * r.uniform(0.9, 1.1)
    px, py = r.uniform(0, cell, 2)
    chk = ((np.floor((x + px) / cell) + np.floor((y + py) / cell)) % 2).astype(np.float32)[..., None]
    fg = chk * _c("#111111", r, 0.02) + (1 - chk) * _c("#f5f5f5", r, 0.02)
    return _compose(mask, fg, _full(_c("#5eb1a8", r), s))


def _gradient(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    _, y = _grid(s)
    t = (y / (s - 1))[..., None]
    fg = (1 - t) * _c("#ffb000", r) + t * _c("#c2185b", r)
    bgt = t * 0.5
    bg = (1 - bgt) * _c("#0b1a3a", r, 0.02) + bgt * _c("#1d2f5e", r, 0.02)
    return _compose(mask, fg, bg)


def _outline(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    e = _edge(mask, max(2, round(s / 28)))
    return _compose(e, _full(_c("#0f7a2e", r), s), _full(_c("#ffffff", r, 0.015), s))


def _hatched(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    period = max(3.0, s / 16) * r.uniform(0.9, 1.1)
    a = (np.abs(((x + y) / period + r.uniform(0, 1)) % 1 - 0.5) < 0.14)
    b = (np.abs(((x - y) / period + r.uniform(0, 1)) % 1 - 0.5) < 0.14)
    ink = np.clip(a.astype(np.float32) + b.astype(np.float32), 0, 1) * mask
    ink = np.maximum(ink, _edge(mask, max(1, round(s / 64))))[..., None]
    paper = _full(_c("#e9e4d8", r, 0.02), s)
    return ink * _c("#3b3b3b", r, 0.02) + (1 - ink) * paper


_MOSAIC = ("#e63946", "#f4a261", "#2a9d8f", "#e9c46a", "#8d5cf6", "#06d6a0")


def _mosaic(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    cell = s / 14 * r.uniform(0.9, 1.1)
    ix, iy = np.floor(x / cell).astype(int), np.floor(y / cell).astype(int)
    n = int(math.ceil(s / cell)) + 1
    pal = np.stack([_c(h, r, 0.03) for h in _MOSAIC])
    tiles = pal[r.integers(0, len(pal), (n, n))]  # (n, n, 3)
    fg = tiles[iy, ix]
    gw = max(1.0, cell * 0.2)
    grout = ((x % cell) < gw) | ((y % cell) < gw)
    fg = np.where(grout[..., None], _c("#3a3a3a", r, 0.02), fg)
    m = mask
    return _compose(m, fg, _full(_c("#262626", r, 0.02), s))


def _neon(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    e = _edge(mask, max(2, round(s / 40)))
    glow = _blur(e, s / 40)
    col = _c("#22e6ff", r, 0.05)
    core = np.clip(e * 1.0, 0, 1)[..., None]
    img = _full(_c("#05020d", r, 0.01), s) + glow[..., None] * col * 1.6
    return np.clip(img * (1 - core) + core * (0.6 + 0.4 * col), 0, 1)


def _watercolor(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    noise = _blur(r.random((s, s)).astype(np.float32), s / 24)
    soft = _blur(mask, s / 64)
    m = np.clip(soft + (noise - 0.5) * 0.8 * (soft > 0.05), 0, 1)
    wash = 0.75 + 0.5 * (noise[..., None] - 0.5)
    fg = np.clip(_c("#a05cd6", r) * wash + (1 - wash) * 0.95, 0, 1)
    paper = _full(_c("#fbf7ee", r, 0.015), s) - 0.04 * (noise[..., None] - 0.5)
    return _compose(m * 0.9, fg, paper)


def _pixel(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    blocks = 20
    b = max(1, s // blocks)
    small = Image.fromarray((mask * 255).astype(np.uint8)).resize((blocks, blocks), Image.BOX)
    on = (np.asarray(small, np.float32) / 255 > 0.45).astype(np.float32)
    onp = np.pad(on, 1)
    border = on * (1 - onp[:-2, 1:-1] * onp[2:, 1:-1] * onp[1:-1, :-2] * onp[1:-1, 2:])
    up = Image.fromarray((np.stack([on, border], -1)[..., [0, 1, 1]] * 255).astype(np.uint8))
    up = np.asarray(up.resize((b * blocks, b * blocks), Image.NEAREST).resize((s, s), Image.NEAREST), np.float32) / 255
    m, bd = up[..., 0], up[..., 1]
    fg = _compose(bd, _full(_c("#1f6f1f", r), s), _full(_c("#7ed957", r), s))
    x, y = _grid(s)
    sky = ((np.floor(x / b) + np.floor(y / b)) % 2 * 0.03)[..., None]
    return _compose(m, fg, _full(_c("#8ecae6", r, 0.02), s) + sky)


def _zigzag(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    period = s / 8 * r.uniform(0.9, 1.1)  # horizontal chevron bands
    amp = period * r.uniform(0.35, 0.5)
    tri = np.abs(((x / period + r.uniform(0, 1)) % 1) - 0.5) * 2 * amp
    band = ((((y + tri) / (period * 0.5)) + r.uniform(0, 1)) % 2 < 1).astype(np.float32)[..., None]
    fg = band * _c("#ff8c1a", r) + (1 - band) * _c("#3d2314", r, 0.02)
    return _compose(mask, fg, _full(_c("#b9e4c9", r, 0.03), s))


def _brick(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    bh = s / 12 * r.uniform(0.9, 1.1)
    bw = 2.2 * bh
    row = np.floor((y + r.uniform(0, bh)) / bh)
    xs = x + (row % 2) * bw / 2 + r.uniform(0, bw)
    mortar = ((((y + r.uniform(0, bh)) % bh) < max(1.0, bh * 0.18)) | ((xs % bw) < max(1.0, bh * 0.18)))
    shade = 1 + 0.12 * (_rng("brick", int(r.integers(1 << 30))).random((64, 64))[row.astype(int) % 64,
                                                                             np.floor(xs / bw).astype(int) % 64] - 0.5)
    fg = _c("#b5482a", r)[None, None] * shade[..., None]
    fg = np.where(mortar[..., None], _c("#e8dcc8", r, 0.02), fg)
    return _compose(mask, fg, _full(_c("#4a5a78", r, 0.03), s))


def _concentric(mask: np.ndarray, r: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    x, y = _grid(s)
    w = mask.sum() + 1e-6  # rings around the object's centre
    cx, cy = (mask * x).sum() / w, (mask * y).sum() / w
    period = s / 9 * r.uniform(0.9, 1.1)
    ring = ((np.hypot(x - cx, y - cy) / period + r.uniform(0, 1)) % 1 < 0.5).astype(np.float32)[..., None]
    fg = ring * _c("#e0218a", r) + (1 - ring) * _c("#fff3c4", r, 0.02)
    return _compose(mask, fg, _full(_c("#14532d", r, 0.03), s))


_RENDER: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "striped": _striped, "polka dot": _polka, "checkered": _checkered, "gradient": _gradient,
    "outline": _outline, "hatched": _hatched, "mosaic": _mosaic, "neon": _neon,
    "watercolor": _watercolor, "pixel art": _pixel,
    "zigzag": _zigzag, "brick": _brick, "concentric": _concentric,
}
assert tuple(_RENDER) == ALL_STYLES


def render_array(content: str, style: str, *, seed: int = 0, size: int = 128,
                 instance: int | None = None) -> np.ndarray:
    """Like :func:`render` but returns float32 RGB (size, size, 3) in [0, 1]."""
    check_style(style)
    if size < 16:
        raise UserError("size", f"got {size}", "expected at least 16 pixels")
    mask = content_mask(content, seed=seed, size=size, instance=instance)
    return style_array(mask, style, seed=seed)


def style_array(mask: np.ndarray, style: str, *, seed: int = 0) -> np.ndarray:
    """``style`` rendered over a coverage ``mask`` (H, W) in [0, 1]: float32 RGB (H, W, 3) in [0, 1].

    An all-ones mask gives the bare texture (the oracles' style-only negatives), zeros the bare ground.
    """
    check_style(style)
    img = _RENDER[style](np.asarray(mask, np.float32), _rng("style", style, seed))
    return np.clip(img, 0, 1).astype(np.float32)


def render(content: str, style: str, *, seed: int = 0, size: int = 128, instance: int | None = None) -> Image.Image:
    """Draw ``content`` in ``style``: a deterministic RGB image of ``size`` x ``size`` pixels.

    ``instance`` picks the object's identity details (default: ``seed``); ``seed`` also sets pose and
    style jitter. Unknown names raise a one-line ``UserError``.
    """
    return Image.fromarray((render_array(content, style, seed=seed, size=size, instance=instance) * 255 + 0.5)
                           .astype(np.uint8))


def sample_batch(n: int, *, seed: int, size: int = 64, pairs: Sequence[tuple[str, str]] | None = None,
                 kinds: Sequence[str] = ("both",), instances: int | None = None):
    """A random training batch: ``(images, captions, content_ids, style_ids)``.

    images: float32 tensor (n, 3, size, size) in [-1, 1]; captions: list of n strings, the caption
    kind drawn uniformly from ``kinds``; content_ids / style_ids: int64 tensors (n,) indexing
    ``CONTENTS`` / ``STYLES``. ``pairs`` defaults to ``train_pairs()``. ``instances`` limits the
    identity instances to ``range(instances)`` (default: every image its own instance). Deterministic
    from ``seed``.
    """
    import torch

    pairs = tuple(train_pairs() if pairs is None else pairs)
    r = np.random.default_rng(seed)
    idx = r.integers(0, len(pairs), n)
    seeds = r.integers(0, 2**31 - 1, n)
    kind_idx = r.integers(0, len(kinds), n)
    out = np.empty((n, size, size, 3), np.float32)
    caps, cids, sids = [], [], []
    for i in range(n):
        c, s = pairs[idx[i]]
        inst = None if instances is None else int(seeds[i] % instances)
        out[i] = render_array(c, s, seed=int(seeds[i]), size=size, instance=inst)
        caps.append(caption(c, s, kinds[kind_idx[i]]))
        cids.append(CONTENTS.index(c))
        sids.append(STYLES.index(s))
    images = torch.from_numpy(out).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()
    return images, caps, torch.tensor(cids, dtype=torch.long), torch.tensor(sids, dtype=torch.long)
