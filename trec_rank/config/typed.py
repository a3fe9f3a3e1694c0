"""Typed config loading: YAML/dicts -> dataclasses, with errors that name the bad key.

Every config object in trec-rank is a dataclass. `from_dict` walks its type hints, so a typo in a
YAML file or a `--set` override fails at load time with the full dotted key (``train.lr``) instead
of surfacing as an AttributeError deep inside training.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A user config problem; the message always names the key (and file when known)."""


def check_min(obj: Any, key: str, low: float, *names: str) -> None:
    """Range checks in post_load: the first of `obj`'s fields `names` below `low` raises, naming `<key>.<name>`."""
    for name in names:
        if getattr(obj, name) < low:
            raise ConfigError(f"{key}.{name}: must be >= {low}, got {getattr(obj, name)}")


def _check(kind: Any, value: Any, key: str) -> Any:
    origin = get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # X | None: the one type's message, and that null is allowed too
            raise ConfigError(errors[0] + (" (or null)" if type(None) in options else ""))
        raise ConfigError(f"{key}: {value!r} matches none of {kind}")
    if origin is Literal:
        if value not in get_args(kind):
            choices = ", ".join(repr(c) for c in get_args(kind))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(kind) or (Any,)
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(kind) or (Any, Any)
        return {_check(kt, k, f"{key}.{k}"): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):  # a hint is a class, never an instance
        return from_dict(kind, value, key)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)  # YAML 1.1 leaves `2e-3` (no dot) a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {kind} at {key}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown or missing keys raise ConfigError."""
    where = prefix or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _check(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
    obj = cls(**kwargs)
    post_load = getattr(obj, "post_load", None)  # cross-field checks and derived defaults
    if post_load is not None:
        post_load(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for manifests, checkpoints and fingerprints): what `from_dict`
    reads back, so fields derived at load (`init=False`: typed params, the source file) are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list | tuple):
        return type(obj)(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config mapping.

    A numeric part indexes a list: `schema.tables.0.embedding_dim=16`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: typing.Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            step: str | int = part
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: '{where}' is not an index of a list of {len(node)}")
                step = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is not a section")
            if last:
                node[step] = yaml.safe_load(raw)
            else:
                if isinstance(node, dict) and node.get(step) is None:
                    node[step] = {}
                node = node[step]
    return data


def read_yaml(path: str | Path) -> dict:
    """Load one YAML mapping with `yaml.safe_load`, naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def beside_config(path: str, config_file: str | Path) -> str:
    """A path from a config file: as given when absolute or present (from the working directory), else
    relative to the config file's directory where it exists there (made absolute, so no consumer re-roots
    it): shipped configs run from the repository root and from anywhere else. A path found in neither
    place stays as written, so the error that it is missing names what the user wrote."""
    beside = Path(config_file).parent / path
    if Path(path).is_absolute() or Path(path).exists() or not beside.exists():
        return path
    return str(beside.absolute())


def load_file(cls: type[T], path: str | Path, overrides: typing.Sequence[str] = (),
              read: typing.Callable[[Path], dict] = read_yaml) -> T:
    """`read` the file, apply `--set key=value` overrides, build `cls` (it has a `source`); errors name file and key."""
    raw = apply_overrides(read(Path(path)), list(overrides))
    try:
        cfg = from_dict(cls, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    cfg.source = str(path)  # type: ignore[attr-defined]
    return cfg
