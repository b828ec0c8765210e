"""The method contract: what every decomposition / personalisation plugin implements.

A method is a class registered with :func:`cstoolkit.registry.register_method` that declares

* ``name``, ``summary`` (one line), ``paper`` (citation/URL), ``family`` (backbone family it runs on);
* ``Config``: dataclass of its hyper-parameters (the recipe's ``params``) with the paper's defaults;
* ``Inputs``: dataclass of what the user gives (the recipe's ``inputs``: images, words);
* ``GenerateConfig``: dataclass of sampling options (the recipe's ``generate`` section, beyond the
  prompt lists);

and implements :meth:`Method.fit` and :meth:`Method.generate`. Cross-combination (``cstoolkit
generate --content A --style B``) uses :meth:`Method.part` and :meth:`Method.combine`, whose defaults
work for decompositions that keep each role's files under ``content/`` and ``style/``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .backbone import Backbone
    from .decomposition import Decomposition
    from .runtime import Runtime

Use = Literal["content", "style", "both"]
USES: tuple[str, ...] = ("content", "style", "both")

CONTENT_TOKEN = "<c>"
STYLE_TOKEN = "<s>"


@dataclass
class NoConfig:
    """For methods without hyper-parameters or inputs."""


@dataclass
class GenerateConfig:
    """Sampling options shared by the diffusion methods (``generate:`` in a recipe)."""

    steps: int = field(default=30, metadata={"min": 1, "help": "denoising steps"})
    guidance_scale: float = field(default=7.0, metadata={"min": 0.0, "help": "classifier-free guidance"})
    height: int | None = field(default=None, metadata={"min": 64, "help": "default: backbone resolution"})
    width: int | None = field(default=None, metadata={"min": 64, "help": "default: backbone resolution"})
    negative_prompt: str | None = field(default=None, metadata={"help": "SDXL: what the guidance steers away from"})


class Method:
    """Base class of every method plugin."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = ""
    #: backbone families this method runs on when more than one (default: ``(family,)``)
    families: ClassVar[tuple[str, ...]] = ()
    #: backbone names this method supports; empty = every backbone of ``family``.
    backbones: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type] = NoConfig
    Inputs: ClassVar[type] = NoConfig
    GenerateConfig: ClassVar[type] = GenerateConfig
    #: does ``fit`` train (and so checkpoint/resume) or only record references?
    trains: ClassVar[bool] = True
    #: the uses this method can generate for (``content``, ``style``, ``both``)
    uses: ClassVar[tuple[str, ...]] = USES

    @classmethod
    def default_use(cls) -> str:
        """``both`` where the method has it, else its only use."""
        return "both" if "both" in cls.uses else cls.uses[0]

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    # ---------------------------------------------------------------------------------------
    def fit(self, backbone: "Backbone", inputs: Any, runtime: "Runtime") -> "Decomposition":
        """Learn (or record) the content and style representations of ``inputs``."""
        raise NotImplementedError

    def generate(
        self,
        backbone: "Backbone",
        decomposition: "Decomposition",
        prompts: Sequence[str],
        use: str,
        *,
        num_images: int = 1,
        seed: int = 0,
        options: Any = None,
        progress: bool = True,
    ) -> list[list["Image.Image"]]:
        """Images for each prompt (``num_images`` each) using the content, the style or both."""
        raise NotImplementedError

    # --------------------------------------------------------------------- cross-combination
    def part(self, decomposition: "Decomposition", role: str) -> "Decomposition":
        """The ``role`` (``content`` or ``style``) part of one of this method's decompositions.

        Default: the files under ``<role>/``, the role's placeholder, the method's meta and recipe.
        """
        token = CONTENT_TOKEN if role == "content" else STYLE_TOKEN
        files = {rel: t for rel, t in decomposition.files.items() if rel.startswith(f"{role}/")}
        if not files or token not in decomposition.placeholders:
            raise UserError(f"--{role}", f"a {decomposition.method} decomposition has no {role} part",
                            f"expected a decomposition with {role} files ({role}/...) and a {token} placeholder")
        # a copy of the same class (this module does not import decomposition: it sits below it)
        return dataclasses.replace(decomposition, files=files, placeholders={token: decomposition.placeholders[token]},
                                   meta=dict(decomposition.meta),
                                   file_metadata={k: v for k, v in decomposition.file_metadata.items() if k in files},
                                   _backbone=None, _method=None)

    def combine(self, content: "Decomposition", style: "Decomposition") -> "Decomposition":
        """A decomposition this method generates from, made of the ``content`` part of one decomposition
        and the ``style`` part of another (both from :meth:`part`, the style possibly of another method).

        Default: the two parts side by side; the result runs on the content part's recipe.
        """
        def origin(d: "Decomposition") -> dict[str, Any]:
            return {"method": d.method, "path": None if d.path is None else str(d.path)}

        return dataclasses.replace(content, method=self.name, files={**content.files, **style.files},
                                   placeholders={**content.placeholders, **style.placeholders},
                                   meta={"combined": {"content": origin(content), "style": origin(style)}},
                                   recipe=content.recipe, path=None,
                                   file_metadata={**content.file_metadata, **style.file_metadata},
                                   _backbone=None, _method=None)

    # ---------------------------------------------------------------------------------------
    def required_placeholders(self, use: str) -> tuple[str, ...]:
        """Placeholders a prompt for ``use`` must contain (``<c>`` for content, ``<s>`` for style)."""
        return {"content": (CONTENT_TOKEN,), "style": (STYLE_TOKEN,), "both": (CONTENT_TOKEN, STYLE_TOKEN)}[use]

    def check_prompts(self, prompts: Sequence[str], use: str, where: str = "prompt") -> None:
        """Raise a :class:`UserError` if ``use`` is unknown or a prompt lacks a placeholder."""
        if use not in USES:
            raise UserError(where.rsplit(".", 1)[0] if "." in where else "use", f"unknown use '{use}'",
                            "expected content, style or both")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{where}[{i}]", "empty prompt", "expected text")
            for token in self.required_placeholders(use):
                if token not in prompt:
                    raise UserError(
                        f"{where}[{i}]" if len(prompts) > 1 or "." in where else where,
                        f"'{prompt}' has no {token} placeholder",
                        f"a {use} prompt must contain {' and '.join(self.required_placeholders(use))}",
                    )


#: what a placeholder looks like in a prompt: ``<c>``, ``<s>``, ``<x>`` (no spaces or angle brackets inside)
PLACEHOLDER = re.compile(r"<[^<>\s]+>")


def check_placeholders(prompt: str, placeholders: Mapping[str, str], where: str = "prompt",
                       sources: Mapping[str, str] | None = None) -> None:
    """Raise a :class:`UserError` if ``prompt`` holds a placeholder that ``placeholders`` does not
    supply (it would reach the model as text). ``sources`` says, per placeholder, what supplies it."""
    have = ", ".join(placeholders) or "none"
    for token in PLACEHOLDER.findall(prompt):
        if token in placeholders:
            continue
        if token in (CONTENT_TOKEN, STYLE_TOKEN):
            role = "content" if token == CONTENT_TOKEN else "style"
            source = (sources or {}).get(token) or f"a decomposition with a {role} part"
            raise UserError(where, f"{token} (the {role}) stands for nothing here (given: {have})",
                            f"{token} comes from {source}; give it or take {token} out of the prompt")
        raise UserError(where, f"unknown placeholder {token}",
                        f"expected {CONTENT_TOKEN} (the content) or {STYLE_TOKEN} (the style); given here: {have}")


def expand_placeholders(prompt: str, placeholders: dict[str, str]) -> str:
    """Replace ``<c>``/``<s>`` (and any other registered placeholder) by its trigger phrase."""
    if not placeholders:
        return prompt
    pattern = re.compile("|".join(re.escape(k) for k in sorted(placeholders, key=len, reverse=True)))
    return pattern.sub(lambda m: placeholders[m.group(0)], prompt)
