"""Stage `build-negatives`: cache -> negatives.arrow (M candidate negatives per train row) + negatives.json.

The core, `find_candidates`, is numpy + FAISS over the L2-normalised pooled teacher vectors (inner
product = cosine) and knows nothing of caches; `build_negatives` reads a cache and writes the files.
The file format and its reader live in `pipeline/cache/negatives_file.py`, the sampler `train-student` draws
with in `pipeline/student/sampler.py`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.cache.manifest import read_manifest
from pipeline.cache.negatives_file import (
    FORMAT, FORMAT_VERSION, is_negatives_file, manifest_path, read_negatives, write_negatives,
)
from pipeline.cache.reader import open_cache
from pipeline.core import atomic, outdir, reuse
from pipeline.core.config import NegativesConfig
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
# Where the inputs and output live and how the cache is checked: not what the file holds (the cache is compared by
# its fingerprint, so a cache copied elsewhere keeps its negatives).
_RUN_ONLY = ("cache_dir", "output", "verify_cache", "overwrite")


@dataclass(frozen=True)
class _Rows:
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


# --------------------------------------------------------------------------- core


def normalise(vectors: np.ndarray) -> np.ndarray:
    """(N, d) float32 rows scaled to unit length; an all-zero row stays zero (cosine 0 to everything)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def resolve_index(index: str, num_rows: int, exact_max_rows: int) -> str:
    """`auto` -> exact search for small caches, IVF above (faster than HNSW at equal recall, docs/PERFORMANCE.md,
    and its build is reproducible with all threads, where HNSW's must run on one)."""
    if index != "auto":
        return index
    return "flat" if num_rows <= exact_max_rows else "ivf"


def find_candidates(
    vectors: np.ndarray, labels: np.ndarray | None, input_keys: np.ndarray, regression: bool,
    config: NegativesConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """M candidate negatives per row: ids (N, M) int64, cosines (N, M) float32, and stats for the manifest."""
    n, m, start = len(input_keys), config.num_candidates, time.perf_counter()
    if n == 0:
        raise LrcError("the train split has no rows: re-extract the cache with its training data")
    m_hard = {"random": 0, "hard": m, "mixed": m // 2}[config.strategy]
    rows = _Rows(np.asarray(input_keys, np.int64), labels, regression, config.regression_margin)
    _check_qualifying(rows, m, m_hard, config)
    x = normalise(vectors)
    rng = np.random.default_rng(config.seed)
    stats: dict[str, Any] = {"index": None, "recall_at_m": None, "recall_at_pool": None, "recall_queries": 0}
    hard = np.zeros((n, 0), np.int64)
    if m_hard:
        pool, pool_stats = _hard_pool(x, rows, m_hard, config)
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


def _check_qualifying(rows: _Rows, m: int, m_hard: int, config: NegativesConfig) -> None:
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


def _hard_pool(
    x: np.ndarray, rows: _Rows, m_hard: int, config: NegativesConfig
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
            want: int, k0: int, rows: _Rows, bar: tqdm | None) -> tuple[np.ndarray, np.ndarray]:
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
               rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
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


def _calibrate(x: np.ndarray, rows: _Rows, search: Any, want: int, m: int, config: NegativesConfig) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- files


def check_outputs(out: Path) -> None:
    """Refuse before any work to replace a file this command did not write: `--output X` writes X and
    X's .json sibling (e.g. --output cache/manifest.arrow would otherwise replace cache/manifest.json)."""
    meta = manifest_path(out)
    fix = "choose another --output (a new .arrow name)"
    if meta == out:
        raise LrcError(f"--output {out} ends in .json, the name of its metadata file: {fix}")
    if out.is_dir():
        raise LrcError(f"--output {out} is a directory: {fix}")
    if out.exists() and not is_negatives_file(out):
        raise LrcError(f"--output {out} exists and is not a negatives file written by lrc: {fix}")
    if meta.exists():
        try:
            ours = json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise LrcError(f"--output {out} would replace {meta}, which build-negatives did not write: {fix}")


def build_negatives(config: NegativesConfig) -> Path:
    """`lrc build-negatives`: read the cache's train split, find candidates, write the Arrow file and manifest."""
    read_manifest(config.cache_dir)  # a missing or unfinished cache is refused before the lock creates anything in it
    with outdir.lock(config.output_path, "build-negatives"):
        return _build(config)


def settings(config: NegativesConfig, cache_fingerprint: str) -> dict[str, Any]:
    """What decides the file's content, recorded in negatives.json: a rerun with the same reuses the file."""
    raw = {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY}
    return json.loads(json.dumps(raw | {"candidates": config.num_candidates, "cache_fingerprint": cache_fingerprint}))


def _readable(path: Path) -> bool:
    """The file passes the checks training makes (format, checksum, ids): only such a file is reused."""
    try:
        read_negatives(path)
    except LrcError:
        return False
    return True


def _decide(config: NegativesConfig, wanted: dict[str, Any]) -> str:
    out, meta = config.output_path, manifest_path(config.output_path)
    recorded = json.loads(meta.read_text(encoding="utf-8")) if out.is_file() and meta.is_file() else None
    if recorded is None:  # nothing, or a build killed before its manifest: nothing to reuse
        held, changes = (reuse.UNFINISHED if out.exists() else reuse.EMPTY), []
    elif "settings" not in recorded or not _readable(out):  # built by an lrc that did not record them, or
        held, changes = reuse.UNFINISHED, []  # damaged since: rebuilt, as it always was
    else:
        held, changes = reuse.FINISHED, reuse.diff(recorded["settings"], wanted, run_only=_RUN_ONLY)
    return reuse.decide(held, changes, overwrite=config.overwrite, where=out, what="a negatives file",
                        option="--output", labels={"cache_fingerprint": "the cache (re-extracted or another cache)"})


def _build(config: NegativesConfig) -> Path:
    start = time.perf_counter()
    check_outputs(config.output_path)
    cache = open_cache(config.cache_dir, config.verify_cache)
    wanted = settings(config, cache.fingerprint)
    if _decide(config, wanted) == reuse.REUSE:
        logger.info("%s already holds these negatives: reusing it", config.output_path)
        return config.output_path
    task = cache.manifest["task"]  # None for a corpus cache
    train = cache.split("train")
    # A corpus cache has no labels: `hard` there means the nearest other windows, excluding only the row itself
    # and exact duplicates of its input (no label to exclude same-class rows by).
    vectors, labels, keys = train.pooled(), train.labels() if task else None, train.input_keys()
    logger.info("read %d train rows of %s (pooled width %d) in %.1f s", train.num_rows, cache.path,
                vectors.shape[1], time.perf_counter() - start)
    regression = bool(task and task["is_regression"])
    labels = labels.astype(np.float32 if regression else np.int64) if labels is not None else None
    ids, scores, stats = find_candidates(vectors, labels, keys, regression, config)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lrc_version": __version__,
        "cache_fingerprint": cache.fingerprint, "cache_dir": str(cache.path), "task": task["name"] if task else None,
        "strategy": config.strategy, "k": config.k, "candidates": config.num_candidates, "seed": config.seed,
        "regression_margin": config.regression_margin if regression else None, "rows": train.num_rows,
        **stats, "settings": wanted,
    }
    out = config.output_path
    manifest_path(out).unlink(missing_ok=True)  # a manifest beside a file being replaced would vouch for it
    write_negatives(out, ids, scores, meta)
    meta["seconds"] = round(time.perf_counter() - start, 2)
    atomic.write_json(manifest_path(out), meta, sort_keys=True)  # last: its presence says the build finished
    logger.info("wrote %s (%d rows x %d candidates, %s) in %.1f s", out, len(ids), ids.shape[1], config.strategy,
                meta["seconds"])
    return out
