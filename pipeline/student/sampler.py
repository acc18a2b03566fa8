"""The per-epoch negatives samplers `train-student` reads: K of each row's M candidates from the negatives file
(`pipeline/cache/negatives_file.py`), or K other anchors of the same batch (`--negatives-source in-batch`).

Only the trainer uses them; `build-negatives` writes the file and never samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.negatives_file import read_negatives
from pipeline.core.errors import LrcError


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
