"""Scale schedules of Infinity: which (h, w) token grid each generation step predicts.

Infinity predicts an image coarse to fine, one token grid ("scale") per step. For every aspect
ratio the official release fixes a template of 13 grids; a resolution uses a prefix of it (the
official budgets: 7 scales = 256 px, 10 = 512 px, 12 = 768 px, 13 = 1024 px with a VAE stride of
16). The grid sizes below are the published templates (data, not code): 1:1 is
1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64 (10,521 tokens at 1024²).

RoPE positions are always measured on the grid of the template's last scale (the official
"normalised by h, w" mode 2), whatever prefix is generated.
"""

from __future__ import annotations

import math

import torch

Schedule = list[tuple[int, int]]

# h / w -> the 13 (h, w) grids of the official templates (portrait ratios are derived below).
_TEMPLATES: dict[float, Schedule] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)],
}
TEMPLATES: dict[float, Schedule] = dict(_TEMPLATES)
for _ratio, _grids in _TEMPLATES.items():
    if _ratio != 1.0:
        TEMPLATES[int(1 / _ratio * 1000) / 1000] = [(w, h) for h, w in _grids]


def template_for(aspect_ratio: float) -> tuple[float, Schedule]:
    """The template (ratio, 13 grids) nearest to ``aspect_ratio`` (= h / w)."""
    if not aspect_ratio > 0 or not math.isfinite(aspect_ratio):
        raise ValueError(f"aspect ratio must be a positive number, got {aspect_ratio}")
    ratio = min(TEMPLATES, key=lambda r: abs(r - aspect_ratio))
    return ratio, TEMPLATES[ratio]


def scale_schedule(resolution: int, aspect_ratio: float = 1.0, patch_size: int = 16) -> Schedule:
    """The scales generated for an image of about ``resolution``² pixels at ``aspect_ratio`` (h / w).

    The prefix of the nearest template whose last grid covers the area closest to
    ``(resolution / patch_size)²``; 1024 px at stride 16 gives the 13 scales 1 ... 64.
    """
    if resolution < patch_size:
        raise ValueError(f"resolution {resolution} is smaller than the VAE stride {patch_size}")
    _, grids = template_for(aspect_ratio)
    area = (resolution / patch_size) ** 2
    n = min(range(1, len(grids) + 1), key=lambda k: (abs(grids[k - 1][0] * grids[k - 1][1] - area), -k))
    return list(grids[:n])


def rope_reference(schedule: Schedule) -> tuple[int, int]:
    """The grid RoPE positions are measured on: the last scale of the full template of ``schedule``."""
    h, w = schedule[-1]
    for grids in TEMPLATES.values():
        if list(grids[: len(schedule)]) == list(schedule):
            return grids[-1]
    return h, w  # a custom schedule: its own last grid


def num_tokens(schedule: Schedule) -> int:
    return sum(h * w for h, w in schedule)


def scale_of_tokens(schedule: Schedule, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) scale index of every token of the flattened schedule."""
    return torch.cat([torch.full((h * w,), i, dtype=torch.long, device=device) for i, (h, w) in enumerate(schedule)])


def rope_positions(schedule: Schedule, reference: tuple[int, int] | None = None) -> torch.Tensor:
    """(L, 2) integer (row, column) RoPE position of every token, on the reference grid.

    Scale (h, w) samples row ``round(i * H / h)`` and column ``round(j * W / w)`` of the reference
    grid (H, W), so a coarse token sits where its area starts on the final image.
    """
    ref_h, ref_w = reference or rope_reference(schedule)
    out = []
    for h, w in schedule:
        rows = (torch.arange(h) * (ref_h / h)).round().long()
        cols = (torch.arange(w) * (ref_w / w)).round().long()
        out.append(torch.stack([rows[:, None].expand(h, w), cols[None, :].expand(h, w)], -1).reshape(-1, 2))
    return torch.cat(out)
