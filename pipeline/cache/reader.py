"""Reading a complete cache (docs/DESIGN.md §3): open and check it, whole columns, and the one row reader.

How much of a cache is checked when it is opened (`open_cache(check=...)`): the levels and the checks are in
`pipeline/cache/verify.py`; the manifest itself is checked against its fingerprint whenever it is read
(`manifest.read_manifest`). The manifest in human terms, for `lrc inspect-cache`: `pipeline/cache/describe.py`.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.cache.format import TEACHER_WEIGHTS_DIR, TOKENIZER_DIR, hidden_column
from pipeline.cache.manifest import read_manifest, shard_path
from pipeline.cache.quant import scale_column
from pipeline.cache.verify import REEXTRACT, half_the_ram, verify_shards
from pipeline.core.errors import LrcError


def _open_table(path: Path, random_access: bool = False) -> pa.Table:
    """A shard as a zero-copy table over a read-only memory map of the file."""
    try:
        if not random_access:
            with pa.memory_map(str(path), "r") as source:
                return pa.ipc.open_stream(source).read_all()
        # MADV_RANDOM turns the kernel's read-ahead off for this mapping only (see RowReader for when).
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # absent on Windows
            mapped.madvise(mmap.MADV_RANDOM)
        return pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mapped))).read_all()
    except (pa.ArrowException, OSError, ValueError) as err:  # ArrowInvalid, "Invalid flatbuffers message" ...
        reason = " ".join(str(err).split())[:200]
        raise LrcError(f"shard {path} is not a readable Arrow stream ({reason}): {REEXTRACT}") from None


# --------------------------------------------------------------------------- whole columns


class CacheSplit:
    """Column access to one split of a cache (row i is the example with row id i); rows: `reader()`."""

    def __init__(self, cache_dir: Path, name: str, info: dict[str, Any], layers: list[int]) -> None:
        self.name, self.cache_dir, self.info = name, Path(cache_dir), info
        self.num_rows: int = info["rows"]
        self.has_hidden: bool = info["hidden"]
        self.layers = layers if self.has_hidden else []
        self._tables = [_open_table(shard_path(cache_dir, name, s)) for s in info["shards"]]

    def reader(self, layers: list[int] | None = None, pooled: bool = False) -> RowReader:
        """Row access: every stored layer (or `layers`), and the pooled vector when asked."""
        return RowReader(self.cache_dir, self.info, self.layers if layers is None else layers, pooled=pooled,
                         split=self.name)

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([c for t in self._tables for c in t.column(name).chunks])

    def labels(self) -> np.ndarray:
        return self.column("label").to_numpy()

    def logits(self) -> np.ndarray:
        flat = self.column("logits").combine_chunks().flatten().to_numpy()
        return flat.reshape(self.num_rows, -1).astype(np.float32, copy=False)

    def pooled(self) -> np.ndarray:
        """(N, d') float32, converted shard by shard so only one shard's block is held twice."""
        if not self.has_hidden:
            raise LrcError(f"split {self.name!r} of this cache has no pooled vectors (only train does)")
        blocks = [_fixed_rows(t.column("pooled")).astype(np.float32) for t in self._tables]
        return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)

    def input_keys(self) -> np.ndarray:
        """(N,) int64; rows with identical inputs (ids and segments) share a key."""
        keys = np.empty(self.num_rows, dtype=np.int64)
        i = 0
        for table in self._tables:
            ids, types = table.column("input_ids"), table.column("token_type_ids")
            for a, b in zip(ids.to_pylist(), types.to_pylist()):
                digest = hashlib.blake2b(np.asarray(a, np.int32).tobytes() + b"|" + bytes(b), digest_size=8)
                keys[i] = int.from_bytes(digest.digest(), "little", signed=True)
                i += 1
        return keys


def _fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (n, width) numpy array (zero-copy where Arrow allows)."""
    array = column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _ShardViews:
    """Numpy views (zero-copy, into the mapping) of one shard's columns: list columns as (offsets, values)."""

    start: int
    input_ids: tuple[np.ndarray, np.ndarray]  # (n+1,) int32, (tokens,) int32
    token_type_ids: tuple[np.ndarray, np.ndarray]  # (n+1,) int32, (tokens,) int8
    labels: np.ndarray | None  # (n,) int64 or float32; None in a corpus cache
    logits: np.ndarray | None  # (n, C) float32; None in a corpus cache
    hidden: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (n+1,) int32, (tokens, d')
    scales: dict[int, np.ndarray]  # int8 caches: layer -> (tokens,) float32 (same offsets as hidden); else empty
    pooled: np.ndarray | None  # (n, d') when asked for


class RowReader:
    """Random row reads: per shard, numpy views of the needed columns, sliced per row.

    Arrow scalar access costs tens of microseconds per field; slicing precomputed offsets and values
    costs about one. The views point into this process's mappings: open one reader per process (per
    DataLoader worker).

    `random_access` (MADV_RANDOM) defaults to on only for a split larger than half the RAM. An epoch
    touches every row, so when the split fits in the page cache the kernel's read-ahead is prefetch,
    not waste; when it does not fit, read-ahead pulls several times the bytes of each cold row and
    evicts them unused (docs/DESIGN.md §6; measured in docs/PERFORMANCE.md).
    """

    def __init__(self, cache_dir: Path, info: dict[str, Any], layers: list[int], random_access: bool | None = None,
                 pooled: bool = False, split: str = "train") -> None:
        self.num_rows: int = info["rows"]
        self.layers = list(layers)
        if random_access is None:
            random_access = info["bytes"] > half_the_ram()
        self.random_access = random_access
        with_pooled = pooled and info["hidden"]
        self._shards = [
            _shard_views(s["start"], _open_table(shard_path(cache_dir, split, s), random_access), layers, with_pooled)
            for s in info["shards"]
        ]
        self._starts = np.array([s["start"] for s in info["shards"]], dtype=np.int64)

    def _locate(self, row: int) -> tuple[_ShardViews, int]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} outside a split of {self.num_rows} rows")
        shard = self._shards[int(np.searchsorted(self._starts, row, side="right")) - 1]
        return shard, row - shard.start

    def example(self, row: int) -> dict[str, Any]:
        """One example as numpy views: hidden states (tokens, d') in the stored dtype for this reader's layers."""
        shard, i = self._locate(row)
        out = {
            "row_id": row,
            "input_ids": _slice(shard.input_ids, i),
            "token_type_ids": _slice(shard.token_type_ids, i),
            "hidden": {j: _slice(shard.hidden[j], i) for j in self.layers},
        }
        if shard.scales:  # int8: (tokens,) float32 per layer; x = q * scale (pipeline/cache/quant.py)
            offsets = shard.hidden[self.layers[0]][0]
            out["scales"] = {j: shard.scales[j][offsets[i] : offsets[i + 1]] for j in self.layers}
        if shard.labels is not None and shard.logits is not None:  # a corpus cache has neither
            out |= {"label": shard.labels[i], "logits": shard.logits[i]}
        if shard.pooled is not None:
            out["pooled"] = shard.pooled[i]
        return out

    def hidden(self, row: int, layer: int) -> np.ndarray:
        """(tokens, d') hidden states of one row and layer, in the stored dtype (int8: see `scales`)."""
        shard, i = self._locate(row)
        return _slice(shard.hidden[layer], i)

    def scales(self, row: int, layer: int) -> np.ndarray:
        """(tokens,) float32 scales of one row and layer of an int8 cache."""
        shard, i = self._locate(row)
        return _slice((shard.hidden[layer][0], shard.scales[layer]), i)

    def dequantized(self, row: int, layer: int) -> np.ndarray:
        """(tokens, d') float32 hidden states whatever the storage (a reference path: tools, tests)."""
        values = self.hidden(row, layer)
        if self.quantized:
            return values.astype(np.float32) * self.scales(row, layer)[:, None]
        return values.astype(np.float32)

    @property
    def quantized(self) -> bool:
        return bool(self._shards) and bool(self._shards[0].scales)

    def shard_views(self) -> list[_ShardViews]:
        """Per shard (in row order) its numpy views: for batch gathers (`pipeline/student/gather.py`)."""
        return self._shards

    @property
    def shard_starts(self) -> np.ndarray:
        return self._starts


def _shard_views(start: int, table: pa.Table, layers: list[int], pooled: bool) -> _ShardViews:
    labelled = "label" in table.column_names  # a corpus cache has no label and no logits columns
    logits = _one_chunk(table.column("logits")) if labelled else None
    return _ShardViews(
        start=start,
        input_ids=_list_views(table.column("input_ids")),
        token_type_ids=_list_views(table.column("token_type_ids")),
        labels=_one_chunk(table.column("label")).to_numpy() if labelled else None,
        logits=logits.flatten().to_numpy().reshape(len(logits), logits.type.list_size) if logits is not None else None,
        hidden={j: _list_views(table.column(hidden_column(j))) for j in layers},
        scales={j: _one_chunk(table.column(scale_column(j))).values.to_numpy() for j in layers
                if scale_column(j) in table.column_names},
        pooled=_fixed_rows(table.column("pooled")) if pooled else None,
    )


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    # Shards are written as one record batch, so this is zero-copy; combine_chunks copies otherwise.
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _list_views(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values); offsets index values, which stay whole (no slicing by Arrow)."""
    array = _one_chunk(column)
    values = array.values
    if pa.types.is_fixed_size_list(values.type):  # hidden states: tokens of d' values
        return array.offsets.to_numpy(), values.flatten().to_numpy().reshape(len(values), values.type.list_size)
    return array.offsets.to_numpy(), values.to_numpy()


def _slice(views: tuple[np.ndarray, np.ndarray], i: int) -> np.ndarray:
    offsets, values = views
    return values[offsets[i] : offsets[i + 1]]


# --------------------------------------------------------------------------- the cache


class Cache:
    """A complete cache opened for reading: `open_cache(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.layers: list[int] = manifest["layers"]
        self.hidden_size: int = manifest["hidden_size"]
        self.tokenizer_dir = path / TOKENIZER_DIR
        self.teacher_weights_dir = path / TEACHER_WEIGHTS_DIR
        self._splits: dict[str, CacheSplit] = {}

    @property
    def kind(self) -> str:
        """"task" or "corpus"; manifests written before corpus caches existed are task caches."""
        return self.manifest.get("kind", "task")

    @property
    def task(self) -> dict[str, Any]:
        if self.manifest["task"] is None:
            raise LrcError(f"cache {self.path} is a corpus cache (unlabeled text: no task, labels or logits): this "
                           "needs a task cache from `lrc extract-teacher --task ...`")
        return self.manifest["task"]

    def split(self, name: str) -> CacheSplit:
        if name not in self.manifest["splits"]:
            have = ", ".join(sorted(self.manifest["splits"]))
            raise LrcError(f"cache {self.path} has no {name!r} split (it has: {have}); re-extract with that split")
        if name not in self._splits:
            self._splits[name] = CacheSplit(self.path, name, self.manifest["splits"][name], self.layers)
        return self._splits[name]


def open_cache(cache_dir: Path, check: str = "quick") -> Cache:
    """Open a complete cache after checking its shards (`check`: size, quick, full or auto; see above)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    verify_shards(cache_dir, manifest, check)
    return Cache(cache_dir, manifest)
