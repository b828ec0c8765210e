"""Images and files: robust image loading, atomic writes, grids."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

MIN_SIDE = 64


def load_image(path: str | Path, where: str = "inputs.image", min_side: int = MIN_SIDE) -> Image.Image:
    """Open an image as 8-bit RGB, whatever a user gives.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are converted;
    transparency is composited on white. Raises :class:`UserError` for a missing, corrupt or
    non-image file and for an image under ``min_side`` (default 64) px on a side.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(where, f"{p} is a folder", "expected an image file")
    if not p.is_file():
        raise UserError(where, f"file not found: {p}", "expected an existing image file")
    try:
        with warnings.catch_warnings():
            # over Image.MAX_IMAGE_PIXELS Pillow only warns (up to twice that it raises): refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise UserError(where, f"{p} is too large to open safely (Pillow's decompression-bomb limit)",
                        f"expected at most {limit:.0f} megapixels; downscale it (1024 px on a side is enough)") \
            from None
    except PermissionError as exc:
        raise UserError(where, f"cannot read {p} ({exc.strerror})", "expected a readable image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(where, f"cannot read {p} as an image ({exc.__class__.__name__})",
                        "expected a PNG, JPEG, WebP or other image file") from None
    im = _to_rgb(im)
    if min(im.size) < min_side:
        raise UserError(where, f"{p} is {im.size[0]}x{im.size[1]} px",
                        f"expected at least {min_side} px on each side")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    if im.mode == "CMYK":
        return im.convert("RGB")
    return im.convert("RGB")


def image_to_tensor(im: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize (short side) and centre-crop to ``size``; return (3, H, W) in [-1, 1]."""
    h, w = (size, size) if isinstance(size, int) else size
    scale = max(h / im.height, w / im.width)
    resized = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    arr = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def slugify(text: str, max_len: int = 60) -> str:
    """'A <c> on the beach' -> 'a-c-on-the-beach'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where it can be, so no thread sees it change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (``0o666``) or folder (``0o777``) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: str | Path, write: Any, mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    The file gets the mode an ordinary ``open`` would give it (``0o666`` less the umask), not the
    ``0o600`` of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: errno values of writes that fail because of the place written to (full disk, read-only, no permission)
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                         errno.ENOTDIR, errno.EIO})


def make_writable_dir(path: str | Path, where: str) -> Path:
    """Create folder ``path`` (with its parents) and check that files can be written in it; a
    :class:`UserError` at ``where`` otherwise (nothing is left behind by the check)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise UserError(where, f"{path} or a folder above it is a file", "expected a folder (or a new path)") from None
    except OSError as exc:
        raise UserError(where, f"cannot create or write to {path} ({exc.strerror or exc})",
                        "expected a folder you can write to") from None
    return path


def clear_folder(path: str | Path, keep: Sequence[str] = ()) -> None:
    """Remove everything inside folder ``path`` except the entries named in ``keep``."""
    for entry in Path(path).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=False) + "\n"), mode="w")


def save_image(im: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda fh: im.save(fh, format="PNG"))


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(key, count)`` of the first floating-point tensor (in key order) holding NaN or inf values."""
    for k in sorted(tensors):
        v = tensors[k]
        if (v.is_floating_point() or v.is_complex()) and v.numel():
            v = v.detach()
            # a finite sum means finite elements (NaN and inf propagate); several times faster than isfinite
            if torch.isfinite(v.sum(dtype=torch.complex128 if v.is_complex() else torch.float64)):
                continue
            bad = int((~torch.isfinite(v)).sum())  # the sum may also have overflowed
            if bad:
                return k, bad
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, what: str,
                 expected: str = "expected finite weights; nothing was written") -> None:
    """A :class:`UserError` at ``where`` naming the first tensor of ``what`` (a file) with NaN or inf values."""
    found = nonfinite(tensors)
    if found is not None:
        key, bad = found
        raise UserError(where, f"{what}: tensor '{key}' holds {bad} NaN or inf value{'s' if bad > 1 else ''}",
                        expected)


def _safetensors_parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
                       ) -> tuple[bytes, memoryview]:
    """(size + header, tensor data) of a safetensors file with the metadata keys sorted."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text, memoryview(data)[8 + n:]


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file as bytes, the same bytes for the same tensors and metadata in every process.

    safetensors (0.4 to 0.8 at least) writes the ``__metadata__`` keys in the order of a Rust hash map,
    seeded anew for every file; here the header is written again with the metadata keys sorted (the
    tensors keep safetensors' own order: by dtype alignment, then name).
    """
    head, body = _safetensors_parts(tensors, metadata)
    return head + bytes(body)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None, *, finite: bool = True,
                     where: str | None = None) -> str:
    """Write ``tensors`` to ``path`` atomically and deterministically (:func:`safetensors_bytes`);
    returns the file's sha256 (hex).

    With ``finite`` (the default) a tensor holding NaN or inf is a :class:`UserError` at ``where``
    (default: the path) and nothing is written; model weights that hold ``-inf`` masks pass ``False``.
    """
    if finite:
        check_finite(tensors, where or str(path), str(path))
    head, body = _safetensors_parts(tensors, metadata)
    digest = hashlib.sha256(head)
    digest.update(body)

    def write(fh: Any) -> None:
        fh.write(head)
        fh.write(body)

    atomic_write(path, write)
    return digest.hexdigest()


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file's bytes.

    Raises ``safetensors.SafetensorError`` or ``ValueError`` for bytes that are not a safetensors file.
    """
    from safetensors.torch import load

    tensors = load(data)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return tensors, dict(header.get("__metadata__") or {})


def make_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 4) -> Image.Image:
    """Images in rows (ragged allowed) on a white canvas."""
    rows = [list(r) for r in rows if r]
    if not rows:
        raise ValueError("no images for the grid")
    cell_w = max(im.width for r in rows for im in r)
    cell_h = max(im.height for r in rows for im in r)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            grid.paste(im, (pad + j * (cell_w + pad), pad + i * (cell_h + pad)))
    return grid


def labeled_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str],
                 inputs: Sequence[Image.Image | None] = (), pad: int = 4) -> Image.Image:
    """Like :func:`make_grid`, with a text label above each row (e.g. ``content: A <c> on the beach``)
    and, in the first column, each row's input image (``None`` leaves the cell empty)."""
    from PIL import ImageDraw, ImageFont

    rows = [list(r) for r in rows]
    if not any(rows):
        raise ValueError("no images for the grid")
    cell_w = max(im.width for r in rows for im in r)
    cell_h = max(im.height for r in rows for im in r)
    with_inputs = any(im is not None for im in inputs)
    cols = max(len(r) for r in rows) + (1 if with_inputs else 0)
    font = ImageFont.load_default()
    label_h = 16
    width = cols * (cell_w + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    max_chars = max(8, (width - 2 * pad) // 6)
    for i, r in enumerate(rows):
        top = pad + i * (cell_h + label_h + pad)
        text = labels[i] if i < len(labels) else ""
        if len(text) > max_chars:
            text = text[: max_chars - 3] + "..."
        draw.text((pad, top + 2), text, fill=(0, 0, 0), font=font)
        cells = ([inputs[i] if i < len(inputs) else None] if with_inputs else []) + r
        for j, im in enumerate(cells):
            if im is None:
                continue
            if im.size != (cell_w, cell_h) and j == 0 and with_inputs:
                im = ImageOps.pad(im, (cell_w, cell_h), color=(255, 255, 255))
            grid.paste(im, (pad + j * (cell_w + pad), top + label_h))
        if with_inputs and cells[0] is not None:
            draw.rectangle((pad - 2, top + label_h - 2, pad + cell_w + 1, top + label_h + cell_h + 1),
                           outline=(200, 60, 60), width=2)
    return grid


#: The only non-tensor class a weights-only checkpoint may hold: official training checkpoints
#: (Infinity, CSD) keep their argparse arguments beside the weights.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def load_weights_file(path: str | Path, where: str) -> dict[str, Any]:
    """Read a ``.safetensors`` file or a PyTorch pickle without running code in it.

    Pickles load with ``weights_only=True`` and the :data:`SAFE_GLOBALS` allow-list (memory-mapped
    where the format allows); anything else is a :class:`UserError` at ``where``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # files of the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(where, f"{path} would run code to load ({first})",
                        "expected a weights-only checkpoint (tensors and plain containers) or .safetensors") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise UserError(where, f"cannot read {path} ({exc.__class__.__name__}: {str(exc)[:120]})",
                        "expected a PyTorch state dict (.pth) or .safetensors file") from None
    if not isinstance(data, Mapping):
        raise UserError(where, f"{path} holds a {type(data).__name__}", "expected a state dict")
    return dict(data)
