"""The cache: the contract between the stages (DESIGN §3).

A cache directory holds `settings.json` (written first: what the run promised to produce),
`shards/<split>-<start>-<stop>.arrow` (Arrow IPC stream files, one row per example, written
atomically), `tokenizer/` and, last, `manifest.json` assembled from the shards present.
A cache without `manifest.json` is incomplete and no later stage trusts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.errors import LrcError

log = logging.getLogger(__name__)

FORMAT = "lrc-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
TEACHER_WEIGHTS_DIR = "teacher_weights"  # for `--init teacher`; read, never run, by train-student
POOLED_DEFINITION = "mean over real tokens of the last teacher layer's hidden states, computed in float32"
_SHARD_RE = re.compile(r"^(?P<split>[a-z_]+)-(?P<start>\d{9})-(?P<stop>\d{9})\.arrow$")
_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def shard_name(split: str, start: int, stop: int) -> str:
    return f"{split}-{start:09d}-{stop:09d}.arrow"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- writing


def shard_schema(
    layers: list[int], hidden_size: int, num_labels: int, regression: bool, hidden_dtype: str, with_hidden: bool
) -> pa.Schema:
    """One row per example; token-level columns hold real tokens only (no padding)."""
    dtype = _ARROW_DTYPES[hidden_dtype]
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
        pa.field("label", pa.float32() if regression else pa.int64()),
        pa.field("logits", pa.list_(pa.float32(), num_labels)),
    ]
    if with_hidden:
        # (tokens, d') per example: a list of fixed-size rows keeps the shape readable by any Arrow tool.
        fields += [pa.field(hidden_column(j), pa.list_(pa.list_(dtype, hidden_size))) for j in layers]
        fields.append(pa.field("pooled", pa.list_(dtype, hidden_size)))
    return pa.schema(fields, metadata={"lrc.format": FORMAT, "lrc.format_version": str(FORMAT_VERSION)})


def make_record_batch(
    schema: pa.Schema,
    row_ids: np.ndarray,  # (n,)
    input_ids: list[np.ndarray],  # n arrays of (len_i,)
    token_type_ids: list[np.ndarray],  # n arrays of (len_i,)
    labels: np.ndarray,  # (n,)
    logits: np.ndarray,  # (n, C)
    hidden: dict[int, np.ndarray] | None = None,  # layer -> (sum len_i, d') rows in row order
    pooled: np.ndarray | None = None,  # (n, d')
) -> pa.RecordBatch:
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def token_list(parts: list[np.ndarray], dtype: type) -> pa.Array:
        flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(offsets, pa.array(flat))

    num_labels = schema.field("logits").type.list_size
    columns: list[pa.Array] = [
        pa.array(row_ids.astype(np.int64)),
        token_list(input_ids, np.int32),
        token_list(token_type_ids, np.int8),
        pa.array(labels, type=schema.field("label").type),
        pa.FixedSizeListArray.from_arrays(pa.array(logits.astype(np.float32).reshape(-1)), num_labels),
    ]
    if hidden is not None and pooled is not None:
        for layer, rows in hidden.items():  # dict order == schema order (extract builds both from one list)
            width = rows.shape[1]
            token_rows = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
            columns.append(pa.ListArray.from_arrays(offsets, token_rows))
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1)), pooled.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_shard(cache_dir: Path, split: str, start: int, stop: int, batch: pa.RecordBatch) -> Path:
    """Write one shard atomically: a killed run leaves either the whole file or none."""
    shard_dir = cache_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / shard_name(split, start, stop)
    tmp = shard_dir / f".{final.name}.tmp-{os.getpid()}"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    os.replace(tmp, final)
    return final


def present_shards(cache_dir: Path, split: str) -> list[tuple[int, int, Path]]:
    """(start, stop, path) of the complete shards of a split, sorted by start."""
    shard_dir = cache_dir / SHARD_DIR
    found = []
    for path in shard_dir.glob(f"{split}-*.arrow") if shard_dir.is_dir() else []:
        match = _SHARD_RE.match(path.name)
        if match and match["split"] == split:
            found.append((int(match["start"]), int(match["stop"]), path))
    return sorted(found)


def remove_temp_files(cache_dir: Path) -> None:
    """Leftovers of a killed writer: never trusted, always rewritten."""
    for tmp in (cache_dir / SHARD_DIR).glob(".*.tmp-*") if (cache_dir / SHARD_DIR).is_dir() else []:
        tmp.unlink()


def assemble_manifest(cache_dir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Check that each split's shards tile its rows, checksum them, and write manifest.json last."""
    splits: dict[str, Any] = {}
    for split, info in settings["splits"].items():
        shards, expected_start = [], 0
        for start, stop, path in present_shards(cache_dir, split):
            if start != expected_start:
                raise LrcError(
                    f"cache {cache_dir} is incomplete: split {split!r} has no shard for rows "
                    f"[{expected_start}, {start}); rerun `lrc extract-teacher` with the same settings to finish it"
                )
            shards.append(
                {"file": f"{SHARD_DIR}/{path.name}", "start": start, "stop": stop,
                 "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            )
            expected_start = stop
        if expected_start != info["rows"]:
            raise LrcError(
                f"cache {cache_dir} is incomplete: split {split!r} has rows [0, {expected_start}) of "
                f"{info['rows']}; rerun `lrc extract-teacher` with the same settings to finish it"
            )
        splits[split] = {**info, "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in sorted(splits):
        for shard in splits[split]["shards"]:
            digest.update(shard["sha256"].encode())
    manifest = {
        **settings,
        **extra,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lrc_version": __version__,
        "splits": splits,
        "fingerprint": digest.hexdigest(),
    }
    write_json_atomic(cache_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- reading


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """The manifest of a complete cache of this format version, or a one-line LrcError."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise LrcError(f"cache dir {cache_dir} does not exist: create one with `lrc extract-teacher`")
    if not (cache_dir / MANIFEST).is_file():
        if (cache_dir / SETTINGS).is_file():
            raise LrcError(
                f"cache {cache_dir} is incomplete (its extraction did not finish): rerun "
                "`lrc extract-teacher` with the same settings to resume it"
            )
        raise LrcError(f"{cache_dir} is not an lrc cache (no {MANIFEST}): create one with `lrc extract-teacher`")
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise LrcError(f"{cache_dir / MANIFEST} is not valid JSON ({err}): re-extract the cache") from None
    if manifest.get("format") != FORMAT:
        raise LrcError(f"{cache_dir} is not an lrc cache (manifest format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LrcError(
            f"cache {cache_dir} has format version {manifest.get('format_version')} (written by lrc "
            f"{manifest.get('lrc_version')}), this lrc {__version__} reads version {FORMAT_VERSION}: "
            "re-extract it with `lrc extract-teacher --overwrite`"
        )
    return manifest


def verify_shards(cache_dir: Path, manifest: dict[str, Any], checksums: bool) -> None:
    """Every shard exists with its recorded size (and, with `checksums`, its sha256)."""
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = cache_dir / shard["file"]
            fix = "re-extract with `lrc extract-teacher --overwrite`"
            if not path.is_file():
                raise LrcError(f"cache {cache_dir} is missing shard {shard['file']}: {fix}")
            if path.stat().st_size != shard["bytes"]:
                raise LrcError(f"shard {path} has {path.stat().st_size} bytes, manifest says {shard['bytes']}: {fix}")
            if checksums and sha256_file(path) != shard["sha256"]:
                raise LrcError(f"shard {path} does not match its checksum in the manifest (corrupted or changed): {fix}")


@dataclass(frozen=True)
class _Shard:
    start: int
    table: pa.Table  # memory-mapped, zero-copy


class CacheSplit:
    """Row access to one split of a cache; row i is the example with row id i."""

    def __init__(self, cache_dir: Path, name: str, info: dict[str, Any], layers: list[int]) -> None:
        self.name = name
        self.num_rows: int = info["rows"]
        self.has_hidden: bool = info["hidden"]
        self.layers = layers if self.has_hidden else []
        self._shards = [_Shard(s["start"], _open_table(cache_dir / s["file"])) for s in info["shards"]]
        self._starts = np.array([s.start for s in self._shards], dtype=np.int64)

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([c for s in self._shards for c in s.table.column(name).chunks])

    def labels(self) -> np.ndarray:
        return self.column("label").to_numpy()

    def logits(self) -> np.ndarray:
        flat = self.column("logits").combine_chunks().flatten().to_numpy()
        return flat.reshape(self.num_rows, -1).astype(np.float32, copy=False)

    def pooled(self) -> np.ndarray:
        """(N, d') float32, converted shard by shard so only one shard's block is held twice."""
        if not self.has_hidden:
            raise LrcError(f"split {self.name!r} of this cache has no pooled vectors (only train does)")
        blocks = [_fixed_rows(s.table.column("pooled")).astype(np.float32) for s in self._shards]
        return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)

    def input_keys(self) -> np.ndarray:
        """(N,) int64; rows with identical inputs (ids and segments) share a key."""
        keys = np.empty(self.num_rows, dtype=np.int64)
        i = 0
        for shard in self._shards:
            ids, types = shard.table.column("input_ids"), shard.table.column("token_type_ids")
            for a, b in zip(ids.to_pylist(), types.to_pylist()):
                digest = hashlib.blake2b(np.asarray(a, np.int32).tobytes() + b"|" + bytes(b), digest_size=8)
                keys[i] = int.from_bytes(digest.digest(), "little", signed=True)
                i += 1
        return keys

    def example(self, row: int) -> dict[str, Any]:
        """One example as numpy arrays: hidden states are (tokens, d') in the stored dtype."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} outside split {self.name!r} of {self.num_rows} rows")
        shard = self._shards[int(np.searchsorted(self._starts, row, side="right")) - 1]
        table, i = shard.table, row - shard.start
        out: dict[str, Any] = {
            "row_id": row,
            "input_ids": _list_row(table.column("input_ids"), i),
            "token_type_ids": _list_row(table.column("token_type_ids"), i),
            "label": table.column("label")[i].as_py(),
            "logits": np.asarray(table.column("logits")[i].values.to_numpy(zero_copy_only=False), np.float32),
        }
        if self.has_hidden:
            out["hidden"] = {j: _token_rows(table.column(hidden_column(j)), i) for j in self.layers}
            out["pooled"] = table.column("pooled")[i].values.to_numpy(zero_copy_only=False)
        return out


@dataclass(frozen=True)
class _ShardViews:
    """Numpy views (zero-copy, into the mapping) of one shard's columns: list columns as (offsets, values)."""

    start: int
    input_ids: tuple[np.ndarray, np.ndarray]  # (n+1,) int32, (tokens,) int32
    token_type_ids: tuple[np.ndarray, np.ndarray]  # (n+1,) int32, (tokens,) int8
    labels: np.ndarray  # (n,) int64 or float32
    logits: np.ndarray  # (n, C) float32
    hidden: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (n+1,) int32, (tokens, d')


class RowReader:
    """Random row reads for training: per shard, numpy views of the needed columns, sliced per row.

    Arrow scalar access (`CacheSplit.example`) costs tens of microseconds per field; slicing
    precomputed offsets and values costs about one. The views point into this process's mappings:
    open one reader per process (per DataLoader worker).

    `random_access` (MADV_RANDOM) defaults to on only for a split larger than half the RAM. An epoch
    touches every row, so when the split fits in the page cache the kernel's read-ahead is prefetch,
    not waste (a cold epoch of a 412 MB cache: 4-6x the rows/s with read-ahead on); when it does not
    fit, read-ahead pulls ~5x the bytes of each cold row and evicts them unused (DESIGN §6).
    """

    def __init__(self, cache_dir: Path, info: dict[str, Any], layers: list[int], random_access: bool | None = None) -> None:
        self.num_rows: int = info["rows"]
        self.layers = list(layers)
        if random_access is None:
            random_access = info["bytes"] > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        self.random_access = random_access
        self._shards = [
            _shard_views(s["start"], _open_table(cache_dir / s["file"], random_access), layers) for s in info["shards"]
        ]
        self._starts = np.array([s["start"] for s in info["shards"]], dtype=np.int64)

    def _locate(self, row: int) -> tuple[_ShardViews, int]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} outside a split of {self.num_rows} rows")
        shard = self._shards[int(np.searchsorted(self._starts, row, side="right")) - 1]
        return shard, row - shard.start

    def example(self, row: int) -> dict[str, Any]:
        """Like `CacheSplit.example` (without pooled), hidden states for this reader's layers only."""
        shard, i = self._locate(row)
        return {
            "row_id": row,
            "input_ids": _slice(shard.input_ids, i),
            "token_type_ids": _slice(shard.token_type_ids, i),
            "label": shard.labels[i],
            "logits": shard.logits[i],
            "hidden": {j: _slice(shard.hidden[j], i) for j in self.layers},
        }

    def hidden(self, row: int, layer: int) -> np.ndarray:
        """(tokens, d') hidden states of one row and layer, in the stored dtype."""
        shard, i = self._locate(row)
        return _slice(shard.hidden[layer], i)


def _shard_views(start: int, table: pa.Table, layers: list[int]) -> _ShardViews:
    logits = _one_chunk(table.column("logits"))
    return _ShardViews(
        start=start,
        input_ids=_list_views(table.column("input_ids")),
        token_type_ids=_list_views(table.column("token_type_ids")),
        labels=_one_chunk(table.column("label")).to_numpy(),
        logits=logits.flatten().to_numpy().reshape(len(logits), logits.type.list_size),
        hidden={j: _list_views(table.column(hidden_column(j))) for j in layers},
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
    def task(self) -> dict[str, Any]:
        return self.manifest["task"]

    def split(self, name: str) -> CacheSplit:
        if name not in self.manifest["splits"]:
            have = ", ".join(sorted(self.manifest["splits"]))
            raise LrcError(f"cache {self.path} has no {name!r} split (it has: {have}); re-extract with that split")
        if name not in self._splits:
            self._splits[name] = CacheSplit(self.path, name, self.manifest["splits"][name], self.layers)
        return self._splits[name]


def open_cache(cache_dir: Path, verify: bool = False) -> Cache:
    """Open a complete cache; `verify` also checks every shard's sha256 (reads every byte)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    verify_shards(cache_dir, manifest, checksums=verify)
    return Cache(cache_dir, manifest)


def _open_table(path: Path, random_access: bool = False) -> pa.Table:
    """A shard as a zero-copy table over a read-only memory map of the file."""
    if not random_access:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    # MADV_RANDOM turns the kernel's read-ahead off for this mapping only (see RowReader for when).
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):  # absent on Windows
        mapped.madvise(mmap.MADV_RANDOM)
    return pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mapped))).read_all()


def _fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (n, width) numpy array (zero-copy where Arrow allows)."""
    array = column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)


def _list_row(column: pa.ChunkedArray, i: int) -> np.ndarray:
    return column[i].values.to_numpy(zero_copy_only=False)


def _token_rows(column: pa.ChunkedArray, i: int) -> np.ndarray:
    rows = column[i].values  # FixedSizeListArray of this example's tokens
    return rows.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), rows.type.list_size)


def describe(cache: Cache) -> str:
    """The manifest in human terms, for `lrc inspect-cache`."""
    m = cache.manifest
    teacher, task = m["teacher"], m["task"]
    labels = f"{task['num_labels']} labels: {', '.join(task['labels'])}" if task["labels"] else "regression"
    width, layers = m["hidden_size"], m["layers"]
    lines = [
        f"cache        {cache.path}",
        f"format       {m['format']} v{m['format_version']} (written by lrc {m['lrc_version']})",
        f"teacher      {m.get('teacher_path', '?')} ({teacher['config'].get('model_type', '?')}, "
        f"{teacher['num_layers']} layers x {teacher['hidden_size']}, weights sha256 {teacher['weights_sha256'][:12]})",
        f"task         {task['name']} ({labels}; metric {task['metric']})",
        f"layers       {layers} of {teacher['num_layers']}, stored as {m['hidden_dtype']}, width {width}",
        f"max length   {m['max_length']} tokens",
    ]
    bytes_per_value = np.dtype(m["hidden_dtype"]).itemsize
    for name, info in m["splits"].items():
        split = cache.split(name)
        tokens = int(np.sum(split.column("input_ids").combine_chunks().value_lengths().to_numpy()))
        rows = max(info["rows"], 1)
        line = (f"{name:<5} {info['rows']} rows in {len(info['shards'])} shard(s), {info['bytes'] / 1e6:.1f} MB, "
                f"{info['bytes'] / rows / 1e3:.1f} KB/example, {tokens / rows:.1f} tokens/example")
        lines.append(("splits       " if name == next(iter(m["splits"])) else "             ") + line)
        if info["hidden"]:
            ideal = tokens * len(layers) * width * bytes_per_value
            lines.append(f"             size vs tokens x layers x d' x {bytes_per_value}: {info['bytes'] / max(ideal, 1):.3f}x")
    total = sum(info["bytes"] for info in m["splits"].values())
    lines += [f"total        {total / 1e6:.1f} MB", f"fingerprint  {cache.fingerprint}"]
    return "\n".join(lines)
