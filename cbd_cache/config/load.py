"""Loading a pipeline: the TOML file, then `--set section.field=value` overrides, checked against the schema.

Every bad key or value raises `ConfigError` with a one-line message that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from cbd_cache.config.checks import validate
from cbd_cache.config.schema import DEFAULT_PIPELINE, SECTIONS, TABLES, Config, TeacherCfg
from cbd_cache.errors import ConfigError


# ----------------------------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (1, 0.2, true, "s", [1, 2]), else a bare string or list of them."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [s.strip().strip("'\"") for s in inner.split(",")] if inner else []
    return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, for example student.alpha=0.2")
    key, _, value = item.partition("=")
    return key.strip(), parse_value(value.strip())


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.field` (or `teachers.<name>.field`) in the raw TOML dict, checking the key exists."""
    parts = key.split(".")
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}: no section {section!r}{_suggest(section, SECTIONS)}")
    if section == "teachers":
        entries = raw.setdefault("teachers", [])
        names = [e.get("name") for e in entries]
        if len(parts) == 2 and isinstance(value, dict):     # teachers.<name>={type = "data_aug", seed = 5}
            if parts[1] in names:
                entries[names.index(parts[1])].update(value)
            else:
                entries.append({**value, "name": parts[1]})
            return
        if len(parts) != 3:
            raise ConfigError(f"unknown config key {key!r}: use teachers.<name>.<field>, teacher.<field>, or "
                              "teachers.<name>={field = value, ...} to add a teacher")
        if parts[1] not in names:
            raise ConfigError(f"unknown config key {key!r}: no teacher named {parts[1]!r}{_suggest(parts[1], names)}")
        _check_field(TeacherCfg, key, parts[2])
        entries[names.index(parts[1])][parts[2]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}: expected section.field")
    _check_field(typing.get_type_hints(Config)[section], key, parts[1])
    raw.setdefault(section, {})[parts[1]] = value


def _check_field(cls: type, key: str, name: str) -> None:
    names = _field_names(cls)
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}{_suggest(name, names)}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(key, v, item_hint) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise AssertionError(f"unhandled type {hint} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """Dataclass `cls` from a raw TOML table; unknown keys and wrong types raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    for k in raw:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}.{k}'{_suggest(k, names)}")
    obj = copy.deepcopy(base) if base is not None else cls()
    for k, v in raw.items():
        setattr(obj, k, _coerce(f"{prefix}.{k}", v, hints[k]))
    return obj


# ---------------------------------------------------------------------------------------- loading
def load_config(path: str | Path = DEFAULT_PIPELINE, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a pipeline TOML, apply `key=value` overrides in order, validate, and return the Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--pipeline {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--pipeline {path}: not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, *parse_override(item))
    for k in raw:
        if k not in SECTIONS:
            raise ConfigError(f"unknown config key {k!r} in {path}{_suggest(k, SECTIONS)}")
    cfg = Config(source=str(path), overrides=list(overrides))
    for name in TABLES:
        setattr(cfg, name, _build(type(getattr(cfg, name)), raw.get(name, {}), name))
    teachers = raw.get("teachers", [])
    if not isinstance(teachers, list):
        raise ConfigError("teachers: expected [[teachers]] entries")
    cfg.teachers = [_build(TeacherCfg, t, f"teachers[{i}]", base=cfg.teacher) for i, t in enumerate(teachers)]
    if not cfg.pipeline.name:
        cfg.pipeline.name = path.stem
    validate(cfg)
    return cfg
