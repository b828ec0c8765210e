"""Registry of methods and backbones.

Plugins register themselves with :func:`register_method` / :func:`register_backbone` when their
module is imported. Discovery imports every module of the ``cstoolkit.methods`` and
``cstoolkit.backbones`` packages and every entry point of the groups of the same names, so another
package can add a plugin without editing this one. The core names no plugin.

In a source checkout used without installing it (the checkout on ``PYTHONPATH``), the plugin
packages are not where their import names say (``cstoolkit.methods`` lives in ``methods/``): the
mapping is read from the checkout's ``setup.cfg`` (``package_dir``) and served by a small import
finder, so the built-in plugins register there too.
"""

from __future__ import annotations

import configparser
import difflib
import importlib
import importlib.abc
import importlib.util
import logging
import pkgutil
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
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
#: why a built-in plugin package could not be imported (said when nothing is registered)
_import_failures: dict[str, str] = {}

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


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports the packages a source checkout maps to other folders (``setup.cfg`` ``package_dir``)."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def checkout_package_dirs() -> dict[str, Path]:
    """``{package: folder}`` of the ``package_dir`` in the ``setup.cfg`` next to this package's folder
    (a source checkout); empty when there is none (an installed package)."""
    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    try:
        if not cfg.read(root / "setup.cfg", encoding="utf-8"):
            return {}
    except configparser.Error:
        return {}
    out = {}
    for line in cfg.get("options", "package_dir", fallback="").splitlines():
        name, sep, folder = (x.strip() for x in line.partition("="))
        if sep and name.startswith(__package__ + ".") and (root / folder / "__init__.py").is_file():
            out[name] = root / folder
    return out


def _use_checkout_layout() -> bool:
    """Install the checkout finder (once) when the plugin packages are not importable as they are."""
    if any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        return False
    folders = checkout_package_dirs()
    if not folders:
        return False
    sys.meta_path.append(_CheckoutFinder(folders))
    importlib.invalidate_caches()
    return True


def _import_package(package: str) -> ModuleType | None:
    """``package`` imported (through the checkout layout when it is not installed), or ``None`` with
    the reason kept in ``_import_failures``."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name != package or not _use_checkout_layout():
            _import_failures[package] = str(exc)
            return None
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        _import_failures[package] = str(exc)
        return None


def _import_package_modules(package: str) -> None:
    pkg = _import_package(package)
    if pkg is None:
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


def nothing_registered(group: str = METHOD_GROUP) -> str:
    """Why no plugin of ``group`` is registered, in one line (instead of an empty list of names)."""
    why = _import_failures.get(group)
    kind = "method" if group == METHOD_GROUP else "backbone"
    return (f"no {kind} is registered at all: the package {group} "
            + (f"could not be imported ({why})" if why else "registered none")
            + f" and no installed package adds one (entry point group {group}); "
            "install cstoolkit (pip install -e .) or run from its source checkout")


def require_any(group: str = METHOD_GROUP, where: str = "") -> None:
    """A :class:`UserError` saying why (:func:`nothing_registered`) when no plugin of ``group`` is registered."""
    discover()
    if not (_METHODS if group == METHOD_GROUP else _BACKBONES):
        raise UserError(where, nothing_registered(group))


def _suggest(name: str, choices: list[str], group: str = METHOD_GROUP) -> str:
    if not choices:
        return nothing_registered(group)
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
        raise UserError(where, f"unknown backbone '{name}'", _suggest(name, list(_BACKBONES), BACKBONE_GROUP))
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
