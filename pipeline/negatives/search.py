"""The hard-negative search of build-negatives: which rows may be a row's hard negatives (`Rows`), the FAISS
index (flat, HNSW or IVF; docs/DESIGN.md §6), the filtered and widened top-P search with its brute-force fallback,
and the recall calibration of an approximate index against exact search."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.errors import LrcError

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

_QUERY_BLOCK = 8192  # queries per FAISS call: bounds the (block, k) result arrays and paces the progress bar
_EXACT_BLOCK = 64  # queries per numpy brute-force block: bounds the (64, N) float32 score block
_HNSW_M = 32  # graph degree: recall >= 0.99 on clustered 768-d data at efSearch 128 (docs/DESIGN.md §6)
_HNSW_EF_SEARCH = 128
# IVF: ~2 sqrt(n) lists, k-means on 64 points per list for 10 iterations, 8 lists probed: chosen on
# clustered rows (docs/PERFORMANCE.md); more lists make k-means dearer than the scans they save, fewer
# make the scans dearer.
_IVF_LISTS_PER_SQRT_N = 2
_IVF_TRAIN_PER_LIST = 64
_IVF_NITER = 10
_IVF_NPROBE = 8  # x search effort
_RECALL_TARGET = 0.95  # the floor; below it the search widens (x2 effort) and retries
_EFFORTS = (1, 2, 4, 8)
_WIDEN = 4  # a filtered top list that came back short is searched again this many times wider
_MAX_WIDENINGS = 2  # ... and after that brute-forced, so approximate misses never lose qualifying rows


@dataclass(frozen=True)
class Rows:
    """What decides whether row j may be a hard negative of row i."""

    keys: np.ndarray  # (N,) int64, equal for identical inputs (covers the row itself)
    labels: np.ndarray | None  # (N,) class ids or float targets
    regression: bool
    margin: float

    def reject(self, q: np.ndarray, cand_keys: np.ndarray, cand_labels: np.ndarray | None) -> np.ndarray:
        """(b, k) bool: candidate is the anchor's own input, or too alike in label. q: (b,) anchor ids."""
        bad = cand_keys == self.keys[q][:, None]
        if self.labels is not None:
            anchor = self.labels[q][:, None]
            bad |= np.abs(cand_labels - anchor) < self.margin if self.regression else cand_labels == anchor
        return bad


def resolve_index(index: str, num_rows: int, exact_max_rows: int) -> str:
    """`auto` -> exact search for small caches, IVF above (faster than HNSW at equal recall, docs/PERFORMANCE.md,
    and its build is reproducible with all threads, where HNSW's must run on one)."""
    if index != "auto":
        return index
    return "flat" if num_rows <= exact_max_rows else "ivf"


def hard_pool(
    x: np.ndarray, rows: Rows, m_hard: int, config: NegativesConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """Each row's top-P qualifying neighbours, best first: ids (N, P) with -1 where fewer exist."""
    n, m = x.shape[0], config.num_candidates
    want = config.hard_pool if config.hard_pool is not None else 4 * m
    kind = resolve_index(config.index, n, config.exact_max_rows)
    # One index per label, each anchor searched only against the other labels', so same-label rows never
    # crowd its top list; regression (or no labels) searches one index wider and filters.
    by_label = rows.labels is not None and not rows.regression
    groups = [np.flatnonzero(rows.labels == c) for c in np.unique(rows.labels)] if by_label else [np.arange(n)]
    start = time.perf_counter()
    indexes = [_build_index(kind, x[db], config.seed) for db in groups]
    logger.info("built %d %s index(es) over %d rows in %.1f s", len(groups), kind, n, time.perf_counter() - start)
    k0 = want + 16 if by_label or rows.labels is None else 4 * want

    def search(anchors: np.ndarray, effort: int, bar: tqdm | None) -> tuple[np.ndarray, np.ndarray]:
        pool, scores = np.full((len(anchors), want), -1, np.int64), np.full((len(anchors), want), -np.inf, np.float32)
        for index, db in zip(indexes, groups):
            sel = np.flatnonzero(rows.labels[anchors] != rows.labels[db[0]]) if by_label else np.arange(len(anchors))
            ids, sc = _search(index, kind, effort, db, x, anchors[sel], want, k0, rows, bar)
            both_ids, both_scores = np.hstack([pool[sel], ids]), np.hstack([scores[sel], sc])
            order = np.argsort(-both_scores, axis=1, kind="stable")[:, :want]
            pool[sel], scores[sel] = np.take_along_axis(both_ids, order, 1), np.take_along_axis(both_scores, order, 1)
        return pool, scores

    stats: dict[str, Any] = {"index": kind, "hard_pool": want, "search_effort": 1}
    if kind != "flat":
        stats.update(_calibrate(x, rows, search, want, m, config))
    start = time.perf_counter()
    total = n * (len(groups) - 1) if by_label else n
    with tqdm(total=total, unit="query", desc=f"hard negatives ({kind})", disable=None) as bar:
        pool, _ = search(np.arange(n), stats["search_effort"], bar)
    logger.info("hard-negative search (%s, top %d of %d rows): %.1f s", kind, want, n, time.perf_counter() - start)
    short = (pool >= 0).sum(1)
    if short.min() < m_hard:
        raise LrcError(f"row {short.argmin()} has only {short.min()} qualifying hard negatives: lower "
                       "--regression-margin or --candidates, or use --strategy random or mixed")
    return pool, stats


def _build_index(kind: str, x_db: np.ndarray, seed: int) -> faiss.Index:
    # Imported here, the one place an index is built: random negatives need none, so importing this stage
    # (and every test or benchmark that builds random negatives) does not load FAISS and its OpenMP runtime.
    import faiss

    d = x_db.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    else:
        # >= 39 training points per list: FAISS's floor for a stable k-means
        nlist = int(max(1, min(_IVF_LISTS_PER_SQRT_N * np.sqrt(len(x_db)), len(x_db) // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.niter = seed, _IVF_NITER
        sample = np.random.default_rng(seed).permutation(len(x_db))[: _IVF_TRAIN_PER_LIST * nlist]
        index.train(x_db[np.sort(sample)])
    threads = faiss.omp_get_max_threads()
    if kind == "hnsw":  # a multi-threaded HNSW build links nodes in thread order: not reproducible
        faiss.omp_set_num_threads(1)
    try:
        index.add(x_db)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def _search(index: faiss.Index, kind: str, effort: int, db: np.ndarray, x: np.ndarray, q_all: np.ndarray,
            want: int, k0: int, rows: Rows, bar: tqdm | None) -> tuple[np.ndarray, np.ndarray]:
    """Top `want` qualifying rows of `db` for each query (global ids, -1 / -inf padded), widening if short.

    A query's result depends on nothing but the query, so a sample searched alone gets what the full run gets.
    """
    out_ids, out_scores = np.full((len(q_all), want), -1, np.int64), np.full((len(q_all), want), -np.inf, np.float32)
    db_keys, db_labels = rows.keys[db], None if rows.labels is None else rows.labels[db]
    order = np.arange(len(q_all))
    if kind == "ivf":  # queries that probe the same lists one after another find them in cache (docs/PERFORMANCE.md)
        index.nprobe = min(index.nlist, _IVF_NPROBE * effort)
        order = np.argsort(index.quantizer.search(x[q_all], 1)[1][:, 0], kind="stable")
    for s in range(0, len(q_all), _QUERY_BLOCK):
        pending, k = order[s : s + _QUERY_BLOCK], min(k0, len(db))
        for widening in range(_MAX_WIDENINGS + 1):
            if kind == "hnsw":
                index.hnsw.efSearch = max(_HNSW_EF_SEARCH * effort, k)
            scores, local = index.search(x[q_all[pending]], k)
            safe = np.maximum(local, 0)
            cand_labels = None if db_labels is None else db_labels[safe]
            bad = (local < 0) | rows.reject(q_all[pending], db_keys[safe], cand_labels)
            out_ids[pending], out_scores[pending] = _keep_best(np.where(local >= 0, db[safe], -1), scores, bad, want)
            pending = pending[(out_ids[pending] < 0).any(1)]
            if pending.size == 0 or (k == len(db) and kind == "flat"):  # exact and exhaustive: truly short
                break
            if k == len(db) or widening == _MAX_WIDENINGS:
                out_ids[pending], out_scores[pending] = _exact_top(x[db], db, x, q_all[pending], want, rows)
                break
            k = min(k * _WIDEN, len(db))
        if bar is not None:
            bar.update(min(_QUERY_BLOCK, len(q_all) - s))
    return out_ids, out_scores


def _keep_best(ids: np.ndarray, scores: np.ndarray, bad: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `want` unrejected entries of each (score-sorted) row, padded with -1 / -inf."""
    scores = np.where(bad, -np.inf, scores).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
    best, best_scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    best[np.isneginf(best_scores)] = -1
    pad = want - best.shape[1]  # k < want when the database itself is small
    return np.pad(best, ((0, 0), (0, pad)), constant_values=-1), np.pad(best_scores, ((0, 0), (0, pad)),
                                                                        constant_values=-np.inf)


def _exact_top(x_db: np.ndarray, db: np.ndarray, x: np.ndarray, q: np.ndarray, want: int,
               rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top `want` qualifying rows of `db` for queries q (numpy, blockwise)."""
    db_keys, db_labels = rows.keys[db][None, :], None if rows.labels is None else rows.labels[db][None, :]
    out = [np.empty((0, want), np.int64)], [np.empty((0, want), np.float32)]
    for s in range(0, len(q), _EXACT_BLOCK):
        qb = q[s : s + _EXACT_BLOCK]
        scores = x[qb] @ x_db.T  # (b, |db|)
        scores[rows.reject(qb, db_keys, db_labels)] = -np.inf
        top = np.argpartition(-scores, min(want, len(db)) - 1, axis=1)[:, :want] if want < len(db) else \
            np.broadcast_to(np.arange(len(db)), scores.shape)
        ids, sc = _keep_best(db[top], np.take_along_axis(scores, top, 1), np.zeros(top.shape, bool), want)
        out[0].append(ids)
        out[1].append(sc)
    return np.concatenate(out[0]), np.concatenate(out[1])


def _calibrate(x: np.ndarray, rows: Rows, search: Any, want: int, m: int, config: NegativesConfig) -> dict[str, Any]:
    """Search a seeded sample of anchors, widening the search (nprobe / efSearch) until recall@M >= target.

    Recall is against exact search, and what the sample gets here is what it gets in the full run.
    """
    sample = np.sort(np.random.default_rng(config.seed + 1).permutation(len(x))[: config.recall_sample])
    start = time.perf_counter()
    exact, _ = _exact_top(x, np.arange(len(x)), x, sample, want, rows)
    for effort in _EFFORTS:
        approx, _ = search(sample, effort, None)
        hits_m, hits_p = [], []
        for got, truth in zip(approx, exact):
            truth = truth[truth >= 0]
            hits_p.append(len(np.intersect1d(got, truth)) / max(len(truth), 1))
            hits_m.append(len(np.intersect1d(got[:m], truth[:m])) / max(min(m, len(truth)), 1))
        recall_m, recall_p = float(np.mean(hits_m)), float(np.mean(hits_p))
        logger.info("recall vs exact search on %d anchors at search effort %d: @%d %.4f, @%d %.4f (%.1f s)",
                    len(sample), effort, m, recall_m, want, recall_p, time.perf_counter() - start)
        if recall_m >= _RECALL_TARGET:
            break
    else:
        logger.warning("approximate index recall@%d is %.3f even at search effort %d: pass --index flat for exact "
                       "search (slower)", m, recall_m, effort)
    return {"recall_at_m": recall_m, "recall_at_pool": recall_p, "recall_queries": len(sample), "search_effort": effort}
