"""Python API: ``Decomposer.from_recipe(...).fit()`` and ``Decomposition.generate(...)``."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .backbone import Backbone
from .config import from_dict
from .decomposition import MANIFEST, Decomposition
from .errors import UserError
from .io import load_image, make_grid, save_image, slugify, write_json
from .method import Method
from .recipe import Recipe, load_recipe, parse_recipe
from .runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["Decomposer", "Decomposition", "RunResult", "build_backbone", "build_from_recipe"]


def build_backbone(recipe: Recipe, runtime: Runtime) -> Backbone:
    """Build the recipe's backbone on the runtime's device, frozen, in the runtime's dtype."""
    dtype = None if recipe.backbone.dtype != "auto" else runtime.weight_dtype
    backbone = recipe.backbone_cls.from_config(recipe.backbone, device=runtime.device, dtype=dtype)
    backbone.freeze()
    return backbone


def build_method(recipe_dict: dict[str, Any]) -> Method:
    """The method object of a resolved recipe (as stored in a manifest)."""
    recipe = parse_recipe(recipe_dict)
    return recipe.method_cls(recipe.params)


def build_from_recipe(recipe_dict: dict[str, Any]) -> tuple[Method, Backbone]:
    """(method, backbone) of a resolved recipe, used to generate from a loaded decomposition."""
    recipe = parse_recipe(recipe_dict)
    runtime = Runtime(recipe.runtime)
    return recipe.method_cls(recipe.params), build_backbone(recipe, runtime)


def generate_options(method: Method, recipe_dict: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The method's sampling options: the recipe's ``generate:`` values, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(method.GenerateConfig)}
    stored = {k: v for k, v in (recipe_dict.get("generate") or {}).items() if k in names}
    for key in overrides:
        if key not in names:
            raise UserError(key, "unknown generation option", f"valid options: {', '.join(sorted(names))}")
    return from_dict(method.GenerateConfig, {**stored, **overrides}, "generate")


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
        backbone = self.backbone
        decomposition = self.method.fit(backbone, self.recipe.inputs, self.runtime)
        decomposition.recipe = self.recipe.to_dict()
        return decomposition.bind(self.method, backbone)

    # ------------------------------------------------------------------------------ full run
    def _prepare_output_dir(self) -> None:
        out = self.output_dir
        if not out.exists():
            return
        if out.exists() and not out.is_dir():
            raise UserError("runtime.output_dir", f"{out} is a file", "expected a folder (or a new path)")
        finished = (out / "decomposition" / MANIFEST).is_file()
        has_checkpoints = (out / "checkpoints").is_dir()
        if self.overwrite:
            shutil.rmtree(out)
            return
        if finished and not self.runtime.resume:
            raise UserError("runtime.output_dir", f"{out} holds a finished run",
                            "pass --overwrite to replace it, or set another runtime.output_dir")
        if self.runtime.resume:
            if not has_checkpoints and not finished:
                log.warning("--resume: %s has no checkpoints; starting from step 0", out)
            return
        if any(out.iterdir()):
            what = "an unfinished run" if has_checkpoints else "files"
            raise UserError("runtime.output_dir", f"{out} already holds {what}",
                            "pass --resume to continue it or --overwrite to start over")

    def run(self) -> RunResult:
        """Fit, save ``decomposition/``, sample every prompt of ``generate:`` and write ``grid.png``."""
        self.check_inputs()
        self._prepare_output_dir()
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        self.runtime.write_logs = True
        write_json(out / "run.json", {"status": "running"})
        (out / "recipe.yaml").write_text(self.recipe.to_yaml())
        try:
            decomposition = self.fit()
            decomposition.save(out / "decomposition")
            result = RunResult(out, decomposition)
            rows = []
            spec = self.recipe.generate
            seed = spec.seed if spec.seed is not None else self.recipe.runtime.seed
            for use, prompts in spec.prompts.items():
                images = self.method.generate(self.backbone, decomposition, prompts, use, num_images=spec.num_images,
                                              seed=seed, options=spec.options, progress=self.runtime.config.progress)
                for prompt, ims in zip(prompts, images):
                    folder = out / "samples" / use / slugify(prompt)
                    paths = []
                    for i, im in enumerate(ims):
                        save_image(im, folder / f"{i}.png")
                        paths.append(folder / f"{i}.png")
                    result.samples.setdefault(use, {})[prompt] = paths
                    rows.append(ims)
            if rows:
                result.grid = out / "grid.png"
                save_image(make_grid(rows), result.grid)
            write_json(out / "run.json", {"status": "finished"})
            return result
        finally:
            self.runtime.close()

