"""Time `build-negatives` (find_candidates + the Arrow write) on synthetic pooled vectors.

Vectors are clustered like real sentence embeddings (a few hundred Gaussian centres + noise,
L2-normalised) with binary labels that follow the clusters (80% purity, as a fine-tuned teacher's
pooled vectors would), so a hard-negative query searches the *other* label's index, away from its
own cluster. Prints a GEMM probe before and after (the machine's speed drifts) and a markdown table.

    /work/venv/bin/python benchmarks/bench_negatives.py            # the full set: ~5 min idle, 15+ busy
    /work/venv/bin/python benchmarks/bench_negatives.py --quick    # 20k rows, a smoke run
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from pipeline.cache.negatives_file import write_negatives
from pipeline.core.negatives_config import NegativesConfig
from pipeline.negatives.candidates import find_candidates

# (rows, width, strategy, index): random needs no index; hard compares HNSW and IVF side by side at 100k
# and exact search with IVF at 50k, where `auto` switches
FULL = [
    (50_000, 768, "hard", "flat"), (50_000, 768, "hard", "ivf"),  # auto's exact/approximate boundary
    (100_000, 384, "random", "auto"), (100_000, 768, "random", "auto"),
    (100_000, 384, "hard", "ivf"), (100_000, 384, "hard", "hnsw"),
    (100_000, 768, "hard", "ivf"), (100_000, 768, "hard", "hnsw"),
    (400_000, 384, "random", "auto"), (400_000, 768, "random", "auto"),
    (400_000, 384, "hard", "ivf"), (400_000, 768, "hard", "ivf"),
]
QUICK = [(20_000, 384, "random", "auto"), (20_000, 384, "hard", "hnsw"), (20_000, 384, "hard", "ivf")]


def gemm_probe(size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a size^3 fp32 matmul through numpy, best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic(n: int, d: int, centres: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors (n, d) float32 unit rows, labels (n,) int64, keys (n,) int64 with ~0.5% exact duplicates)."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((centres, d), dtype=np.float32)
    cluster = rng.integers(0, centres, n)
    x = mean[cluster]
    x += rng.standard_normal((n, d), dtype=np.float32) * 0.6  # cos ~0.7 within a cluster, ~0 across
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    majority = rng.integers(0, 2, centres)
    labels = np.where(rng.random(n) < 0.8, majority[cluster], 1 - majority[cluster]).astype(np.int64)
    keys = np.arange(n, dtype=np.int64)
    dup = rng.choice(n, n // 200, replace=False)  # duplicate inputs, as GLUE train sets have
    src = rng.integers(0, n, len(dup))
    x[dup], keys[dup] = x[src], keys[src]
    return x, labels, keys


def run(n: int, d: int, strategy: str, index: str, data: tuple[np.ndarray, np.ndarray, np.ndarray],
        tmp: Path) -> dict[str, object]:
    x, labels, keys = data
    cfg = NegativesConfig(cache_dir=tmp, k=4, strategy=strategy, index=index, seed=0)
    start, cpu = time.perf_counter(), time.process_time()
    ids, scores, stats = find_candidates(x, labels, keys, False, cfg)
    search = time.perf_counter() - start
    write_negatives(tmp / "negatives.arrow", ids, scores, {"format": "lrc-negatives", "candidates": ids.shape[1]})
    total = time.perf_counter() - start
    row = {"rows": n, "width": d, "strategy": strategy, "index": stats["index"] or "-", "seconds": total,
           "cpu": time.process_time() - cpu, "effort": stats.get("search_effort"),
           "write": total - search, "recall": stats["recall_at_m"], "recall_pool": stats["recall_at_pool"],
           "max_uses": stats["max_uses"], "max_uses_top": stats.get("max_uses_top")}
    print(_line(row), flush=True)
    return row


def _line(r: dict[str, object]) -> str:
    def fmt(v: object, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (f"| {r['rows']:>7,} | {r['width']} | {r['strategy']:<6} | {r['index']:<5} | {r['seconds']:7.1f} | "
            f"{r['cpu']:7.1f} | {fmt(r['effort'], 'd')} | "
            f"{fmt(r['recall'], '.4f')} | {fmt(r['recall_pool'], '.4f')} | {r['max_uses']} | "
            f"{fmt(r['max_uses_top'], 'd')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k rows only: a smoke run")
    parser.add_argument("--only", default=None, help="run only cases whose 'rows/width/strategy/index' contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {faiss.omp_get_max_threads()} FAISS threads, {platform.python_version()}, "
          f"faiss {faiss.__version__}, numpy {np.__version__}")
    print(f"GEMM probe before: {gemm_probe():.0f} GFLOP/s fp32")
    cases = QUICK if args.quick else FULL
    if args.only:
        cases = [c for c in cases if args.only in "/".join(map(str, c))]
    print("| rows | width | strategy | index | wall s | CPU s | effort | recall@M | recall@pool | max uses | "
          "max uses, top-M |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    data: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n, d, strategy, index in sorted(cases, key=lambda c: (c[0], c[1])):  # stable: keeps A, B order
            if (n, d) not in data:
                data.clear()  # one dataset in memory at a time (400k x 768 is 1.2 GB)
                data[(n, d)] = synthetic(n, d)
            run(n, d, strategy, index, data[(n, d)], Path(tmp))
    print(f"GEMM probe after: {gemm_probe():.0f} GFLOP/s fp32 (benchmark wall time {time.perf_counter() - wall:.0f} s)")


if __name__ == "__main__":
    main()
