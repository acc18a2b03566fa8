"""The cache: the contract between the stages (docs/DESIGN.md §3). Layout, schema, shard writing, checksums.

A cache directory holds `settings.json` (written first: what the run promised to produce),
`shards/<split>-<start>-<stop>.arrow` (Arrow IPC stream files, one row per example, written
atomically, each with a `.sha256.json` sidecar written before it), `tokenizer/`, `teacher_weights/` and,
last, `manifest.json` assembled from the shards present (`pipeline/cache/manifest.py`). A cache without
`manifest.json` is incomplete and no later stage trusts it. Reading a complete cache: `pipeline/cache/reader.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.cache.quant import INT8, scale_column, settings_entry
from pipeline.core import atomic
from pipeline.core.runtime import check_max_length

log = logging.getLogger(__name__)

FORMAT = "lrc-cache"
# 2: every file later stages read is checksummed (`files`) and the fingerprint is the hash of the manifest's
# content, recomputed where it is read. A version-1 cache is refused with the fix (re-extract): its fingerprint
# covered neither the tokenizer, the teacher weights nor the task, so it cannot be checked the same way.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
TEACHER_WEIGHTS_DIR = "teacher_weights"  # for `--init teacher`; read, never run, by train-student
IMPORTANCE_FILE = "importance.npz"  # the cache's importance scores: pipeline/cache/importance.py's FILE
# Besides the shards, every file under these paths (a file or a dir) is read by a later stage (the tokenizer by
# train-student, the teacher weights and importance scores by `--init teacher`): each is checksummed in the
# manifest's `files` and so covered by the fingerprint, and checked at open at the shards' level. A new file that
# later stages read is added here.
CONTENT_PATHS = (TOKENIZER_DIR, TEACHER_WEIGHTS_DIR, IMPORTANCE_FILE)
POOLED_DEFINITION = "mean over real tokens of the last teacher layer's hidden states, computed in float32"
SIDECAR_SUFFIX = ".sha256.json"  # <shard stem>.sha256.json: the shard's size and hashes, written before it
IMPORTANCE_SUFFIX = ".importance.npz"  # <shard stem>.importance.npz: its importance sums (pipeline/cache/importance.py)
SHARD_RE = re.compile(r"^(?P<split>[a-z_]+)-(?P<start>\d{9})-(?P<stop>\d{9})\.arrow$")
# The quick check reads the first and last 64 KiB (Arrow schema and batch metadata, the end-of-stream
# marker) and 16 blocks of 4 KiB spread over the body: a few reads per shard whatever its size.
_SAMPLE_EDGE = 64 << 10
_SAMPLE_BLOCK = 4 << 10
_SAMPLE_COUNT = 16
# How each --hidden-dtype is stored, (hidden-state values, pooled vector), as numpy dtypes (the Arrow types follow
# from them): the one table of storage dtypes, for the writer, the reader and the teacher pass. The pooled vector
# (one per example, for the negatives index) stays a float: int8 caches keep it in float16.
STORAGE: dict[str, tuple[type, type]] = {"float16": (np.float16, np.float16), "float32": (np.float32, np.float32),
                                         INT8: (np.int8, np.float16)}


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def storage_settings(config: Any, model_config: Any, layers: list[int]) -> dict[str, Any]:
    """The settings that say how a cache stores the teacher's states, the same for task and corpus caches;
    `config` is the ExtractConfig, `model_config` the teacher's. Both cache kinds build these from the loaded
    teacher before any shard, so a --max-length the teacher cannot read is refused here, before work starts."""
    check_max_length(model_config, config.max_length, "the teacher")
    return {
        "max_length": config.max_length,
        "layers": layers,
        "hidden_size": model_config.hidden_size,
        "hidden_dtype": config.hidden_dtype,
        **settings_entry(config.hidden_dtype),
        "pooled": {"layer": model_config.num_hidden_layers, "definition": POOLED_DEFINITION},
        "precision": config.precision,
        "shard_rows": config.shard_rows,
    }


def shard_name(split: str, start: int, stop: int) -> str:
    return f"{split}-{start:09d}-{stop:09d}.arrow"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_sha256(path: Path) -> str:
    """sha256 of the file size and sampled blocks (the whole file when small): the quick check's hash."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE_EDGE + _SAMPLE_COUNT * _SAMPLE_BLOCK:
            digest.update(f.read())
            return digest.hexdigest()
        body = range(_SAMPLE_EDGE, size - _SAMPLE_EDGE - _SAMPLE_BLOCK, (size - 2 * _SAMPLE_EDGE) // _SAMPLE_COUNT)
        for offset, length in [(0, _SAMPLE_EDGE), *((o, _SAMPLE_BLOCK) for o in body), (size - _SAMPLE_EDGE, _SAMPLE_EDGE)]:
            f.seek(offset)
            digest.update(f.read(length))
    return digest.hexdigest()


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".arrow") + SIDECAR_SUFFIX)


class _HashingFile:
    """A write-only file that hashes what passes through it, so a shard's sha256 costs no second read."""

    def __init__(self, f: Any) -> None:
        self._f, self.digest, self._pos = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self._pos += len(memoryview(data))
        return self._f.write(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed


# --------------------------------------------------------------------------- writing


def shard_schema(
    layers: list[int], hidden_size: int, num_labels: int | None, regression: bool, hidden_dtype: str, with_hidden: bool
) -> pa.Schema:
    """One row per example; token-level columns hold real tokens only (no padding).

    num_labels None: a corpus cache (unlabeled text), with no label and no logits columns at all.
    """
    values, pooled = (pa.from_numpy_dtype(t) for t in STORAGE[hidden_dtype])
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
    ]
    if num_labels is not None:
        fields += [pa.field("label", pa.float32() if regression else pa.int64()),
                   pa.field("logits", pa.list_(pa.float32(), num_labels))]
    if with_hidden:
        # (tokens, d') per example: a list of fixed-size rows keeps the shape readable by any Arrow tool.
        for j in layers:
            fields.append(pa.field(hidden_column(j), pa.list_(pa.list_(values, hidden_size))))
            if hidden_dtype == INT8:  # (tokens,) float32: each token's absmax / 127 (pipeline/cache/quant.py)
                fields.append(pa.field(scale_column(j), pa.list_(pa.float32())))
        fields.append(pa.field("pooled", pa.list_(pooled, hidden_size)))
    return pa.schema(fields, metadata={"lrc.format": FORMAT, "lrc.format_version": str(FORMAT_VERSION)})


def make_record_batch(
    schema: pa.Schema,
    row_ids: np.ndarray,  # (n,)
    input_ids: list[np.ndarray],  # n arrays of (len_i,)
    token_type_ids: list[np.ndarray],  # n arrays of (len_i,)
    labels: np.ndarray | None,  # (n,); None with logits for a corpus cache
    logits: np.ndarray | None,  # (n, C)
    hidden: dict[int, np.ndarray] | None = None,  # layer -> (sum len_i, d') rows in row order
    pooled: np.ndarray | None = None,  # (n, d')
    scales: dict[int, np.ndarray] | None = None,  # layer -> (sum len_i,) float32, with int8 `hidden`
) -> pa.RecordBatch:
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def token_list(parts: list[np.ndarray], dtype: type) -> pa.Array:
        flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(offsets, pa.array(flat))

    columns: list[pa.Array] = [
        pa.array(row_ids.astype(np.int64)),
        token_list(input_ids, np.int32),
        token_list(token_type_ids, np.int8),
    ]
    if labels is not None and logits is not None:
        num_labels = schema.field("logits").type.list_size
        columns += [pa.array(labels, type=schema.field("label").type),
                    pa.FixedSizeListArray.from_arrays(pa.array(logits.astype(np.float32).reshape(-1)), num_labels)]
    if hidden is not None and pooled is not None:
        for layer, rows in hidden.items():  # dict order == schema order (extract builds both from one list)
            width = rows.shape[1]
            token_rows = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
            columns.append(pa.ListArray.from_arrays(offsets, token_rows))
            if scales is not None:
                columns.append(pa.ListArray.from_arrays(offsets, pa.array(scales[layer].astype(np.float32, copy=False))))
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1)), pooled.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_shard(cache_dir: Path, split: str, start: int, stop: int, batch: pa.RecordBatch) -> Path:
    """Write one shard atomically: a killed run leaves either the whole file or none, and a failed
    write no temp file. Its sidecar (size, sha256, sample hash) is renamed into place first, so a
    shard present on disk always has the record a resumed run checks it against."""
    shard_dir = cache_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / shard_name(split, start, stop)
    with atomic.replacing(final) as tmp:
        with open(tmp, "wb") as f:
            sink = _HashingFile(f)
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
        record = {"bytes": tmp.stat().st_size, "sha256": sink.digest.hexdigest(), "sample_sha256": sample_sha256(tmp)}
        atomic.write_json(sidecar_path(final), record, sort_keys=True)
    return final


def present_shards(cache_dir: Path, split: str) -> list[tuple[int, int, Path]]:
    """(start, stop, path) of the complete shards of a split, sorted by start."""
    shard_dir = cache_dir / SHARD_DIR
    found = []
    for path in shard_dir.glob(f"{split}-*.arrow") if shard_dir.is_dir() else []:
        match = SHARD_RE.match(path.name)
        if match and match["split"] == split:
            found.append((int(match["start"]), int(match["stop"]), path))
    return sorted(found)


def remove_temp_files(cache_dir: Path) -> None:
    """Leftovers of a killed writer (temp files, a sidecar whose shard never arrived): never trusted."""
    shard_dir = cache_dir / SHARD_DIR
    for tmp in shard_dir.glob(".*.tmp-*") if shard_dir.is_dir() else []:
        tmp.unlink()
    for suffix in (SIDECAR_SUFFIX, IMPORTANCE_SUFFIX):
        for sidecar in shard_dir.glob(f"*{suffix}") if shard_dir.is_dir() else []:
            if not sidecar.with_name(sidecar.name.removesuffix(suffix) + ".arrow").is_file():
                sidecar.unlink()


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"bytes", "sha256", "sample_sha256"} <= record.keys() else None


def trusted_shards(cache_dir: Path, split: str, ranges: set[tuple[int, int]] | None = None) -> list[tuple[int, int, Path]]:
    """The present shards of a split that match their sidecar's sha256 (every byte read); any other
    shard (changed since it was written, or without a sidecar) is removed, so a resumed extraction
    writes it again instead of blessing it into the manifest. `ranges`: check only these (start, stop)
    shards, the ones this rank owns, so ranks never hash or remove each other's files."""
    trusted = []
    for start, stop, path in present_shards(cache_dir, split):
        if ranges is not None and (start, stop) not in ranges:
            continue
        record = read_sidecar(path)
        if record is not None and record["bytes"] == path.stat().st_size and record["sha256"] == sha256_file(path):
            trusted.append((start, stop, path))
            continue
        log.warning("shard %s does not match its checksum record (%s): extracting it again", path,
                    "none" if record is None else "corrupted or changed since it was written")
        path.unlink()
        sidecar_path(path).unlink(missing_ok=True)
        path.with_name(path.name.removesuffix(".arrow") + IMPORTANCE_SUFFIX).unlink(missing_ok=True)
    return trusted
