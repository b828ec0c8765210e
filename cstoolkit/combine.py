"""Cross-combination: the content of one decomposition with the style of another.

``cstoolkit generate --content RUN_A --style RUN_B --prompt "A <c> in <s> style"``. Each method says
what its content and style parts are (:meth:`Method.part`) and how it generates from a content part
joined with a style part (:meth:`Method.combine`); here only the generic checks and loading live.
"""

from __future__ import annotations

from pathlib import Path

from .decomposition import Decomposition
from .errors import UserError

__all__ = ["combine"]

#: backbone keys that decide the weights (two decompositions must agree on them)
_WEIGHT_KEYS = ("name", "preset", "pretrained")


def _describe(backbone: dict) -> str:
    return ", ".join(f"{k} {backbone.get(k)}" for k in _WEIGHT_KEYS if backbone.get(k) is not None) or "unknown"


def combine(content: str | Path | None = None, style: str | Path | None = None, *,
            device: str | None = None) -> Decomposition:
    """A decomposition that generates with the content of ``content`` and the style of ``style``.

    Either may be ``None`` (then the other decomposition is returned as it is). Both must have been
    fitted on the same backbone weights by methods of the same family; the content's method generates.
    """
    if content is None and style is None:
        raise UserError("generate", "neither --content nor --style was given", "expected at least one decomposition")
    if style is None:
        return Decomposition.load(content, device=device, where="--content")  # type: ignore[arg-type]
    if content is None:
        return Decomposition.load(style, device=device, where="--style")
    dec_c = Decomposition.load(content, device=device, where="--content")
    dec_s = Decomposition.load(style, device=device, where="--style")
    bb_c, bb_s = dec_c.recipe.get("backbone") or {}, dec_s.recipe.get("backbone") or {}
    if any(bb_c.get(k) != bb_s.get(k) for k in _WEIGHT_KEYS):
        raise UserError("--style", f"{style} was fitted on another backbone ({_describe(bb_s)}) than {content} "
                        f"({_describe(bb_c)})", "expected two decompositions of the same backbone weights")
    method_c, method_s = dec_c.method_impl, dec_s.method_impl
    families_c = set(method_c.families or (method_c.family,))
    if not families_c & set(method_s.families or (method_s.family,)):
        raise UserError("--style", f"{dec_s.method} ({method_s.family}) cannot lend its style to {dec_c.method} "
                        f"({method_c.family})", f"expected a style from a {method_c.family} method")
    joined = method_c.combine(method_c.part(dec_c, "content"), method_s.part(dec_s, "style"))
    joined.recipe = dec_c.recipe
    joined._method = method_c
    return joined
