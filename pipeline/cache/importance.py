"""Importance scores recorded while stage one runs the teacher, for cutting it to a narrower student.

Per teacher layer: mean |h| of each residual channel over real tokens (the embeddings too), mean |a| of
each FFN neuron after the nonlinearity, and per attention dim mean |q_d * k_d| (Q/K dims), mean |v_d| (V
dims) and mean |c_d| of the heads' context vectors (the output projection's input), whose sum over a head
is the head's score. Forward hooks on the modules the family table names collect them during the forward
extract-teacher already runs, so no extra teacher pass.

Sums (float64) and the token count are written per shard beside it (`<shard>.importance.npz`, before the
shard itself, so a present shard has its sums); the cache's `importance.npz` is their sum taken in shard
order. A shard's rows and batches do not depend on the rank that ran it, so a torchrun extraction gives the
same bytes as a single process, and a resumed one the same as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.cache import format as cache
from pipeline.core import atomic
from pipeline.core.errors import LrcError
from pipeline.core.families import family_of, get_module

log = logging.getLogger(__name__)

FILE = "importance.npz"
DEFINITION = ("means over real tokens of the train split: residual |h| per channel (row 0: embeddings), "
              "FFN |activation| per neuron, |q_d k_d| per Q/K dim, |v_d| per V dim, |context_d| per head dim")
SUMS = ("residual", "ffn", "qk", "v", "context")


def sums_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".arrow") + cache.IMPORTANCE_SUFFIX)


class Recorder:
    """Hooks on one teacher that add up the scores of the batches it runs; `batch(mask)` around each forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        row = family_of(model.config.model_type, "teacher")
        layers = get_module(model.base_model, row.layers)
        self.sums: dict[str, torch.Tensor | None] = dict.fromkeys(SUMS)
        self.tokens = 0
        self._mask: torch.Tensor | None = None  # (B, L, 1) float64, 1 on real tokens
        self._seen: set[tuple[int, str]] = set()
        self._query: dict[int, torch.Tensor] = {}
        self._hooks = []
        for j, layer in enumerate(layers):
            q, k, v, o = (get_module(layer, path) for path in row.attention)
            self._hooks += [q.register_forward_hook(self._on_output(j, "q")),
                            k.register_forward_hook(self._on_output(j, "k")),
                            v.register_forward_hook(self._on_output(j, "v")),
                            o.register_forward_pre_hook(self._on_input(j, "context")),
                            get_module(layer, row.ffn[1]).register_forward_pre_hook(self._on_input(j, "ffn"))]
        self._depth = len(layers)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:  # the teacher runs on without them (the dev split, the next shard's recorder)
            hook.remove()

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor) -> Iterator[None]:
        """Score the forward run inside for the tokens where `mask` (B, L) is 1."""
        self._mask, self._seen, self._query = mask.unsqueeze(-1).double(), set(), {}
        try:
            yield
        finally:
            self._mask = None
        self.tokens += int(mask.sum())

    def add_states(self, hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> None:
        """Residual scores from the forward's hidden states (embeddings + every layer), each (B, L, d)."""
        real = mask.unsqueeze(-1).double()
        self._add("residual", torch.stack([(h.double().abs() * real).sum((0, 1)) for h in hidden_states]))

    def totals(self) -> dict[str, np.ndarray]:
        missing = [name for name, value in self.sums.items() if value is None]
        if missing:
            raise LrcError(f"the teacher's forward never ran the modules scored as {', '.join(missing)}: its family "
                           "table (pipeline/core/families.py) names modules the model does not call")
        return {name: value.cpu().numpy() for name, value in self.sums.items()} | {"tokens": np.array(self.tokens)}

    # ----------------------------------------------------------------------- hooks

    def _first(self, j: int, role: str) -> bool:
        """Only the first call of a module per forward reads the token stream (DeBERTa calls its key
        projection again on the relative-position table)."""
        if self._mask is None or (j, role) in self._seen:
            return False
        self._seen.add((j, role))
        return True

    def _on_output(self, j: int, role: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if not self._first(j, role):
                return
            if role == "v":
                self._add_layer("v", j, output)
            elif (other := self._query.pop(j, None)) is None:  # Q and K: whichever comes second scores both
                self._query[j] = output
            else:
                self._add_layer("qk", j, output.double() * other.double())
        return hook

    def _on_input(self, j: int, role: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self._first(j, role):
                self._add_layer(role, j, args[0])
        return hook

    def _add_layer(self, name: str, j: int, values: torch.Tensor) -> None:
        row = (values.double().abs() * self._mask).sum((0, 1))  # (width,)
        if self.sums[name] is None:
            self.sums[name] = torch.zeros(self._depth, row.numel(), dtype=torch.float64, device=row.device)
        self.sums[name][j] += row

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = values if self.sums[name] is None else self.sums[name] + values


# --------------------------------------------------------------------------- files


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with fixed timestamps and member order (np.savez stamps the current time), written atomically:
    the same scores give the same bytes, so the checksum in the manifest and the fingerprint are reproducible."""
    with atomic.replacing(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def assemble(cache_dir: Path, shards: list[Path]) -> dict[str, Any] | None:
    """Sum the per-shard sums in shard order into `importance.npz` (means per token); its manifest entry, or
    None (with a log line) when a shard has none, e.g. one written by an lrc older than the scores."""
    total: dict[str, np.ndarray] = {}
    for shard in shards:
        path = sums_path(shard)
        if not path.is_file():
            log.warning("shard %s has no importance sums (written by an older lrc): the cache gets no importance "
                        "scores, and a narrower --init teacher keeps evenly spaced channels", shard.name)
            return None
        with np.load(path, allow_pickle=False) as part:
            for name in (*SUMS, "tokens"):
                total[name] = total[name] + part[name] if name in total else part[name].astype(np.float64)
    tokens = float(np.sum(total.pop("tokens")))  # read back with shape (1,): np.ascontiguousarray makes 0-d 1-d
    means = {name: value / max(tokens, 1.0) for name, value in total.items()} | {"tokens": np.array(tokens)}
    write_arrays(cache_dir / FILE, means)
    return {"file": FILE, "sha256": cache.sha256_file(cache_dir / FILE), "bytes": (cache_dir / FILE).stat().st_size,
            "tokens": int(tokens), "definition": DEFINITION}


def load(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The cache's scores, checked against the manifest's checksum; None for a cache without them."""
    entry = manifest.get("importance")
    if entry is None:
        return None
    path = Path(cache_dir) / FILE
    if not path.is_file() or cache.sha256_file(path) != entry["sha256"]:
        raise LrcError(f"{path} is missing or does not match the checksum in the manifest: re-extract the cache with "
                       "`lrc extract-teacher --overwrite`")
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}
