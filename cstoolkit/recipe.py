"""Recipes: YAML files that say which method runs on which backbone, with what inputs and settings.

```yaml
method: unziplora
backbone: {name: sdxl, preset: tiny}
inputs: {image: examples/balloon.png, content: balloon, style: isometric illustration}
params: {rank: 64, steps: 600}
generate: {content: ["A <c> on the beach"], num_images: 2}
runtime: {seed: 0, output_dir: runs/unziplora-balloon}
```

Loading is strict: an unknown key or a wrong type is a :class:`UserError` naming the key path and
the nearest valid key. Relative input paths resolve against the recipe's folder; ``output_dir``
against the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import registry
from .backbone import Backbone, BackboneConfig
from .config import from_dict, to_dict
from .errors import UserError
from .method import USES, Method
from .runtime import Runtime as RuntimeType
from .runtime import RuntimeConfig

SECTIONS = ("method", "backbone", "inputs", "params", "generate", "runtime")
GENERATE_KEYS = ("content", "style", "both", "num_images", "seed")


@dataclass
class GenerateSpec:
    """The recipe's ``generate:`` section: prompts per use, count, seed and sampling options."""

    prompts: dict[str, list[str]] = field(default_factory=dict)
    num_images: int = 1
    seed: int | None = None
    options: Any = None


@dataclass
class Recipe:
    """A validated recipe, with its plugin classes resolved."""

    method_cls: type[Method]
    backbone_cls: type[Backbone]
    backbone: BackboneConfig
    inputs: Any
    params: Any
    generate: GenerateSpec
    runtime: RuntimeConfig
    source: Path | None = None

    @property
    def method(self) -> str:
        return self.method_cls.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what ``show-recipe`` prints and runs store)."""
        gen: dict[str, Any] = {u: list(p) for u, p in self.generate.prompts.items()}
        gen["num_images"] = self.generate.num_images
        if self.generate.seed is not None:
            gen["seed"] = self.generate.seed
        gen.update(to_dict(self.generate.options) or {})
        return {
            "method": self.method,
            "backbone": to_dict(self.backbone),
            "inputs": to_dict(self.inputs),
            "params": to_dict(self.params),
            "generate": gen,
            "runtime": to_dict(self.runtime),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping; errors name the file and the line."""
    p = Path(path)
    if p.is_dir():
        raise UserError(str(p), "is a folder", "expected a path to a YAML recipe file")
    if not p.is_file():
        raise UserError(str(p), "recipe file not found", "expected a path to a YAML recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(str(p), "not a UTF-8 text file", "expected a YAML recipe") from None
    except OSError as exc:
        raise UserError(str(p), f"cannot read the recipe ({exc.strerror or exc})", "expected a readable YAML file") \
            from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(where, f"invalid YAML ({getattr(exc, 'problem', None) or exc})", "expected a YAML mapping") \
            from None
    if not isinstance(data, dict):
        raise UserError(str(p), "the recipe is not a mapping", f"expected keys {', '.join(SECTIONS)}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError("--set", f"'{item}' has no '='", "expected KEY.PATH=VALUE, e.g. params.steps=50")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError("--set", f"'{item}' has an empty key", "expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError("--set " + ".".join(parts[: i + 1]), "is not a mapping", f"cannot set {key}")
            node = child
        node[parts[-1]] = value
    return out


def _unknown(where: str, key: str, valid: Sequence[str]) -> UserError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return UserError(f"{where}.{key}" if where else key, "unknown key", hint)


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(name, f"got {value!r}", "expected a mapping")
    return value


def parse_recipe(data: dict[str, Any], base_dir: str | Path | None = None, source: Path | None = None) -> Recipe:
    """Validate a recipe mapping against the registered method and backbone."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in data:
        if key not in SECTIONS:
            raise _unknown("", str(key), SECTIONS)
    if "method" not in data:
        raise UserError("method", "missing", "expected the name of a method (see `cstoolkit list-methods`)")
    if not isinstance(data["method"], str):
        raise UserError("method", f"got {data['method']!r}", "expected a method name")
    method_cls = registry.get_method(data["method"])

    bb = _section(data, "backbone")
    if "name" not in bb:
        raise UserError("backbone.name", "missing", "expected a backbone name (see `cstoolkit list-backbones`)")
    if not isinstance(bb["name"], str):
        raise UserError("backbone.name", f"got {bb['name']!r}", "expected a backbone name")
    backbone_cls = registry.get_backbone(bb["name"])
    if not registry.supports(method_cls, bb["name"], backbone_cls):
        raise UserError("backbone.name", f"method '{method_cls.name}' does not run on '{bb['name']}'",
                        f"expected one of: {', '.join(registry.supported_backbones(method_cls))}")
    backbone_cfg = from_dict(backbone_cls.Config, bb, "backbone", base)
    if backbone_cfg.preset is not None and backbone_cfg.preset not in backbone_cls.presets:
        close = difflib.get_close_matches(backbone_cfg.preset, list(backbone_cls.presets), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError("backbone.preset", f"unknown preset '{backbone_cfg.preset}' for {bb['name']}",
                        f"{hint}known: {', '.join(backbone_cls.presets)}")

    inputs = from_dict(method_cls.Inputs, _section(data, "inputs"), "inputs", base)
    params = from_dict(method_cls.Config, _section(data, "params"), "params", base)
    generate = parse_generate(method_cls, _section(data, "generate"))
    runtime = from_dict(RuntimeConfig, _section(data, "runtime"), "runtime", None)
    return Recipe(method_cls, backbone_cls, backbone_cfg, inputs, params, generate, runtime, source)


def parse_generate(method_cls: type[Method], section: dict[str, Any]) -> GenerateSpec:
    """Check the ``generate:`` section: prompt lists (with their placeholders), count, options."""
    option_keys = [f.name for f in dataclasses.fields(method_cls.GenerateConfig)]
    for key in section:
        if key not in GENERATE_KEYS and key not in option_keys:
            raise _unknown("generate", str(key), list(GENERATE_KEYS) + option_keys)
    spec = from_dict(_GenerateBase, {k: v for k, v in section.items() if k in GENERATE_KEYS}, "generate")
    method = method_cls.__new__(method_cls)  # placeholder rules need no config
    prompts: dict[str, list[str]] = {}
    for use in USES:
        items = getattr(spec, use)
        if items:
            method.check_prompts(items, use, where=f"generate.{use}")
            prompts[use] = list(items)
    options = from_dict(method_cls.GenerateConfig, {k: v for k, v in section.items() if k in option_keys}, "generate")
    return GenerateSpec(prompts=prompts, num_images=spec.num_images, seed=spec.seed, options=options)


@dataclass
class _GenerateBase:
    content: list[str] = field(default_factory=list)
    style: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)
    num_images: int = field(default=1, metadata={"min": 1})
    seed: int | None = None


# ---------------------------------------------------------------------------------------------
# Building what a resolved recipe names (used by the API and to generate from a saved decomposition)
def build_backbone(recipe: Recipe, runtime: RuntimeType) -> Backbone:
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
    runtime = RuntimeType(recipe.runtime)
    return recipe.method_cls(recipe.params), build_backbone(recipe, runtime)


def generate_options(method: Method, recipe_dict: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The method's sampling options: the recipe's ``generate:`` values, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(method.GenerateConfig)}
    stored = {k: v for k, v in (recipe_dict.get("generate") or {}).items() if k in names}
    for key in overrides:
        if key not in names:
            raise UserError(key, "unknown generation option", f"valid options: {', '.join(sorted(names))}")
    return from_dict(method.GenerateConfig, {**stored, **overrides}, "generate")


def load_recipe(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe from a YAML path or a mapping, apply ``--set`` overrides and validate it."""
    if isinstance(source, dict):
        return parse_recipe(apply_overrides(source, overrides), Path.cwd())
    path = Path(source)
    data = apply_overrides(read_yaml(path), overrides)
    return parse_recipe(data, path.resolve().parent, path)
