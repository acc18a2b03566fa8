"""Extraction throughput against the bare teacher forward, and cache bytes against the size rule.

On real SST-2 train rows with the real all-MiniLM-L6-v2 weights (a random classification head on
top: timing and size do not depend on the head). Runs A (bare forward: the same length-sorted
batches, output_hidden_states=True, no writes) and B (`extract_teacher` into a fresh dir) in
alternation, with a GEMM probe before and after, since this machine's speed drifts.

    python benchmarks/bench_extract.py --rows 2048 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from pipeline.core.config import DataConfig
from pipeline.core.runtime import encode, pad_batch
from pipeline.core.task_data import load_examples
from pipeline.core.teacher_config import ExtractConfig
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.finetune import resolve_backbone
from common import gemm_probe


def bare_forward(model: torch.nn.Module, ids: list, types: list, shard_rows: int, batch_size: int) -> float:
    """Seconds for the teacher alone over the same batches extraction runs."""
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids), shard_rows):
            chunk_ids, chunk_types = ids[s : s + shard_rows], types[s : s + shard_rows]
            order = np.argsort([-len(x) for x in chunk_ids], kind="stable")
            for b in range(0, len(order), batch_size):
                rows = order[b : b + batch_size]
                input_ids, token_types, mask = pad_batch(
                    [chunk_ids[r] for r in rows], [chunk_types[r] for r in rows], 0, torch.device("cpu")
                )
                model(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask, output_hidden_states=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="SST-2 train rows (a seeded subset)")
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lrc-bench-extract-"))
    backbone = resolve_backbone("bundled:all-MiniLM-L6-v2")
    teacher = work / "teacher"
    BertForSequenceClassification.from_pretrained(backbone, num_labels=2).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(teacher)
    model = BertForSequenceClassification.from_pretrained(teacher).eval()

    data = DataConfig(task="sst2", data_dir=args.data_dir, max_train_examples=args.rows)
    train = load_examples(data, "train")
    ids, types = encode(AutoTokenizer.from_pretrained(teacher), train.text_a, None, 128)
    tokens = sum(len(x) for x in ids)
    config = ExtractConfig(teacher=teacher, data=data, output_dir=work / "cache", student_layers=4,
                           batch_size=args.batch_size, shard_rows=args.shard_rows)
    # Warm up both paths (thread pools, page cache of the data files).
    bare_forward(model, ids[:128], types[:128], args.shard_rows, args.batch_size)

    probe_before = gemm_probe()
    bare_times, extract_times = [], []
    for _ in range(args.repeats):
        bare_times.append(bare_forward(model, ids, types, args.shard_rows, args.batch_size))
        shutil.rmtree(config.output_dir, ignore_errors=True)
        start = time.perf_counter()
        manifest = extract_teacher(config)
        # extract_teacher also runs the dev split (872 rows, logits only); time it separately below.
        extract_times.append(time.perf_counter() - start)
    probe_after = gemm_probe()

    # Time the dev part alone to subtract it: extraction of train rows is what is compared.
    dev_only = ExtractConfig(teacher=teacher, data=DataConfig(task="sst2", data_dir=args.data_dir, max_train_examples=1),
                             output_dir=work / "dev-only", student_layers=4, batch_size=args.batch_size)
    start = time.perf_counter()
    extract_teacher(dev_only)
    overhead = time.perf_counter() - start

    split = manifest["splits"]["train"]
    ideal = tokens * len(manifest["layers"]) * manifest["hidden_size"] * 2
    bare = min(bare_times)
    extract = min(extract_times) - overhead
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"GEMM probe fp32 1024^3: {probe_before:.0f} GFLOP/s before, {probe_after:.0f} after")
    print(f"rows {len(ids)}, tokens/example {tokens / len(ids):.1f}, layers {manifest['layers']}, width {manifest['hidden_size']}")
    print(f"bare forward:  {[round(t, 2) for t in bare_times]} s -> {len(ids) / bare:.1f} ex/s (best)")
    print(f"extract (train part, {overhead:.1f} s fixed cost of dev split + model load subtracted): "
          f"{[round(t - overhead, 2) for t in extract_times]} s -> {len(ids) / extract:.1f} ex/s (best)")
    print(f"ratio extract/bare: {bare / extract:.3f}x (whole command, fixed costs included: "
          f"{bare / min(extract_times):.3f}x)")
    print(f"bytes/example {split['bytes'] / split['rows']:.0f}, tokens x layers x d' x 2 = {ideal / split['rows']:.0f}, "
          f"ratio {split['bytes'] / ideal:.4f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
