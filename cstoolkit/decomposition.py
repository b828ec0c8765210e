"""What a method learned, on disk: safetensors files + a JSON manifest written last."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import UserError
from .io import atomic_write, check_finite, parse_safetensors, save_safetensors, write_json

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .backbone import Backbone
    from .method import Method

MANIFEST = "manifest.json"
#: a file's safetensors metadata key ``sidecar:<name>`` is also written as the file ``<name>`` beside it
#: (a config a loader reads next to the weights, e.g. PEFT's ``adapter_config.json``)
SIDECAR = "sidecar:"
FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("cstoolkit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Decomposition:
    """Content and style representations learned (or recorded) by a method.

    ``files`` maps a relative path (``content/pytorch_lora_weights.safetensors``) to its tensors;
    ``placeholders`` maps ``<c>``/``<s>`` to the text they stand for at generation; ``meta`` holds
    method-specific JSON; ``recipe`` the resolved recipe (so :meth:`load` can rebuild the backbone).
    """

    method: str
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    path: Path | None = None
    # bound at fit/load time, not saved
    _backbone: "Backbone | None" = field(default=None, repr=False, compare=False)
    _method: "Method | None" = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------------------------ I/O
    def save(self, directory: str | Path) -> Path:
        """Write every file, then the manifest (atomically, last). Returns the folder.

        A tensor holding NaN or inf is a :class:`UserError` naming its file and key, before anything
        is written. Files are byte-identical for identical tensors and metadata (:func:`safetensors_bytes`).
        """
        directory = Path(directory)
        for rel, tensors in self.files.items():
            check_finite(tensors, "decomposition", rel, "expected finite weights (the fit diverged: try a lower "
                         "learning rate or mixed_precision: no); nothing was saved")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # an interrupted save leaves no valid manifest
        entries = {}
        for rel, tensors in self.files.items():
            target = directory / rel
            meta = self.file_metadata.get(rel)
            digest = save_safetensors(tensors, target, metadata=meta, finite=False)  # checked above
            entries[rel] = {"sha256": digest, "tensors": len(tensors)}
            for key, text in (meta or {}).items():  # e.g. PEFT's adapter_config.json beside its weights
                if key.startswith(SIDECAR):
                    atomic_write(target.parent / key[len(SIDECAR):], lambda fh, t=text: fh.write(t.encode()))
        manifest = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "placeholders": self.placeholders,
            "files": entries,
            "meta": self.meta,
            "recipe": self.recipe,
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(directory / MANIFEST, manifest)
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, backbone: "Backbone | None" = None, device: str | None = None,
             where: str = "decomposition") -> "Decomposition":
        """Read a saved decomposition; the backbone is rebuilt lazily from the stored recipe.

        Every file is checked against the sha256 its manifest records: a file changed or corrupted
        since it was saved is a :class:`UserError` naming it.
        """
        from safetensors import SafetensorError

        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not directory.exists():
            raise UserError(where, f"{directory} does not exist", "expected the folder of a finished run")
        if not manifest_path.is_file():
            raise UserError(where, f"{directory} has no {MANIFEST}",
                            "expected the decomposition/ folder of a finished run")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(where, f"{manifest_path} is not valid JSON ({exc.msg})", "expected a cstoolkit manifest") \
                from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(where, f"cannot read {manifest_path} ({getattr(exc, 'strerror', None) or exc})",
                            "expected a readable cstoolkit manifest") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("method"), str):
            raise UserError(where, f"{manifest_path} names no method", "expected a manifest written by cstoolkit")
        entries = manifest.get("files", {})
        if not isinstance(entries, dict):
            raise UserError(where, f"{manifest_path} lists its files wrongly",
                            "expected a manifest written by cstoolkit")
        files, file_metadata = {}, {}
        for rel, entry in entries.items():
            target = directory / rel
            if not target.is_file():
                raise UserError(where, f"{target} is missing", "expected every file the manifest lists")
            try:
                data = target.read_bytes()
            except OSError as exc:
                raise UserError(where, f"cannot read {target} ({exc.strerror or exc})",
                                "expected the files of a finished run, as written") from None
            try:
                files[rel], file_metadata[rel] = parse_safetensors(data)
            except (SafetensorError, ValueError) as exc:
                raise UserError(where, f"{target} is not a readable safetensors file ({str(exc)[:100]})",
                                "expected the files of a finished run, as written") from None
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise UserError(where, f"{target} does not match the sha256 in {MANIFEST} (changed or corrupted "
                                "since it was saved)", "expected the file as the run wrote it; restore it or run "
                                "the recipe again")
        dec = cls(
            method=manifest["method"],
            files=files,
            placeholders=manifest.get("placeholders", {}),
            meta=manifest.get("meta", {}),
            recipe=manifest.get("recipe", {}),
            file_metadata={k: v for k, v in file_metadata.items() if v},
            path=directory,
        )
        dec._backbone = backbone
        if device is not None:
            dec.recipe.setdefault("runtime", {})["device"] = device
        return dec

    # ------------------------------------------------------------------------------ generation
    def bind(self, method: "Method", backbone: "Backbone") -> "Decomposition":
        self._method, self._backbone = method, backbone
        return self

    @property
    def backbone(self) -> "Backbone":
        if self._backbone is None:
            from .recipe import build_from_recipe

            self._method, self._backbone = build_from_recipe(self.recipe)
        return self._backbone

    @property
    def method_impl(self) -> "Method":
        if self._method is None:
            from .recipe import build_method

            self._method = build_method(self.recipe)
        return self._method

    def generate(self, prompt: str | list[str], use: str = "both", num_images: int = 1, seed: int = 0,
                 progress: bool = True, **options: Any) -> list["Image.Image"]:
        """Images for ``prompt`` (one or several) using the content, the style or both.

        ``options`` override the method's sampling options (e.g. ``steps``, ``guidance_scale``).
        """
        from .method import check_placeholders
        from .recipe import generate_options

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        method = self.method_impl
        method.check_prompts(prompts, use)
        for i, text in enumerate(prompts):
            check_placeholders(text, self.placeholders, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        if use not in method.uses:
            raise UserError("use", f"{self.method} has no '{use}' use", f"expected one of: {', '.join(method.uses)}")
        backbone = self.backbone
        opts = generate_options(method, self.recipe, options)
        per_prompt = method.generate(backbone, self, prompts, use, num_images=num_images, seed=seed,
                                     options=opts, progress=progress)
        return [im for ims in per_prompt for im in ims]


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing it (used for atomic output folders)."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
