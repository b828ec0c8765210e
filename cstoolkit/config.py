"""Strict, typed parsing of dict data (YAML) into dataclasses.

Unknown keys and wrong types raise :class:`~cstoolkit.errors.UserError` naming the key path and
the nearest valid key. Field metadata adds checks: ``min`` / ``max`` bounds and ``path`` (a
filesystem path resolved against a base directory).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import UserError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_value(tp: Any, value: Any, where: str, base_dir: Path | None = None) -> Any:
    """Convert ``value`` to type ``tp`` or raise a UserError at ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(arg, value, where, base_dir)
            except UserError as exc:
                errors.append(exc)
        raise UserError(where, f"got {_describe(value)}", f"expected {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off, yes/no as true/false
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            named = [w for w in words if w in get_args(tp)]
            if len(named) == 1:
                return named[0]
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise UserError(where, f"got {_describe(value)}", f"expected one of {', '.join(map(repr, get_args(tp)))}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(where, f"got {_describe(value)}", "expected a mapping")
        return from_dict(tp, value, where, base_dir)  # type: ignore[arg-type]
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise UserError(where, f"got {_describe(value)}", f"expected {_type_name(tp)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(where, f"got {len(value)} items", f"expected {len(args)}")
            items = [parse_value(a, v, f"{where}[{i}]", base_dir) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [parse_value(item_tp, v, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(where, f"got {_describe(value)}", "expected a mapping")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): parse_value(val_tp, v, f"{where}.{k}", base_dir) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(where, f"got {_describe(value)}", "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(where, f"got {_describe(value)}", "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-5" as a string
            except ValueError:
                pass
        raise UserError(where, f"got {_describe(value)}", "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(where, f"got {_describe(value)}", "expected a string")
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(where, f"got {_describe(value)}", "expected a path")
        return Path(value)
    return value


def _check_bounds(field: dataclasses.Field, value: Any, where: str) -> None:
    lo = field.metadata.get("min")
    hi = field.metadata.get("max")
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if lo is not None and item < lo:
            raise UserError(where, f"got {item}", f"expected a value >= {lo}")
        if hi is not None and item > hi:
            raise UserError(where, f"got {item}", f"expected a value <= {hi}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", base_dir: Path | None = None) -> T:
    """Build dataclass ``cls`` from ``data`` strictly; defaults fill what is missing.

    Fields with ``metadata={"path": True}`` are resolved against ``base_dir`` when relative.
    """
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            expected = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields) or 'none'}"
            raise UserError(f"{prefix}{key}", "unknown key", expected)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise UserError(f"{prefix}{name}", "missing", f"expected {_type_name(hints[name])}")
            continue
        value = parse_value(hints[name], data[name], f"{prefix}{name}", base_dir)
        _check_bounds(field, value, f"{prefix}{name}")
        if field.metadata.get("path") and value is not None:
            resolved = resolve_path(value, base_dir)
            # a hub id ("org/name") stays as written unless such a local folder exists
            keep = field.metadata.get("hub_id") and _looks_like_hub_id(value) and not Path(resolved).exists()
            value = value if keep else resolved
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(where or cls.__name__, str(exc)) from exc


def _looks_like_hub_id(value: Any) -> bool:
    text = str(value)
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1 and "\\" not in text


def resolve_path(value: Any, base_dir: Path | None) -> Any:
    """Resolve a relative path (or each path of a list) against ``base_dir``."""
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_path(v, base_dir) for v in value)
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return os.path.normpath(path)


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain YAML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def field_(default: Any = dataclasses.MISSING, *, help: str = "", **meta: Any) -> Any:
    """``dataclasses.field`` with a help text and checks (``min``, ``max``, ``path``, ``hub_id``).

    ``path=True`` resolves a relative path against the recipe's folder; with ``hub_id=True`` a
    value shaped like ``org/name`` that is not a local folder is kept as a hub id.
    """
    metadata = {"help": help, **meta}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, type(value)(value)), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
