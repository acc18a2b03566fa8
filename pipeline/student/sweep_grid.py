"""The grid of `lrc sweep`: keys and values from a TOML/YAML file and/or `--set key=v1,v2`, checked against and
coerced to TrainConfig's fields, expanded into points (the cartesian product, in grid order) and named as run dirs."""

from __future__ import annotations

import itertools
import re
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from pipeline.core import options
from pipeline.core.config import load_config_file
from pipeline.core.errors import LrcError
from pipeline.core.train_config import TrainConfig

_NONE = ("none", "null")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def fixed_keys() -> tuple[str, ...]:
    """Where a sweep reads and writes, and how runs start: the same for every point, set on the sweep itself (the
    TrainConfig fields declared `sweepable=False`, pipeline/core/options.py)."""
    return options.fixed_keys(TrainConfig)


def sweep_keys() -> dict[str, Any]:
    """Every TrainConfig field a sweep may vary -> its resolved type."""
    hints, fixed = get_type_hints(TrainConfig), fixed_keys()
    return {f.name: hints[f.name] for f in fields(TrainConfig) if f.name not in fixed}


def _describe(kind: Any) -> str:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):
        return f"{_describe(next(a for a in args if a is not type(None)))} or none"
    if origin is tuple:
        count = "numbers" if args[-1] is Ellipsis else f"{len(args)} numbers"
        return f"{count} joined by ':' (e.g. {'2:4' if args[-1] is Ellipsis else '1:1:3'})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", Path: "a path"}[kind]


def _coerce(value: Any, kind: Any) -> Any:
    """One grid value (text from --set, or a TOML/YAML scalar) as `kind`; ValueError when it is not one."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        parts = value.split(":") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ValueError(value)
        kinds = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(parts):
            raise ValueError(value)
        return tuple(_coerce(p, k) for p, k in zip(parts, kinds))
    if isinstance(value, bool) and kind is not bool:  # bool is an int to Python, never to a user
        raise ValueError(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise ValueError(value)
    if kind is int:
        return value if isinstance(value, int) else int(str(value).strip())  # int("1.5") raises
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else float(str(value).strip())
    if kind in (str, Path) and isinstance(value, (str, Path)):
        return kind(value.strip() if isinstance(value, str) else value)
    raise ValueError(value)


def _key(raw: str, known: dict[str, Any]) -> str:
    key = raw.strip().lower().replace("-", "_")
    key = options.flag_aliases(TrainConfig).get(key, key)  # a key may be the train-student flag: lr = learning_rate
    if key in fixed_keys():
        raise LrcError(f"a sweep cannot vary {key!r}: it is the same for every point; "
                       "set it on the sweep command itself")
    if key not in known:
        raise LrcError(f"unknown sweep key {raw!r}: use a train-student setting, one of {', '.join(known)}")
    return key


def _values(key: str, raw: Any, kind: Any) -> tuple[Any, ...]:
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]  # a scalar is one value
    if not items:
        raise LrcError(f"sweep key {key!r} has an empty value list: give at least one value")
    if any(isinstance(item, dict) for item in items):
        raise LrcError(f"sweep key {key!r} holds a table: give a list of values, e.g. {key} = [1, 2]")
    values = []
    for item in items:
        try:
            values.append(_coerce(item, kind))
        except (ValueError, TypeError):
            raise LrcError(f"sweep value {item!r} for {key!r} is not {_describe(kind)}: fix the grid") from None
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise LrcError(f"sweep key {key!r} repeats the value {repeated[0]!r}: list each value once")
    return tuple(values)


def read_grid_file(path: Path) -> dict[str, Any]:
    """The raw key -> values mapping of a .toml, .yaml or .yml grid file, in file order."""
    return load_config_file(path)


def _parse_set(text: str) -> tuple[str, list[str]]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise LrcError(f"--set {text!r} is not key=v1,v2: write e.g. --set learning_rate=1e-4,3e-4")
    values = [v.strip() for v in raw.split(",")] if raw.strip() else []
    if any(not v for v in values):
        raise LrcError(f"--set {text!r} has an empty value: write e.g. --set {key.strip()}=1e-4,3e-4")
    return key, values


def parse_grid(sets: list[str], grid_file: Path | None) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The grid from a file and/or `--set key=v1,v2` strings; a --set key replaces the file's values.

    Keys are TrainConfig fields (dashes allowed); values are coerced to the field's type. Order: the
    file's keys as written, then new --set keys in order.
    """
    known = sweep_keys()
    grid: dict[str, tuple[Any, ...]] = {}
    for raw_key, raw in (read_grid_file(grid_file) if grid_file is not None else {}).items():
        key = _key(raw_key, known)
        if key in grid:
            raise LrcError(f"grid file {grid_file} names {key!r} twice: keep one")
        grid[key] = _values(key, raw, known[key])
    given: set[str] = set()
    for text in sets:
        raw_key, raw = _parse_set(text)
        key = _key(raw_key, known)
        if key in given:
            raise LrcError(f"--set {key} is given twice: put all its values in one --set {key}=v1,v2")
        given.add(key)
        grid[key] = _values(key, raw, known[key])
    return tuple(grid.items())


def grid_points(grid: tuple[tuple[str, tuple[Any, ...]], ...]) -> list[dict[str, Any]]:
    """The cartesian product, the last key varying fastest (like nested loops in grid order)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ":".join(format_value(v) for v in value)
    return "none" if value is None else str(value)


def run_name(index: int, point: dict[str, Any]) -> str:
    """run-NNN plus a readable slug of the settings given (paths by their last part)."""
    parts = [f"{k}={Path(v).name if isinstance(v, Path) else format_value(v)}" for k, v in point.items()]
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts))[:80]
    return f"run-{index:03d}-{slug}"
