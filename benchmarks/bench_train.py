"""Training from the cache against training with the teacher in the loop (docs/DESIGN.md §1).

Variants, each the same student step (library `train_step`: COS-NCE + soft + hard, K negatives,
gradient perturbation on) and AdamW update, in its own process so peak memory is its own:
  a  cached:  the library's data path (CacheDataset + EpochBatchSampler + DataLoader, in-process as
              train-student does on a CPU) from the memory-mapped cache
  b  online:  the teacher runs each step on the batch and on its K negatives to make the same targets
              (inputs come from memory, so b gets no data-path cost at all)
  c  compute: the student step alone on batches collated beforehand and held in memory
Teachers: a BERT-base-shaped 12 x 768 random model, and the real all-MiniLM-L6-v2 (random head).
Rows are real SST-2 train sentences (--task mrpc: MRPC pairs, about 4x the tokens). Variants alternate
(a, b, c, a, b, c) with a GEMM probe before and after. Time per epoch is extrapolated from the measured
step time to the task's full train split.

Memory, two ways: the process's peak resident set (imports and allocator slack included), and the peak
of live tensor bytes, which is what decides whether a run fits an accelerator: on CUDA the caching
allocator's `max_memory_allocated`; on the CPU the persistent tensors (parameters, gradients, optimizer
state, a teacher in the loop) plus the peak of the profiler's allocation tracking over a few steps.

    python benchmarks/bench_train.py --steps 30 --repeats 2
    python benchmarks/bench_train.py --device cuda --teachers bert-base --task mrpc --variants ab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import gemm_probe

TRAIN_ROWS = {"sst2": 67349, "mrpc": 3668}  # the full train splits, to extrapolate an epoch


def prepare(work: Path, kind: str, rows: int, data_dir: Path, hidden_dtype: str = "float16", task: str = "sst2") -> Path:
    """Teacher dir -> cache (layers for a 4-layer student) -> negatives (K=4, random)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.core.config import DataConfig
    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.negatives.build import build_negatives
    from pipeline.teacher.extract import extract_teacher
    from pipeline.teacher.finetune import resolve_backbone

    backbone = resolve_backbone("bundled:all-MiniLM-L6-v2")
    teacher = work / f"teacher-{kind}"
    if kind == "bert-base":
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2))  # 12 x 768, 3072, 12 heads
    else:
        model = BertForSequenceClassification.from_pretrained(backbone, num_labels=2)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(teacher)
    cache = work / f"cache-{kind}-{hidden_dtype}-{task}"
    data = DataConfig(task=task, data_dir=data_dir, max_train_examples=rows)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=cache, student_layers=4, hidden_dtype=hidden_dtype))
    build_negatives(NegativesConfig(cache_dir=cache, k=4))
    return cache


def training_parts(cache_dir: Path, device: torch.device, batch_size: int = 16):
    from pipeline.cache.reader import open_cache
    from pipeline.core.train_config import TrainConfig
    from pipeline.student.model import Projections, build_student, student_config
    from pipeline.student.step import Model
    from pipeline.student.run import resolve_layer_map

    cache = open_cache(cache_dir)
    config = TrainConfig(cache_dir=cache_dir, output_dir=cache_dir / "unused", device=device.type,
                         batch_size=batch_size)  # library defaults otherwise
    mapping = resolve_layer_map(config, cache)
    torch.manual_seed(0)
    shape = student_config(cache.manifest["teacher"]["config"], 4, 312, 12, 1200, cache.task)
    student = build_student(shape, "random", None, mapping)
    projections = Projections(312, cache.hidden_size, 4)
    student.to(device), projections.to(device)
    model = Model(student, projections, [sorted(set(mapping)).index(j) for j in mapping])
    params = list(student.parameters()) + list(projections.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as pipeline/student/train.py
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return cache, config, mapping, model, params, optimizer, scheduler


def step(model, batch, config, objective, params, optimizer, scheduler, device: torch.device) -> None:
    """One training step exactly as train-student's loop does it (stage-two weights: every term computed)."""
    from pipeline.core.runtime import apply_update
    from pipeline.student.batches import to_device
    from pipeline.student.step import train_step

    batch = to_device(batch, device)  # as train-student: int8 dequantised there, in-batch negatives as positions
    train_step(model, batch, (1.0, 1.0, 3.0), config, objective, device)
    apply_update(params, optimizer, scheduler, config.max_grad_norm)


def online_batches(cache, mapping: list[int], batch_size: int, k: int, device: torch.device, teacher_holder: list):
    """Yield batches whose targets the teacher computes now, for the batch and its negatives."""
    from transformers import BertForSequenceClassification

    from pipeline.core.runtime import pad_batch
    from pipeline.student.sampler import NegativeSampler

    teacher = BertForSequenceClassification.from_pretrained(cache.teacher_weights_dir).eval().to(device)
    teacher_holder.append(teacher)  # its bytes count as persistent memory
    train = cache.split("train")
    ids, types = train.column("input_ids").to_pylist(), train.column("token_type_ids").to_pylist()
    labels = train.labels()
    sampler = NegativeSampler(cache.path / "negatives.arrow", k, 0, cache.fingerprint)
    layers = sorted(set(mapping))
    order = np.random.default_rng(0).permutation(len(ids))
    for b in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[b : b + batch_size]
        negatives = sampler.sample(rows, 0).reshape(-1)  # (B*K,)
        with torch.no_grad():  # not inference_mode: the student's autograd reuses these inputs
            input_ids, token_types, mask = pad_batch([ids[r] for r in rows], [types[r] for r in rows], 0, device)
            out = teacher(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask, output_hidden_states=True)
            n_ids, n_types, n_mask = pad_batch([ids[r] for r in negatives], [types[r] for r in negatives], 0, device)
            n_out = teacher(input_ids=n_ids, token_type_ids=n_types, attention_mask=n_mask, output_hidden_states=True)
        width = n_ids.shape[1]
        yield {
            "input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask,
            "labels": torch.as_tensor(labels[rows], device=device), "teacher_logits": out.logits,
            "teacher_hidden": torch.stack([out.hidden_states[j] for j in layers]),  # (n, B, L, D)
            "negative_hidden": torch.stack([n_out.hidden_states[j].reshape(batch_size, k, width, -1)
                                            for j in layers]),  # (n, B, K, Ln, D)
            "negative_mask": n_mask.reshape(batch_size, k, width),
        }


def run_variant(variant: str, cache_dir: Path, steps: int, warmup: int, negatives_source: str = "file",
                device_name: str = "cpu", batch_size: int = 16) -> dict[str, float]:
    from pipeline.student.batches import CacheDataset, EpochBatchSampler, make_loader
    from pipeline.student.sampler import InBatchNegatives, NegativeSampler
    from pipeline.student.objective import objective_for

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(device_name)
    cache, config, mapping, model, params, optimizer, scheduler = training_parts(cache_dir, device, batch_size)
    objective = objective_for(cache.manifest)
    layers = sorted(set(mapping))
    teacher: list = []
    if variant == "b":
        source = online_batches(cache, mapping, config.batch_size, config.k, device, teacher)
    else:
        if negatives_source == "in-batch":
            sampler = InBatchNegatives(config.k, 0)
        else:
            sampler = NegativeSampler(cache.path / "negatives.arrow", config.k, 0, cache.fingerprint)
        dataset = CacheDataset(cache.path, "train", layers, sampler)
        batches = EpochBatchSampler(len(dataset), config.batch_size, 0)
        batches.set_epoch(0)
        dataset.set_epoch(0)
        workers = 2 if device.type == "cuda" else 0  # train-student's defaults (TrainConfig.num_workers)
        source = iter(make_loader(dataset, batches, workers, seed=0))
        if variant == "c":  # collate everything first: the step alone is timed
            source = iter([next(source) for _ in range(steps + warmup)])
    run = lambda: step(model, next(source), config, objective, params, optimizer, scheduler, device)  # noqa: E731
    for _ in range(warmup):
        run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        tensor_peak = torch.cuda.max_memory_allocated(device)
    else:  # a few more steps under the profiler's allocation tracking (slow, so not the timed ones)
        tensor_peak = cpu_tensor_peak(lambda: [run() for _ in range(3)], [*params, *optimizer_tensors(optimizer)],
                                      [p for t in teacher for p in t.parameters()])
    return {"sec_per_step": seconds, "rows_per_s": batch_size / seconds, "peak_rss_mb": peak_rss_mb(),
            "peak_tensor_mb": tensor_peak / 2**20}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def cpu_tensor_peak(work, persistent: list[torch.Tensor], teacher: list[torch.Tensor]) -> int:
    """Peak live tensor bytes on the CPU while `work` runs: the tensors alive throughout (parameters, their
    gradients, optimizer state, a teacher) plus the highest running sum of the allocations and frees the
    profiler records during `work`. Buffers the data path reuses across steps are allocated before the
    window and so not counted; they are a few MB (one batch)."""
    from torch.profiler import ProfilerActivity, profile

    held = sum(t.numel() * t.element_size() for t in [*persistent, *teacher])
    held += sum(t.grad.numel() * t.grad.element_size() for t in persistent if getattr(t, "grad", None) is not None)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    # An op's event carries the bytes it allocated net of what it freed (children included); a free outside any
    # op (a tensor whose last reference goes) is a top-level `[memory]` event. So the running sum over the
    # top-level events, in time order, is the live-byte curve at op granularity (a temporary allocated and
    # freed inside one op is not seen). `[memory]` events alone miss every allocation an op makes.
    deltas = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_parent is None)
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return held + peak


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across
    fork + exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--teachers", default="bert-base,minilm")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--hidden-dtype", default="float16", help="storage of the cache that a and c read")
    parser.add_argument("--negatives-source", default="file", help="a and c: file or in-batch")
    parser.add_argument("--task", default="sst2", choices=sorted(TRAIN_ROWS),
                        help="rows to train on: sst2 (13 tokens on average) or mrpc (sentence pairs, ~50)")
    parser.add_argument("--variants", default="abc", help="which of a, b, c to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.cache, args.steps, args.warmup, args.negatives_source,
                                     args.device, args.batch_size)))
        return

    work = Path(tempfile.mkdtemp(prefix="lrc-bench-train-"))
    rows = args.batch_size * (args.steps + args.warmup + 3) + 64
    results: dict[str, dict[str, list]] = {}
    print(f"GEMM probe before: {gemm_probe():.0f} GFLOP/s", flush=True)
    for kind in args.teachers.split(","):
        cache = prepare(work, kind, rows, args.data_dir, args.hidden_dtype, args.task)
        results[kind] = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                out = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--cache", str(cache), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--negatives-source", args.negatives_source, "--device", args.device,
                     "--batch-size", str(args.batch_size)],
                    capture_output=True, text=True, check=True,
                )
                results[kind][variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(kind, variant, results[kind][variant][-1], flush=True)
    print(f"GEMM probe after: {gemm_probe():.0f} GFLOP/s")
    (work / "results.json").write_text(json.dumps(results))

    steps_per_epoch = TRAIN_ROWS[args.task] // args.batch_size
    print(f"\n{args.device}, batch {args.batch_size}, {args.task} rows")
    print(f"| teacher | variant | s/step (best) | epoch of {args.task} (min) | peak RSS (MB) | peak tensors (MB) |")
    print("|---|---|---|---|---|---|")
    for kind, per in results.items():
        best = {v: min(r["sec_per_step"] for r in runs) for v, runs in per.items()}
        peak = {v: max(r["peak_rss_mb"] for r in runs) for v, runs in per.items()}
        tensors = {v: max(r["peak_tensor_mb"] for r in runs) for v, runs in per.items()}
        for v, name in zip("abc", ("a cached", "b online teacher", "c compute only")):
            if v in per:
                print(f"| {kind} | {name} | {best[v]:.4f} | {best[v] * steps_per_epoch / 60:.2f} | {peak[v]:.0f} "
                      f"| {tensors[v]:.0f} |")
        if "a" in per and "b" in per:
            print(f"| {kind} | a vs b speedup {best['b'] / best['a']:.2f}x; memory a/b: resident "
                  f"{peak['a'] / peak['b']:.2f}, tensors {tensors['a'] / tensors['b']:.2f} | | | | |")
        if "a" in per and "c" in per:
            print(f"| {kind} | a vs c {best['c'] / best['a']:.2f}x | | | |")


if __name__ == "__main__":
    main()
