"""Draw the small example images the default recipes use (no downloads, deterministic).

    python examples/make_examples.py          # rewrites examples/*.png
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = 256


def balloon(size: int = SIZE) -> Image.Image:
    """A hot-air balloon in a flat, isometric-illustration look: sky gradient, stripes, basket."""
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):  # sky gradient
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(120 + 100 * t), int(180 + 50 * t), int(235 - 20 * t)))
    for cx, cy, r in ((50, 60, 18), (75, 55, 22), (100, 62, 16), (190, 200, 20), (215, 195, 15)):
        d.ellipse([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=(250, 250, 252))
    cx, cy, rx, ry = size // 2, int(size * 0.40), int(size * 0.26), int(size * 0.30)
    colours = [(232, 72, 85), (255, 196, 61), (46, 134, 171), (255, 255, 255)]
    for i in range(8):  # vertical stripes of the envelope
        x0 = cx - rx + i * (2 * rx) // 8
        x1 = cx - rx + (i + 1) * (2 * rx) // 8
        stripe = Image.new("L", (size, size), 0)
        ImageDraw.Draw(stripe).rectangle([x0, 0, x1, size], fill=255)
        env = Image.new("L", (size, size), 0)
        ImageDraw.Draw(env).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        ImageDraw.Draw(env).polygon([(cx - rx + 8, cy + 10), (cx + rx - 8, cy + 10), (cx + 14, cy + ry + 28),
                                     (cx - 14, cy + ry + 28)], fill=255)
        mask = ImageChops.darker(stripe, env)  # inside the stripe and the envelope
        im.paste(colours[i % 4], (0, 0), mask)
    d = ImageDraw.Draw(im)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=(60, 40, 60), width=2)
    by = cy + ry + 40
    for sx in (-12, 12):  # ropes
        d.line([(cx + sx * 1.2, cy + ry + 22), (cx + sx, by)], fill=(80, 60, 50), width=2)
    d.polygon([(cx - 16, by), (cx + 16, by), (cx + 12, by + 20), (cx - 12, by + 20)], fill=(150, 95, 50),
              outline=(80, 50, 30))
    d.line([(cx - 14, by + 7), (cx + 14, by + 7)], fill=(110, 70, 35), width=2)
    return im.filter(ImageFilter.SMOOTH)


def _painted(size: int, seed: int, palette: list[tuple[int, int, int]], strokes: int,
             width: tuple[int, int]) -> Image.Image:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), palette[0])
    d = ImageDraw.Draw(im)
    for _ in range(strokes):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        a = rng.uniform(0, math.pi)
        length = rng.uniform(10, 60)
        d.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=rng.choice(palette[1:]),
               width=rng.randint(*width))
    return im.filter(ImageFilter.SMOOTH_MORE)


STYLES = {  # small style references (brush-stroke textures with distinct palettes)
    "style_watercolor": ([(244, 240, 230), (120, 170, 210), (230, 150, 160), (170, 210, 160)], 300, (6, 14)),
    "style_neon": ([(15, 10, 30), (255, 40, 200), (40, 240, 255), (250, 250, 80)], 220, (2, 5)),
    "style_earth": ([(200, 180, 140), (120, 80, 40), (90, 110, 60), (60, 40, 30)], 400, (3, 9)),
}


def cube(size: int = SIZE, colour: tuple[int, int, int] = (90, 140, 220)) -> Image.Image:
    """A plain shaded cube on grey: a neutral 'content' reference."""
    im = Image.new("RGB", (size, size), (225, 225, 225))
    d = ImageDraw.Draw(im)
    c, s = size // 2, size // 4
    top = [(c, c - s), (c + s, c - s // 2), (c, c), (c - s, c - s // 2)]
    left = [(c - s, c - s // 2), (c, c), (c, c + s), (c - s, c + s // 2)]
    right = [(c, c), (c + s, c - s // 2), (c + s, c + s // 2), (c, c + s)]
    d.polygon(top, fill=tuple(min(255, int(v * 1.25)) for v in colour))
    d.polygon(left, fill=colour)
    d.polygon(right, fill=tuple(int(v * 0.7) for v in colour))
    return im


def house(size: int = SIZE) -> Image.Image:
    """A flat little house on grass under a plain sky: another neutral 'content' reference (MCP's contents)."""
    im = Image.new("RGB", (size, size), (200, 225, 240))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(size * 0.72), size, size], fill=(120, 170, 90))
    x0, x1, y0, y1 = int(size * 0.28), int(size * 0.72), int(size * 0.45), int(size * 0.78)
    d.rectangle([x0, y0, x1, y1], fill=(235, 215, 170))
    d.polygon([(x0 - 14, y0), (x1 + 14, y0), ((x0 + x1) // 2, int(size * 0.22))], fill=(170, 60, 50))
    d.rectangle([int(size * 0.46), int(size * 0.60), int(size * 0.56), y1], fill=(110, 70, 40))
    d.rectangle([int(size * 0.33), int(size * 0.52), int(size * 0.42), int(size * 0.61)], fill=(90, 140, 200))
    d.rectangle([int(size * 0.60), int(size * 0.52), int(size * 0.69), int(size * 0.61)], fill=(90, 140, 200))
    return im


def main() -> None:
    balloon().save(HERE / "balloon.png", optimize=True)
    for i, (name, (palette, strokes, width)) in enumerate(STYLES.items()):
        _painted(SIZE, seed=i, palette=palette, strokes=strokes, width=width).save(HERE / f"{name}.png", optimize=True)
    cube().save(HERE / "content_cube.png", optimize=True)
    cube(colour=(220, 120, 60)).save(HERE / "content_cube_orange.png", optimize=True)
    house().save(HERE / "content_house.png", optimize=True)


if __name__ == "__main__":
    main()
