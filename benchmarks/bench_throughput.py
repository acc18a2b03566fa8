"""Training throughput of the 4 x 312 student from the cache: steps/s and anchor rows/s over a grid of batch
sizes, negatives sources (file, in-batch) and cache storages (float16, int8), in one process, each point
through the library's data path (CacheDataset, DataLoader with train-student's default workers) and step.

The teacher is a BERT-base-shaped 12 x 768 random model (throughput does not depend on its weights), rows are
real SST-2 (or MRPC) train sentences. Each point runs --warmup steps, then --steps timed steps with the device
synchronised at both ends; on CUDA the allocator's peak is reported too.

    python benchmarks/bench_throughput.py --device cuda --batch-sizes 16,64
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

import torch

from bench_train import TRAIN_ROWS, prepare, run_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--sources", default="file,in-batch")
    parser.add_argument("--dtypes", default="float16,int8")
    parser.add_argument("--task", default="sst2", choices=sorted(TRAIN_ROWS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = max(sizes) * (args.steps + args.warmup + 3) + 64
    work = Path(tempfile.mkdtemp(prefix="lrc-bench-throughput-"))
    caches = {d: prepare(work, "bert-base", rows, args.data_dir, d, args.task) for d in args.dtypes.split(",")}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, 4 x 312 student, BERT-base-shaped teacher cache, {args.task} rows, K = 4, perturbation on")
    print("| batch | negatives | cache | steps/s | anchor rows/s | peak tensors (MB) |")
    print("|---:|---|---|---:|---:|---:|")
    results = []
    for batch, source, dtype in itertools.product(sizes, args.sources.split(","), caches):
        out = run_variant("a", caches[dtype], args.steps, args.warmup, source, args.device, batch)
        results.append({"batch": batch, "source": source, "dtype": dtype, **out})
        print(f"| {batch} | {source} | {dtype} | {1 / out['sec_per_step']:.1f} | {out['rows_per_s']:.0f} "
              f"| {out['peak_tensor_mb']:.0f} |", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"device": name, "task": args.task, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
