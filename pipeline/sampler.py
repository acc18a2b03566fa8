"""The negatives file and its reader: what `train-student` draws K of each row's M candidates from.

`negatives.arrow` (Arrow IPC file: row_id, candidates [M] int64, scores [M] float32, the build's
metadata and the sha256 of the candidates and scores in the schema) is written by
`pipeline/negatives.py`; `NegativeSampler` reads it, checks the hash and that every candidate is
another row of the cache. This module needs no FAISS, so training never loads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import atomic
from pipeline.errors import LrcError

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


# --------------------------------------------------------------------------- sampling


_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draw_keys(seed: int, epoch: int, row_ids: np.ndarray, m: int) -> np.ndarray:
    """(B, m) uint64 pseudo-random keys that depend only on (seed, epoch, row id, column)."""
    state = _mix64(np.array([seed & _MASK64], np.uint64) + _GAMMA)
    state = _mix64(state ^ np.array([epoch & _MASK64], np.uint64))
    per_row = _mix64(state ^ (np.asarray(row_ids).astype(np.uint64) * _GAMMA))  # (B,)
    columns = np.arange(1, m + 1, dtype=np.uint64) * _GAMMA  # splitmix64's stream: state + i * gamma
    return _mix64(per_row[:, None] + columns[None, :])


class NegativeSampler:
    """Draws K of each anchor's M candidates; the draw depends only on (seed, epoch, row id).

    So a row gets the same negatives whichever batch, DataLoader worker or resumed run asks for it.
    """

    def __init__(self, path: Path, k: int, seed: int, expected_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        self.candidates, self.scores, self.meta = read_negatives(self.path)
        self.k, self.seed = k, seed
        built_from = self.meta["cache_fingerprint"]
        if expected_fingerprint is not None and built_from != expected_fingerprint:
            raise LrcError(f"negatives file {self.path} was built from another cache (fingerprint {built_from[:12]}, "
                           f"this cache {expected_fingerprint[:12]}): rebuild it with `lrc build-negatives`")
        if not 0 < k <= self.num_candidates:
            raise LrcError(f"K={k} negatives per anchor, but {self.path} holds {self.num_candidates} candidates per "
                           f"row: lower --k or rebuild with `lrc build-negatives --candidates {max(k, 1)}` or more")

    @property
    def num_rows(self) -> int:
        return self.candidates.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.candidates.shape[1]

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        """(B,) row ids -> (B, K) int64 negative row ids: a uniform K-subset of each row's M candidates."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        outside = row_ids[(row_ids < 0) | (row_ids >= self.num_rows)]
        if outside.size:
            raise LrcError(f"row id {outside[0]} outside the {self.num_rows} rows of {self.path}: "
                           "was it built from this cache? rebuild it with `lrc build-negatives`")
        pick = np.argsort(draw_keys(self.seed, epoch, row_ids, self.num_candidates), axis=1)[:, : self.k]
        return np.take_along_axis(self.candidates[row_ids], pick, 1)


class InBatchNegatives:
    """K negatives per anchor drawn uniformly from the OTHER anchors of its batch (docs/DESIGN.md §3): the anchors of a
    shuffled batch are a uniform sample of the split, so this is the paper's `random` strategy without a
    negatives file and without reading any row twice.

    The draw is a function of (seed, epoch, the batch's row ids) alone, and the batch is a function of
    (seed, epoch, step), so a resumed run draws the same negatives. An anchor is never its own negative;
    the K are distinct anchors. A batch of B rows offers B - 1 others: with B - 1 < K (only a short last
    batch: `TrainConfig` refuses --batch-size <= --k) each anchor gets all B - 1 others (K' = B - 1, which
    COS-NCE's 1/(2K) normalises), and a batch of one row gets none (the positive term alone).
    """

    in_batch = True

    def __init__(self, k: int, seed: int) -> None:
        if k <= 0:
            raise LrcError(f"in-batch negatives need K > 0, got {k}")
        self.k, self.seed = k, seed

    def positions(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        """(B,) row ids -> (B, min(K, B - 1)) int64 positions in the batch, never the anchor's own."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        b = len(row_ids)
        keys = draw_keys(self.seed, epoch, row_ids, b)  # (B, B): row i's random order over the batch positions
        keys[np.arange(b), np.arange(b)] = np.iinfo(np.uint64).max  # the anchor itself sorts last, never picked
        return np.argsort(keys, axis=1, kind="stable")[:, : min(self.k, b - 1)].astype(np.int64)

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        """(B,) row ids -> (B, K') negative row ids (the NegativeSource protocol)."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        return row_ids[self.positions(row_ids, epoch)]
