"""What the integrity checks cost on a large cache (docs/RELIABILITY.md).

Builds a cache of synthetic shards with the library's own writer (random fp16 hidden states, 25 tokens
per row, 4 layers x 768: a BERT-base teacher's bytes per SST-2 row), then times, alternating A and B
where two variants are compared:
  write     `cache.write_shard` (sha256 computed while writing + sidecar + sampled hash) against a plain
            Arrow write of the same batch (what the writer did before)
  open      `open_cache` at each check level, page cache warm and cold (posix_fadvise DONTNEED, these
            files only); `full` is also what a resumed extraction pays to re-check the shards present
  finite    the NaN/inf checks: extract's per-shard `check_finite_outputs`, train-student's per-batch
            `check_batch_finite` (batch 16, 64 tokens, K=4 negatives) against the step it guards
  negatives loading a 400k x 16 negatives file with its content hash and candidate checks

    python benchmarks/bench_integrity.py --gb 3 [--dir /some/disk/with/space]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache import format as cache
from pipeline.cache.manifest import assemble_manifest
from pipeline.cache.reader import open_cache
from common import gemm_probe

TOKENS, LAYERS, WIDTH = 25, 4, 768


def synthetic_batch(rows: int, start: int, rng: np.random.Generator) -> pa.RecordBatch:
    schema = cache.shard_schema(list(range(1, LAYERS + 1)), WIDTH, 2, False, "float16", True)
    ids = [rng.integers(1000, 30000, TOKENS).astype(np.int32) for _ in range(rows)]
    hidden = {j: rng.standard_normal((rows * TOKENS, WIDTH), np.float32).astype(np.float16) for j in range(1, LAYERS + 1)}
    return cache.make_record_batch(schema, np.arange(start, start + rows), ids, [np.zeros(TOKENS, np.int8)] * rows,
                                   rng.integers(0, 2, rows), rng.standard_normal((rows, 2)).astype(np.float32),
                                   hidden, rng.standard_normal((rows, WIDTH)).astype(np.float16))


def plain_write(path: Path, batch: pa.RecordBatch) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build(root: Path, gigabytes: float, shard_rows: int) -> tuple[Path, dict[str, list[float]]]:
    """The cache, and write seconds per shard: library writer vs plain write, alternated shard by shard."""
    rng = np.random.default_rng(0)
    out, times = root / "cache", {"write_shard (hash while writing + sidecar)": [], "plain Arrow write": []}
    row_bytes = TOKENS * LAYERS * WIDTH * 2
    shards = max(2, round(gigabytes * 1e9 / (row_bytes * shard_rows)))
    for s in range(shards):
        batch = synthetic_batch(shard_rows, s * shard_rows, rng)
        start = time.perf_counter()
        plain_write(root / "plain.arrow", batch)
        times["plain Arrow write"].append(time.perf_counter() - start)
        (root / "plain.arrow").unlink()
        start = time.perf_counter()
        cache.write_shard(out, "train", s * shard_rows, (s + 1) * shard_rows, batch)
        times["write_shard (hash while writing + sidecar)"].append(time.perf_counter() - start)
    settings = {"splits": {"train": {"rows": shards * shard_rows, "hidden": True}}, "layers": list(range(1, LAYERS + 1)),
                "hidden_size": WIDTH, "hidden_dtype": "float16", "max_length": 128, "task": None,
                "teacher": {"config": {}, "weights_sha256": "", "num_layers": LAYERS, "hidden_size": WIDTH}}
    assemble_manifest(out, settings, {})
    return out, times


def time_open(out: Path, check: str, cold: bool) -> float:
    paths = sorted((out / "shards").glob("*.arrow"))
    if cold:
        drop_from_page_cache(paths)
    start = time.perf_counter()
    open_cache(out, check=check)
    return time.perf_counter() - start


def finite_costs(shard_rows: int) -> dict[str, float]:
    from pipeline.core.config import DataConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.student.step import check_batch_finite
    from pipeline.teacher.teacher_pass import check_finite_outputs

    rng = np.random.default_rng(1)
    hidden = {j: rng.standard_normal((shard_rows * TOKENS, WIDTH), np.float32).astype(np.float16) for j in range(1, 5)}
    shard = {"logits": rng.standard_normal((shard_rows, 2)).astype(np.float32), "hidden": hidden,
             "pooled": rng.standard_normal((shard_rows, WIDTH)).astype(np.float16)}
    config = ExtractConfig(teacher=Path("t"), data=DataConfig(task="sst2"), output_dir=Path("o"))
    start = time.perf_counter()
    check_finite_outputs(shard, [TOKENS] * shard_rows, "train", 0, config)
    per_shard = time.perf_counter() - start
    b, length, k = 16, 64, 4
    batch = {"row_ids": torch.arange(b), "labels": torch.zeros(b), "teacher_logits": torch.randn(b, 2),
             "teacher_hidden": torch.randn(LAYERS, b, length, WIDTH).half(), "negative_ids": torch.zeros(b, k).long(),
             "negative_hidden": torch.randn(LAYERS, b, k, length, WIDTH).half()}
    calls = []
    for _ in range(20):
        start = time.perf_counter()
        check_batch_finite(batch, Path("cache"))
        calls.append(time.perf_counter() - start)
    gb = sum(h.nbytes for h in hidden.values()) / 1e9
    return {"extract check_finite_outputs, s per GB of hidden states": per_shard / gb,
            "train check_batch_finite, ms per batch (16 x 64 tokens, K=4, 4 x 768 fp16)": 1e3 * statistics.median(calls)}


def negatives_cost(root: Path, rows: int = 400_000, m: int = 16) -> dict[str, float]:
    from pipeline.cache.negatives_file import FORMAT, FORMAT_VERSION, check_candidates, read_negatives, write_negatives

    rng = np.random.default_rng(2)
    ids = (np.arange(rows)[:, None] + rng.integers(1, rows - m, (rows, 1)) + np.arange(m)[None, :]) % rows
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "cache_fingerprint": "x", "candidates": m}
    path = root / "negatives.arrow"
    write_negatives(path, ids, np.zeros((rows, m), np.float32), meta)
    start = time.perf_counter()
    read_negatives(path)
    total = time.perf_counter() - start
    start = time.perf_counter()
    check_candidates(path, ids)
    return {f"read_negatives {rows} x {m} (hash + checks), s": total, "of which candidate checks, s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the synthetic cache")
    parser.add_argument("--shard-rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to build it (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lrc-integrity-", dir=args.dir))
    try:
        print(f"GEMM probe before: {gemm_probe():.0f} GFLOP/s fp32", flush=True)
        out, writes = build(root, args.gb, args.shard_rows)
        total = sum(p.stat().st_size for p in (out / "shards").glob("*.arrow"))
        shards = len(list((out / "shards").glob("*.arrow")))
        print(f"cache: {total / 1e9:.2f} GB in {shards} shards of {args.shard_rows} rows")
        print("\n| what | seconds | GB/s |\n|---|---|---|")
        for name, values in writes.items():
            print(f"| {name}, per shard (median of {len(values)}) | {statistics.median(values):.2f} | "
                  f"{total / shards / statistics.median(values) / 1e9:.2f} |")
        results: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for check in ("size", "quick", "full"):
                for cold in (True, False):
                    name = f"open_cache check={check}, page cache {'cold' if cold else 'warm'}"
                    results.setdefault(name, []).append(time_open(out, check, cold))
        for name, values in results.items():
            best = min(values)
            print(f"| {name} (best of {len(values)}) | {best:.3f} | {total / best / 1e9:.2f} |")
        for name, value in {**finite_costs(args.shard_rows), **negatives_cost(root)}.items():
            print(f"| {name} | {value:.3f} | |")
        print(f"GEMM probe after: {gemm_probe():.0f} GFLOP/s fp32")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
