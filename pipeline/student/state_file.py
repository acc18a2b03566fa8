"""The state file: nested training state (dicts, lists, tuples, tensors, numpy arrays, plain values) as one
safetensors file, the format of the run's checkpoint and of a general student's W_i.

Every tensor (weights, optimizer moments, RNG states) is stored as a tensor, everything else (step, scheduler,
parameter groups, Python and numpy RNG states) as JSON in its header. Loading it parses data only: unlike a pickle
(`torch.load`), a planted file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from pipeline.core import atomic
from pipeline.core.errors import LrcError

_STATE_KEY = "lrc.state"  # the JSON half of the file, in the safetensors header


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON tree for `value`; tensors (and numpy arrays) go to `tensors` under `path`, the tree names them.

    Dicts become {"__dict__": [[key, value], ...]} (keeps int keys, as the optimizer's, and order) and
    tuples {"__tuple__": [...]} (numpy's and Python's RNG states are tuples and must come back as such).
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()  # a copy: no storage shared between keys
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": path, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint entry {path} has keys that are neither str nor int")
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entry {path} is a {type(value).__name__}, which a checkpoint does not store")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    return {k: _decode(v, tensors) for k, v in tree["__dict__"]}


def _unreadable(path: Path, err: Exception) -> LrcError:
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    return LrcError(f"checkpoint {path} is unreadable ({reason}): it was cut short or damaged; start the run "
                    "over with --overwrite")


def write_state(path: Path, payload: dict[str, Any]) -> None:
    """`payload` (nested dicts, lists, tuples, tensors, numpy arrays, plain values) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(payload, tensors, "state"))
    with atomic.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={_STATE_KEY: tree})


def read_state(path: Path) -> dict[str, Any]:
    """What `write_state` wrote, parsed without unpickling anything; a damaged file is a one-line LrcError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _decode(tree, tensors)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise _unreadable(path, err) from None


def read_entry(path: Path, key: str) -> Any:
    """One top-level entry of what `write_state` wrote, read from the JSON header alone (no tensor is loaded, so
    only for an entry that holds none); None when the file has no such entry."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {})[_STATE_KEY])
        entries = dict((k, v) for k, v in tree["__dict__"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise _unreadable(path, err) from None
    return _decode(entries[key], {}) if key in entries else None
