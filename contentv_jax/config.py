"""Configs as data: nested dataclasses filled from YAML files and ``key=value`` overrides.

``load_config(Schema, path, overrides)`` reads a YAML mapping into the dataclass ``Schema`` (the
dataclasses hold every default; a YAML file lists only what differs from them, or from the file its
``base:`` key names), then applies dotted overrides such as ``mesh.data=2`` or ``optimizer.lr=1e-4`` (values parsed as YAML
scalars). Unknown keys anywhere are errors naming the full dotted key, raised before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type; the message names the key."""


def configs_dir() -> Path:
    """The directory of the shipped configs (``train/*.yaml``, ``model/*.yaml``).

    An installed wheel carries them as package data in ``contentv_jax/configs`` (the repository's top-level
    ``configs/``, mapped by ``setup.py``); a source checkout or an editable install reads ``configs/`` beside
    the package. Raises FileNotFoundError naming both places when neither exists (a broken install).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "configs", here.parent / "configs")
    for c in candidates:
        if (c / "train").is_dir():
            return c
    raise FileNotFoundError(
        "the shipped configs are missing: looked for " + " and ".join(f"{c}/train" for c in candidates)
        + " (reinstall contentv-jax, or run from a checkout)"
    )


def find_config(name: str | Path, kind: str = "train") -> Path:
    """A config file: ``name`` itself when it exists, else a shipped config of that name.

    ``find_config("stage3")``, ``find_config("stage3.yaml")``, ``find_config("configs/train/stage3.yaml")``
    (the repository path, from any working directory) all give the shipped ``train/stage3.yaml``.

    Raises:
      FileNotFoundError: naming every path looked at.
    """
    path = Path(name)
    if path.is_file():
        return path
    looked = [path]
    parts = path.parts
    if not path.is_absolute():
        rel = Path(*parts[1:]) if parts and parts[0] == "configs" else path
        if len(rel.parts) == 1:
            rel = Path(kind) / rel
        if rel.suffix not in (".yaml", ".yml"):
            rel = rel.with_name(rel.name + ".yaml")
        try:
            shipped = configs_dir() / rel
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config {str(name)!r} not found: looked for {path}; {e}") from None
        if shipped.is_file():
            return shipped
        looked.append(shipped)
    raise FileNotFoundError(f"config {str(name)!r} not found: looked for " + ", ".join(map(str, looked)))


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: {value!r} matches none of {tp}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {typing.get_args(tp)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise :class:`ConfigError`."""
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise ConfigError(
            "unknown config key(s): " + ", ".join(repr(prefix + k) for k in unknown)
            + f" (valid keys under {prefix or 'the top level'!r}: {', '.join(sorted(types_))})"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (for YAML/JSON dumps)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return ``cfg`` with dotted ``key=value`` overrides applied (values parsed as YAML scalars).

    Raises:
      ConfigError: for a malformed override or a key that does not exist (named in full).
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {key!r} (no {'.'.join(parts[: i + 1])!r})")
            if i == len(parts) - 1:
                node[part] = yaml.safe_load(raw) if raw != "" else ""
            else:
                node = node[part]
    return from_dict(type(cfg), data)


BASE_KEY = "base"


def read_yaml_with_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of the YAML file at ``path`` merged onto the file its ``base:`` key names (recursively).

    ``base: other.yaml`` is resolved relative to ``path``'s directory; without ``base`` the file stands
    alone (onto the dataclass defaults). Nested mappings merge key by key; the file's own values win.

    Raises:
      ConfigError: the file is not a mapping, ``base`` is not a string, or bases form a loop.
      FileNotFoundError: ``path`` or a base does not exist.
    """
    path = Path(path).absolute()
    if path in _seen:
        raise ConfigError(f"config file {path}: 'base' loops back: {' -> '.join(str(p) for p in (*_seen, path))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: key 'base' must name a YAML file, got {base!r}")
    parent = read_yaml_with_bases(path.parent / base, (*_seen, path))
    return _merge_yaml(parent, data)


def _merge_yaml(base: Mapping, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge_yaml(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` (if given; with its ``base:`` chain,
    :func:`read_yaml_with_bases`), then by ``overrides``.

    Raises:
      ConfigError: an unknown key (named in full), a bad value, or a bad ``base``.
      FileNotFoundError: ``path`` or a base does not exist.
    """
    cfg = cls()
    if path is not None:
        data = read_yaml_with_bases(path)
        merged = _deep_merge(to_dict(cfg), data, prefix="", cls=cls)
        cfg = from_dict(cls, merged)
    return apply_overrides(cfg, overrides)


def _deep_merge(base: dict, update: Mapping, prefix: str, cls=None) -> dict:
    """``update`` onto ``base`` key by key inside config sections (dataclasses of ``cls``); a field that
    holds a mapping (e.g. ``data.caption_weights``) takes the file's mapping whole."""
    out = dict(base)
    types_ = _field_types(cls) if cls is not None else {}
    for k, v in update.items():
        if k not in base:
            raise ConfigError(f"unknown config key {prefix + k!r}")
        tp = types_.get(k)
        section = _is_dataclass_type(tp) if cls is not None else isinstance(base[k], dict)
        if isinstance(v, Mapping) and isinstance(base[k], dict) and section:
            out[k] = _deep_merge(base[k], v, prefix + k + ".", tp if cls is not None else None)
        else:
            out[k] = v
    return out
