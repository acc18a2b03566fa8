"""One process against two under torchrun, on this machine's CPUs: extraction, a training epoch, and the
per-step all-reduce of a 4 x 312 student's gradients on gloo.

Teacher: the real all-MiniLM-L6-v2 with a random 2-label head over real SST-2 train rows; student 4 x 312 (the
paper's), COS-NCE with K = 4 random negatives, perturbation on, --batch-size 16 (global). Each command runs through
the real CLI in its own process(es); the two CPU cores are shared by both variants' threads (1 process x 2
threads against 2 processes x 1 thread), so this measures the cost of the machinery, not GPU scaling. The GEMM
probe runs before and after (the machine is shared and its speed drifts).

    python benchmarks/bench_distributed.py --rows 512 --max-length 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import gemm_probe

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], processes: int, threads: int) -> tuple[float, str]:
    """Wall seconds and stderr of `lrc ARGS` in one process, or under torchrun in `processes`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run([*launcher, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start, result.stderr


def prepare_teacher(work: Path) -> Path:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeline.teacher.finetune import resolve_backbone

    backbone = resolve_backbone("bundled:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    teacher = work / "teacher"
    BertForSequenceClassification.from_pretrained(backbone, num_labels=2).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(teacher)
    return teacher


def extraction(work: Path, teacher: Path, rows: int, max_length: int, shard_rows: int) -> dict:
    out = {}
    for name, processes, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)):
        cache = work / f"cache-{processes}"
        wall, log = cli(["extract-teacher", "--teacher", str(teacher), "--task", "sst2", "-o", str(cache),
                         "--max-train-examples", str(rows), "--max-length", str(max_length), "--shard-rows",
                         str(shard_rows), "--device", "cpu", "--student-layers", "4"], processes, threads)
        seconds = float(re.search(r"rows extracted in ([\d.]+) s", log).group(1))  # rank 0: after every rank's shards
        manifest = json.loads((cache / "manifest.json").read_text())
        rows_all = sum(s["rows"] for s in manifest["splits"].values())
        out[name] = {"command_s": round(wall, 1), "extract_s": seconds, "rows": rows_all,
                     "rows_per_s": round(rows_all / seconds, 1), "fingerprint": manifest["fingerprint"][:12]}
    return out


def training(work: Path, cache: Path, batch_size: int) -> dict:
    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.negatives.build import build_negatives

    build_negatives(NegativesConfig(cache_dir=cache, k=4))
    out = {}
    for name, processes, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)):
        run = work / f"student-{processes}"
        wall, _ = cli(["train-student", "--cache", str(cache), "-o", str(run), "--epochs", "1", "--batch-size",
                       str(batch_size), "--device", "cpu", "--k", "4"], processes, threads)
        summary = json.loads((run / "training_summary.json").read_text())
        out[name] = {"command_s": round(wall, 1), "train_s": summary["train_seconds"], "steps": summary["steps"],
                     "samples_per_s": summary["samples_per_s"], "parameters": summary["parameters"]}
    return out


def _all_reduce_worker(rank: int, numel: int, repeats: int, port: int, result: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grads = torch.randn(numel)
    dist.all_reduce(grads)  # warm-up: connections, buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(result).write_text(json.dumps(sorted(times)))
    dist.destroy_process_group()


def all_reduce(numel: int, repeats: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_all_reduce_worker, args=(numel, repeats, port, f.name), nprocs=2)
        times = json.loads(Path(f.name).read_text())
    return {"parameters": numel, "megabytes_fp32": round(numel * 4 / 1e6, 1),
            "median_ms": round(1e3 * times[len(times) // 2], 1), "min_ms": round(1e3 * times[0], 1),
            "gbytes_per_s_algorithmic": round(numel * 4 / times[len(times) // 2] / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if not os.environ.get("LRC_DATA_DIR"):
        raise SystemExit("set LRC_DATA_DIR to a glue_data folder")
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    report = {"gemm_before": round(gemm_probe(), 1)}
    teacher = prepare_teacher(work)
    report["extraction"] = extraction(work, teacher, args.rows, args.max_length, args.shard_rows)
    report["training"] = training(work, work / "cache-1", args.batch_size)
    params = report["training"]["1 process x 2 threads"]["parameters"]
    projections = 4 * 312 * 384  # W_i, 312 -> 384 (MiniLM's width), no bias
    report["all_reduce"] = all_reduce(params + projections, args.repeats)
    report["gemm_after"] = round(gemm_probe(), 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
