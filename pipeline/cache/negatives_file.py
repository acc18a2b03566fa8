"""The negatives file: its format, writer and reader, what `train-student` draws K of each row's M candidates from.

`negatives.arrow` (Arrow IPC file: row_id, candidates [M] int64, scores [M] float32, the build's
metadata and the sha256 of the candidates and scores in the schema) is written by
`pipeline/negatives/build.py` through `write_negatives`; `read_negatives` checks the hash and that every
candidate is another row of the cache, and the trainer's `pipeline/student/sampler.py` draws from what it
returns. This module needs no FAISS, so training never loads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core import atomic
from pipeline.core.errors import LrcError

FORMAT = "lrc-negatives"
FORMAT_VERSION = 2  # 2: the content hash below; a version-1 file has none and is rebuilt
_META_KEY = b"lrc.negatives"
_HASH_KEY = b"lrc.negatives.sha256"  # of the candidates (int64) then the scores (float32), C order


def content_sha256(ids: np.ndarray, scores: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(scores, np.float32).tobytes())
    return digest.hexdigest()


def is_negatives_file(path: Path) -> bool:
    """Whether `path` is a file `write_negatives` wrote (of any version): the only kind it may replace."""
    try:
        with pa.memory_map(str(path), "r") as source:
            meta = json.loads(pa.ipc.open_file(source).schema.metadata[_META_KEY])
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError):
        return False


def manifest_path(output: Path) -> Path:
    """negatives.json next to negatives.arrow (or <name>.json next to <name>.arrow)."""
    return output.with_suffix(".json")


def write_negatives(path: Path, ids: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> None:
    """Arrow IPC file: row_id, candidates [M] int64, scores [M] float32; `meta` in the schema. Atomic."""
    n, m = ids.shape
    schema = pa.schema(
        [("row_id", pa.int64()), ("candidates", pa.list_(pa.int64(), m)), ("scores", pa.list_(pa.float32(), m))],
        metadata={_META_KEY: json.dumps(meta, sort_keys=True).encode(), _HASH_KEY: content_sha256(ids, scores).encode()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for s in range(0, n, 65536):
            e = min(s + 65536, n)
            writer.write_batch(pa.record_batch([
                pa.array(np.arange(s, e, dtype=np.int64)),
                pa.FixedSizeListArray.from_arrays(pa.array(ids[s:e].ravel()), m),
                pa.FixedSizeListArray.from_arrays(pa.array(scores[s:e].ravel().astype(np.float32)), m),
            ], schema=schema))


def read_negatives(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids (N, M) int64, scores (N, M) float32, metadata) of a negatives file, or a one-line LrcError."""
    path = Path(path)
    fix = "build one with `lrc build-negatives --cache DIR`"
    if not path.is_file():
        raise LrcError(f"negatives file {path} does not exist: {fix}")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        meta = json.loads(table.schema.metadata[_META_KEY])
        if meta.get("format") != FORMAT or not {"cache_fingerprint", "candidates"} <= meta.keys():
            raise KeyError("format")
        if meta.get("format_version") != FORMAT_VERSION:
            raise LrcError(f"{path} has negatives format {meta.get('format_version')}, this lrc reads "
                           f"{FORMAT_VERSION}: rebuild it with `lrc build-negatives`")
        n, m = table.num_rows, meta["candidates"]
        ids = table.column("candidates").combine_chunks().flatten().to_numpy().reshape(n, m).copy()
        scores = table.column("scores").combine_chunks().flatten().to_numpy().reshape(n, m).copy()
        recorded = table.schema.metadata[_HASH_KEY].decode()
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError, AttributeError):
        raise LrcError(f"{path} is not an lrc negatives file: {fix}") from None
    rebuild = "rebuild it with `lrc build-negatives`"
    if content_sha256(ids, scores) != recorded:
        raise LrcError(f"{path} does not match its checksum (corrupted or edited): {rebuild}")
    if not np.array_equal(table.column("row_id").to_numpy(), np.arange(n)):
        raise LrcError(f"{path} is corrupt (row ids are not 0..{n - 1}): {rebuild}")
    check_candidates(path, ids)
    return ids, scores, meta | {"sha256": recorded}


def recorded_sha256(path: Path) -> str | None:
    """The content hash a negatives file records, from its schema alone (nothing else read or checked): to tell
    whether a finished run used this file; None when it is no readable negatives file."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).schema.metadata[_HASH_KEY].decode()
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None


def check_candidates(path: Path, ids: np.ndarray) -> None:
    """Every candidate is another row of the file's N rows, once per row: what the builder guarantees."""
    n = len(ids)
    rebuild = "rebuild it with `lrc build-negatives`"
    outside = np.argwhere((ids < 0) | (ids >= n))
    if outside.size:
        row, col = outside[0]
        raise LrcError(f"{path}: row {row} has candidate {ids[row, col]}, outside the {n} rows: {rebuild}")
    own = np.argwhere(ids == np.arange(n)[:, None])
    if own.size:
        raise LrcError(f"{path}: row {own[0][0]} is its own negative candidate: {rebuild}")
    ordered = np.sort(ids, axis=1)
    repeated = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
    if repeated.size:
        raise LrcError(f"{path}: row {repeated[0]} lists a candidate twice: {rebuild}")
