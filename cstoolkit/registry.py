"""Registry of methods and backbones.

Plugins register themselves with :func:`register_method` / :func:`register_backbone` when their
module is imported. Discovery imports every module of the ``cstoolkit.methods`` and
``cstoolkit.backbones`` packages and every entry point of the groups of the same names, so another
package can add a plugin without editing this one. The core names no plugin.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from importlib import metadata
from typing import TYPE_CHECKING, TypeVar

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .backbone import Backbone
    from .method import Method

log = logging.getLogger(__name__)

METHOD_GROUP = "cstoolkit.methods"
BACKBONE_GROUP = "cstoolkit.backbones"

_METHODS: dict[str, type["Method"]] = {}
_BACKBONES: dict[str, type["Backbone"]] = {}
_discovered = False

T = TypeVar("T")


def register_method(cls: type[T]) -> type[T]:
    """Class decorator: make a :class:`~cstoolkit.method.Method` available by its ``name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no 'name'")
    _METHODS[name] = cls  # type: ignore[assignment]
    return cls


def register_backbone(cls: type[T]) -> type[T]:
    """Class decorator: make a :class:`~cstoolkit.backbone.Backbone` available by its ``name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no 'name'")
    _BACKBONES[name] = cls  # type: ignore[assignment]
    return cls


def _import_package_modules(package: str) -> None:
    try:
        pkg = importlib.import_module(package)
    except ImportError:  # pragma: no cover - the package is part of this distribution
        return
    for info in pkgutil.iter_modules(pkg.__path__, prefix=package + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(info.name)


def _load_entry_points(group: str) -> None:
    for ep in metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the toolkit
            log.warning("could not load plugin %s from entry point group %s: %s", ep.name, group, exc)
            continue
        registry = _METHODS if group == METHOD_GROUP else _BACKBONES
        name = getattr(obj, "name", None)
        if isinstance(obj, type) and name and name not in registry:
            registry[name] = obj


def discover() -> None:
    """Import the built-in plugin packages and entry points (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    _import_package_modules(BACKBONE_GROUP)
    _import_package_modules(METHOD_GROUP)
    _load_entry_points(BACKBONE_GROUP)
    _load_entry_points(METHOD_GROUP)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}known: {', '.join(sorted(choices))}"


def get_method(name: str, where: str = "method") -> type["Method"]:
    """The method class registered as ``name``; a :class:`UserError` names the nearest one."""
    discover()
    if name not in _METHODS:
        raise UserError(where, f"unknown method '{name}'", _suggest(name, list(_METHODS)))
    return _METHODS[name]


def get_backbone(name: str, where: str = "backbone.name") -> type["Backbone"]:
    """The backbone class registered as ``name``."""
    discover()
    if name not in _BACKBONES:
        raise UserError(where, f"unknown backbone '{name}'", _suggest(name, list(_BACKBONES)))
    return _BACKBONES[name]


def methods() -> dict[str, type["Method"]]:
    """All registered methods by name (sorted)."""
    discover()
    return dict(sorted(_METHODS.items()))


def backbones() -> dict[str, type["Backbone"]]:
    """All registered backbones by name (sorted)."""
    discover()
    return dict(sorted(_BACKBONES.items()))


def supports(method: type["Method"], backbone: str, backbone_cls: type["Backbone"] | None = None) -> bool:
    """Whether ``method`` runs on the backbone named ``backbone``: its family is one the method declares
    (``families`` or ``family``) and, where the method lists ``backbones``, the name is one of them."""
    cls = backbone_cls or get_backbone(backbone)
    families = method.families or (method.family,)
    return cls.family in families and (not method.backbones or backbone in method.backbones)


def supported_backbones(method: type["Method"]) -> list[str]:
    """Names of the registered backbones ``method`` runs on."""
    return [n for n, c in backbones().items() if supports(method, n, c)]
