"""Python API: ``Decomposer.from_recipe(...).fit()`` and ``Decomposition.generate(...)``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .backbone import Backbone
from .decomposition import MANIFEST, Decomposition
from .errors import UserError
from .io import DISK_ERRORS, clear_folder, load_image, make_writable_dir, save_image, slugify, write_json
from .lock import LOCK_NAME, FolderLock
from .lora import cast_lora_files
from .method import Method
from .phases import free_cuda_memory
from .recipe import Recipe, build_backbone, build_from_recipe, build_method, generate_options, load_recipe
from .runtime import Runtime, has_checkpoints

log = logging.getLogger(__name__)

__all__ = ["Decomposer", "Decomposition", "RunResult", "build_backbone", "build_from_recipe", "build_method",
           "generate_options"]


def _check_images(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        listed = isinstance(value, (list, tuple))
        for i, item in enumerate(value if listed else [value]):
            at = f"{where}.{f.name}" + (f"[{i}]" if listed else "")
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                _check_images(item, at)
            elif f.metadata.get("image") and item is not None:
                load_image(item, at)


@dataclass
class RunResult:
    """What ``cstoolkit run`` produced."""

    output_dir: Path
    decomposition: Decomposition
    samples: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    grid: Path | None = None


class Decomposer:
    """Runs a recipe: builds the backbone, fits the method, saves and samples.

    >>> dec = Decomposer.from_recipe("recipes/unziplora.yaml", overrides=["params.steps=20"]).fit()
    >>> images = dec.generate("A <c> on the beach", use="content")
    """

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False):
        self.recipe = recipe
        self.method: Method = recipe.method_cls(recipe.params)
        self.runtime = Runtime(recipe.runtime, resume=resume)
        self.overwrite = overwrite
        self._backbone: Backbone | None = None

    @classmethod
    def from_recipe(cls, source: str | Path | dict[str, Any], overrides: Sequence[str] = (), *,
                    resume: bool = False, overwrite: bool = False) -> "Decomposer":
        """Load and validate a recipe (YAML path or mapping) with ``--set``-style overrides."""
        return cls(load_recipe(source, overrides), resume=resume, overwrite=overwrite)

    @property
    def output_dir(self) -> Path:
        return self.runtime.output_dir

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = build_backbone(self.recipe, self.runtime)
        return self._backbone

    def check_inputs(self) -> None:
        """Open every input image now (also in nested input sections), so bad input fails before
        anything is written."""
        _check_images(self.recipe.inputs, "inputs")

    def fit(self) -> Decomposition:
        """Fit the method on the recipe's inputs; the result is bound to this backbone."""
        self.check_inputs()
        self.runtime.seed_everything()
        if self._backbone is None:
            with self.runtime.phase("build"):
                backbone = self.backbone
        backbone = self.backbone
        with self.runtime.phase("fit"):
            decomposition = self.method.fit(backbone, self.recipe.inputs, self.runtime)
        free_cuda_memory()  # CUDA graphs, optimiser states and activations of training are gone: hand them back
        # finished LoRAs in the dtype users expect (fp16 / the run's bf16); checkpoints keep fp32 for resume
        decomposition.files = cast_lora_files(decomposition.files, self.runtime.lora_dtype)
        decomposition.recipe = self.recipe.to_dict()
        return decomposition.bind(self.method, backbone)

    # ------------------------------------------------------------------------------ full run
    def _check_flags(self) -> None:
        """Errors of ``--resume`` / ``--overwrite`` / ``output_dir`` that need no lock (nothing is written)."""
        out = self.output_dir
        if self.runtime.resume and self.overwrite:
            raise UserError("--resume", "--resume and --overwrite were both given", "pass one of them")
        if out.exists() and not out.is_dir():
            raise UserError("runtime.output_dir", f"{out} is a file", "expected a folder (or a new path)")
        if self.runtime.resume and not out.exists():
            raise UserError("--resume", f"{out} holds no checkpoints to resume from",
                            "expected the runtime.output_dir of an interrupted run (with runtime.checkpoint_every > 0);"
                            " drop --resume to start it")

    def _prepare_output_dir(self) -> None:
        """Decide what to do with the (locked) output folder: start, resume, replace or refuse."""
        out = self.output_dir
        finished = (out / "decomposition" / MANIFEST).is_file()
        checkpoints = has_checkpoints(out)
        if self.runtime.resume and not (checkpoints or finished):
            raise UserError("--resume", f"{out} holds no checkpoints to resume from",
                            "expected the runtime.output_dir of an interrupted run (with runtime.checkpoint_every > 0);"
                            " drop --resume to start it")
        if self.overwrite:
            clear_folder(out, keep=(LOCK_NAME,))
            return
        if finished and not self.runtime.resume:
            raise UserError("runtime.output_dir", f"{out} holds a finished run",
                            "pass --overwrite to replace it, or set another runtime.output_dir")
        if self.runtime.resume:
            return
        entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
        if not entries:
            return
        if not checkpoints and (out / "run.json").is_file():
            # a run that ended (or died: this process holds the lock) before its first checkpoint
            log.info("%s holds a run that ended before its first checkpoint; starting it again", out)
            clear_folder(out, keep=(LOCK_NAME,))
            return
        what = "an unfinished run" if checkpoints else "files"
        raise UserError("runtime.output_dir", f"{out} already holds {what}",
                        "pass --resume to continue it or --overwrite to start over")

    def _grid(self, rows: list, labels: list[tuple[str, str]]) -> Any:
        """grid.png: one row per prompt, labelled with its use and prompt, the use's input image first."""
        from .evaluate import run_inputs
        from .io import labeled_grid

        try:
            refs = run_inputs(self.recipe.to_dict()).references
            first = {use: load_image(paths[0], f"inputs ({paths[0]})") for use, paths in refs.items() if paths}
        except Exception as exc:  # no input image to show: the grid still gets its labels
            log.debug("grid: no input image (%s)", exc)
            first = {}
        side = max(im.height for r in rows for im in r)
        thumbs = {u: im.resize((max(1, round(im.width * side / im.height)), side)) for u, im in first.items() if im}
        inputs = [thumbs.get("style" if use == "style" else "content") for use, _ in labels]
        return labeled_grid(rows, [f"{use}: {prompt}" for use, prompt in labels], inputs)

    def _write_report(self) -> None:
        from .report import write_run_report

        try:
            write_run_report(self.output_dir)
        except Exception as exc:  # a report must never fail a finished run
            log.warning("could not write report.html: %s", exc)

    def run(self) -> RunResult:
        """Fit, save ``decomposition/``, sample every prompt of ``generate:`` and write ``grid.png``.

        The output folder is locked for the life of the run (:class:`~cstoolkit.lock.FolderLock`); a
        run that fails or is interrupted records ``failed`` / ``interrupted`` in ``run.json``.
        """
        self.check_inputs()
        self.runtime.check_device()
        self._check_flags()
        out = self.output_dir
        created = not out.exists()
        make_writable_dir(out, "runtime.output_dir")
        lock = FolderLock(out)
        started = False
        try:
            lock.acquire()
            self._prepare_output_dir()
            started = True
            return self._run(out)
        except OSError as exc:
            inside = exc.filename is not None and Path(str(exc.filename)).resolve().is_relative_to(out.resolve())
            if exc.errno not in DISK_ERRORS or not (inside or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
                raise  # not about writing the output folder
            raise UserError("runtime.output_dir", f"cannot write {exc.filename or out} ({exc.strerror})",
                            "free disk space or choose another runtime.output_dir; --resume continues from the last "
                            "checkpoint") from None
        finally:
            lock.release()
            if created and not started:
                with contextlib.suppress(OSError):
                    out.rmdir()  # refused before anything was written: leave no empty folder behind

    def _run(self, out: Path) -> RunResult:
        self.runtime.write_logs = True
        self.runtime.phases.path = out / "phases.json"
        write_json(out / "run.json", {"status": "running", "pid": os.getpid()})
        (out / "recipe.yaml").write_text(self.recipe.to_yaml())
        try:
            decomposition = self.fit()
            with self.runtime.phase("save"):
                decomposition.save(out / "decomposition")
            result = RunResult(out, decomposition)
            rows, labels = [], []
            spec = self.recipe.generate
            seed = spec.seed if spec.seed is not None else self.recipe.runtime.seed
            for use, prompts in spec.prompts.items():
                with self.runtime.phase(f"sample/{use}"):
                    images = self.method.generate(self.backbone, decomposition, prompts, use,
                                                  num_images=spec.num_images, seed=seed, options=spec.options,
                                                  progress=self.runtime.config.progress)
                with self.runtime.phase(f"write/{use}"):
                    for prompt, ims in zip(prompts, images):
                        folder = out / "samples" / use / slugify(prompt)
                        paths = []
                        for i, im in enumerate(ims):
                            save_image(im, folder / f"{i}.png")
                            paths.append(folder / f"{i}.png")
                        result.samples.setdefault(use, {})[prompt] = paths
                        rows.append(ims)
                        labels.append((use, prompt))
            with self.runtime.phase("grid_and_report"):
                if rows:
                    result.grid = out / "grid.png"
                    save_image(self._grid(rows, labels), result.grid)
                write_json(out / "run.json", {"status": "finished"})
                self._write_report()
            return result
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            with contextlib.suppress(Exception):  # the folder may be what failed (full disk)
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                write_json(out / "run.json", {"status": status, "error": error[:500]})
            raise
        finally:
            self.runtime.close()

