"""The M candidate negatives per row, `find_candidates`: numpy over the L2-normalised pooled teacher vectors
(inner product = cosine), knowing nothing of caches. Hard candidates are drawn from each row's top-P pool
(`pipeline/negatives/search.py`), the rest uniformly at random; every candidate gets its cosine."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.errors import LrcError
from pipeline.negatives.search import Rows, hard_pool

logger = logging.getLogger(__name__)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """(N, d) float32 rows scaled to unit length; an all-zero row stays zero (cosine 0 to everything)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def find_candidates(
    vectors: np.ndarray, labels: np.ndarray | None, input_keys: np.ndarray, regression: bool,
    config: NegativesConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """M candidate negatives per row: ids (N, M) int64, cosines (N, M) float32, and stats for the manifest."""
    n, m, start = len(input_keys), config.num_candidates, time.perf_counter()
    if n == 0:
        raise LrcError("the train split has no rows: re-extract the cache with its training data")
    m_hard = {"random": 0, "hard": m, "mixed": m // 2}[config.strategy]
    rows = Rows(np.asarray(input_keys, np.int64), labels, regression, config.regression_margin)
    _check_qualifying(rows, m, m_hard, config)
    x = normalise(vectors)
    rng = np.random.default_rng(config.seed)
    stats: dict[str, Any] = {"index": None, "recall_at_m": None, "recall_at_pool": None, "recall_queries": 0}
    hard = np.zeros((n, 0), np.int64)
    if m_hard:
        pool, pool_stats = hard_pool(x, rows, m_hard, config)
        stats.update(pool_stats)
        hard = _draw_from_pool(pool, m_hard, rng)
        stats["max_uses_top"] = int(np.bincount(pool[:, :m_hard].ravel(), minlength=n).max())
    ids = _random_fill(hard, m, rows.keys, rng)
    scores = _cosines(x, ids)
    uses = np.bincount(ids.ravel(), minlength=n)
    stats.update(max_uses=int(uses.max()), max_uses_row=int(uses.argmax()), mean_uses=float(m))
    logger.info("most-used negative: row %d appears in %d candidate lists (mean %d)%s", stats["max_uses_row"],
                stats["max_uses"], m, f"; top-{m_hard} without the pool: {stats['max_uses_top']}" if m_hard else "")
    logger.info("%d %s candidates for each of %d rows in %.1f s", m, config.strategy, n, time.perf_counter() - start)
    return ids, scores, stats


def _check_qualifying(rows: Rows, m: int, m_hard: int, config: NegativesConfig) -> None:
    """Fail before any search when some row cannot have M distinct negatives (or M_hard hard ones)."""
    n, fix = len(rows.keys), "lower --candidates (default max(4*K, 16)) or --k"
    _, key_of, key_count = np.unique(rows.keys, return_inverse=True, return_counts=True)
    others = n - key_count[key_of]  # rows with a different input
    if others.min() < m:
        raise LrcError(f"{m} candidate negatives per row, but some row has only {others.min()} other distinct inputs "
                       f"among {n} rows: {fix}")
    if config.hard_pool is not None and config.hard_pool < m_hard:
        raise LrcError(f"--hard-pool {config.hard_pool} is smaller than the {m_hard} hard candidates it feeds: raise it")
    if not m_hard or rows.labels is None:
        return
    if rows.regression:  # an upper bound (same-input rows aside); the exact count is checked after the search
        y = np.sort(rows.labels)
        below = np.searchsorted(y, rows.labels - rows.margin, "right")
        far = below + n - np.searchsorted(y, rows.labels + rows.margin)
        far = far if rows.margin > 0 else np.full(n, n - 1)
        if far.min() < m_hard:
            raise LrcError(f"hard negatives need {m_hard} rows whose label differs by >= {rows.margin}, but the row "
                           f"labelled {rows.labels[far.argmin()]:g} has {far.min()}: lower --regression-margin, "
                           f"{fix}, or use --strategy random or mixed")
        return
    classes, label_of, label_count = np.unique(rows.labels, return_inverse=True, return_counts=True)
    _, pair_of, pair_count = np.unique(key_of * len(classes) + label_of, return_inverse=True, return_counts=True)
    # other-label rows, minus those with the anchor's own input (a duplicate input labelled differently)
    qualify = n - label_count[label_of] - (key_count[key_of] - pair_count[pair_of])
    if qualify.min() < m_hard:
        worst = int(qualify.argmin())
        raise LrcError(f"hard negatives need {m_hard} rows of another label per row, but label "
                       f"{classes[label_of[worst]]} holds {label_count[label_of[worst]]} of {n} rows and leaves only "
                       f"{qualify.min()}: use --strategy random or mixed, or {fix}")


def _draw_from_pool(pool: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m of each row's valid pool entries, uniformly at random, so the same rows don't serve everyone."""
    keys = rng.random(pool.shape)
    keys[pool < 0] = np.inf
    return np.take_along_axis(pool, np.argsort(keys, axis=1)[:, :m], 1)


def _random_fill(fixed: np.ndarray, m: int, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Append m - fixed.shape[1] uniform draws per row: distinct, not in `fixed`, not the row's own input."""
    n, m0 = fixed.shape
    ids = np.hstack([fixed, rng.integers(0, n, (n, m - m0))])
    todo = np.arange(n)
    for _ in range(64):  # each round redraws only the bad entries; a handful of rounds in practice
        bad = _bad_draws(ids[todo], todo, m0, keys)
        todo = todo[bad.any(1)]
        if todo.size == 0:
            return ids
        sub = ids[todo]
        bad = bad[bad.any(1)]
        sub[bad] = rng.integers(0, n, int(bad.sum()))
        ids[todo] = sub
    for i in todo:  # tiny datasets where few rows qualify: draw exactly from what is left
        left = np.setdiff1d(np.flatnonzero(keys != keys[i]), ids[i, :m0])
        ids[i, m0:] = rng.choice(left, m - m0, replace=False)
    return ids


def _bad_draws(ids: np.ndarray, row: np.ndarray, m0: int, keys: np.ndarray) -> np.ndarray:
    """(b, M) bool over the drawn columns (>= m0): the row's own input, or a repeat of an earlier column."""
    order = np.argsort(ids, axis=1, kind="stable")  # stable: the first of equal ids keeps the lowest column
    sorted_ids = np.take_along_axis(ids, order, 1)
    repeat = np.zeros(ids.shape, bool)
    np.put_along_axis(repeat, order[:, 1:], sorted_ids[:, 1:] == sorted_ids[:, :-1], 1)
    bad = repeat | (keys[ids] == keys[row][:, None])
    bad[:, :m0] = False
    return bad


def _cosines(x: np.ndarray, ids: np.ndarray, block: int = 4096) -> np.ndarray:
    """(N, M) float32 cosine of each anchor with its candidates (x is unit-normalised)."""
    out = np.empty(ids.shape, np.float32)
    for s in range(0, len(ids), block):
        out[s : s + block] = np.einsum("bd,bmd->bm", x[s : s + block], x[ids[s : s + block]])
    return out
