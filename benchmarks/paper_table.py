"""The paper's table in one resumable command: a 12 x 768 teacher, its cache, and 4 x 312 students at the
paper's budget, side by side with KD-only and hidden-MSE students from the same init.

Per task (RTE, MRPC, STS-B, CoLA, SST-2 by default; a task missing from --data-dir is skipped with a line):
fine-tune the teacher (--backbone, default the bundled all-mpnet-base-v2), extract the FULL train split
(the layers a 4-layer student maps to), build random negatives, then train each method with the paper's
schedule: batch 16, 90 epochs for tasks under 10k rows and 18 for larger ones, times --budget; the first 80%
of steps on COS-NCE alone, then 1:1:3; t = 1.1. The LAST student is kept (dev is reported, never used to
choose). Finished stages are reused and unfinished ones resumed: rerun the same command after a kill.

Before running anything it calibrates each stage on this device (a few timed teacher steps, teacher
forwards and student steps per method on batches of the task's real lengths) and prints the predicted time
of every stage; `--time-limit MIN` scales the budget down so the prediction fits, `--calibrate-only` stops
there. Results: <work-dir>/paper_table.md and .json, with each stage's predicted and measured seconds.

    python benchmarks/paper_table.py --tasks mrpc --budget 1.0 --work-dir data/paper
    python benchmarks/paper_table.py --smoke --work-dir /tmp/paper-smoke    # tiny model, a few rows (tests)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_results import METHODS, PAPER_EPS, _usable_negatives  # noqa: E402

from pipeline.apps.evaluate import evaluate  # noqa: E402
from pipeline.core.apps_config import EvaluateConfig  # noqa: E402
from pipeline.core.config import BUNDLED_MPNET, DataConfig  # noqa: E402
from pipeline.core.negatives_config import NegativesConfig  # noqa: E402
from pipeline.core.runtime import setup_logging  # noqa: E402
from pipeline.core.task_data import load_examples  # noqa: E402
from pipeline.core.tasks import get_task  # noqa: E402
from pipeline.core.teacher_config import ExtractConfig, FinetuneConfig  # noqa: E402
from pipeline.core.train_config import TrainConfig  # noqa: E402
from pipeline.negatives.build import build_negatives  # noqa: E402
from pipeline.student.train import train_or_reuse  # noqa: E402
from pipeline.teacher.extract import extract_teacher  # noqa: E402
from pipeline.teacher.finetune import finetune_teacher  # noqa: E402

from calibrate import calibrate_task  # noqa: E402

log = logging.getLogger("paper_table")

PAPER_EPOCHS = {"small": 90, "large": 18}  # LRC-BERT: 90 epochs below 10k train rows, 18 otherwise
SMALL_TASK_ROWS = 10_000
STUDENT = {"layers": 4, "hidden": 312, "heads": 12, "intermediate": 1200}  # the paper's student
PAPER_KEPT = 97.4  # the paper's student keeps 97.4% of its BERT-base teacher's GLUE average (test server)
TABLE_METHODS = ("LRC", "KD-only", "Hidden-MSE")


def task_plan(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rows and step counts of one task at budget 1.0 (the paper's); None where its data is missing."""
    data = DataConfig(task=task, data_dir=args.data_dir, max_train_examples=args.max_train_examples)
    try:
        train, dev = load_examples(data, "train"), load_examples(data, "dev")
    except Exception as err:  # noqa: BLE001 - any reason the task cannot load: skip it, say why
        log.warning("skipping %s: %s", task, str(err).splitlines()[0])
        return {}
    epochs = PAPER_EPOCHS["small" if len(train) < SMALL_TASK_ROWS else "large"]
    return {"task": task, "data": data, "train": train, "dev": dev, "rows": len(train), "dev_rows": len(dev),
            "paper_epochs": epochs, "steps_per_epoch": math.ceil(len(train) / args.batch_size)}


def predict(plan: dict[str, Any], cost: dict[str, float], budget: float, args: argparse.Namespace) -> dict[str, float]:
    """Predicted seconds of each stage of one task from the calibrated unit costs."""
    teacher_steps = math.ceil(args.teacher_epochs * plan["rows"] / args.teacher_batch_size)
    teacher_evals = math.ceil(args.teacher_epochs) * math.ceil(plan["dev_rows"] / 128)
    forward_batches = math.ceil(plan["rows"] / 64) + math.ceil(plan["dev_rows"] / 64)
    student_steps = max(1, math.ceil(budget * plan["paper_epochs"] * plan["steps_per_epoch"]))
    evals = math.ceil(budget * plan["paper_epochs"]) * math.ceil(plan["dev_rows"] / 128)
    out = {"teacher": teacher_steps * cost["teacher_step"] + teacher_evals * cost["teacher_eval"],
           "extract": forward_batches * cost["teacher_forward"], "negatives": 1.0}
    for method in TABLE_METHODS:
        out[method] = student_steps * cost[f"step:{method}"] + evals * cost["student_eval"]
    return out


def wall(pred: dict[str, float], jobs: int) -> float:
    """A task's predicted wall time: students run `jobs` at a time (an estimate: GPUs share imperfectly)."""
    students = sorted((pred[m] for m in TABLE_METHODS), reverse=True)
    lanes = [0.0] * max(1, min(jobs, len(students)))
    for seconds in students:
        lanes[lanes.index(min(lanes))] += seconds
    return pred["teacher"] + pred["extract"] + pred["negatives"] + max(lanes)


def prepare(plan: dict[str, Any], args: argparse.Namespace, timings: dict[str, float]) -> dict[str, Path]:
    """Teacher -> cache -> negatives for one task, each reused when finished; measured seconds into `timings`."""
    work = args.work_dir / plan["task"]
    paths = {"teacher": work / "teacher", "cache": work / "cache"}
    started = time.perf_counter()
    finetune_teacher(FinetuneConfig(data=plan["data"], output_dir=paths["teacher"], backbone=args.backbone,
                                    max_length=args.max_length, epochs=args.teacher_epochs,
                                    batch_size=args.teacher_batch_size, learning_rate=args.teacher_lr,
                                    device=args.device, precision=args.precision))
    timings["teacher"] = time.perf_counter() - started
    started = time.perf_counter()
    extract_teacher(ExtractConfig(teacher=paths["teacher"], data=plan["data"], output_dir=paths["cache"],
                                  student_layers=STUDENT["layers"], max_length=args.max_length, device=args.device,
                                  precision=args.precision))
    timings["extract"] = time.perf_counter() - started
    started = time.perf_counter()
    paths["negatives"] = paths["cache"] / "negatives.arrow"
    if not _usable_negatives(paths["negatives"], paths["cache"]):
        build_negatives(NegativesConfig(cache_dir=paths["cache"], k=args.k))
    timings["negatives"] = time.perf_counter() - started
    return paths


def student_config(paths: dict[str, Path], method: str, budget: float, plan: dict[str, Any],
                   args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig(cache_dir=paths["cache"], output_dir=paths["cache"].parent / "students" / method,
                       negatives=paths["negatives"], k=args.k, batch_size=args.batch_size,
                       epochs=budget * plan["paper_epochs"], learning_rate=args.student_lr, seed=args.seed,
                       keep="last", checkpoint_every=args.checkpoint_every, log_every=100, device=args.device,
                       precision=args.precision, init=args.init, perturb_eps=PAPER_EPS, **STUDENT)
    return replace(base, **METHODS[method])


def _train(config: TrainConfig) -> tuple[dict[str, Any], float]:
    setup_logging()
    started = time.perf_counter()
    summary, _ = train_or_reuse(config)
    return summary, time.perf_counter() - started


def train_students(configs: dict[str, TrainConfig], jobs: int) -> dict[str, tuple[dict[str, Any], float]]:
    if jobs <= 1:
        return {m: _train(c) for m, c in configs.items()}
    # spawn: a forked child cannot use CUDA once the parent has touched it
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {m: pool.submit(_train, c) for m, c in configs.items()}
        return {m: f.result() for m, f in futures.items()}


def speed_and_size(paths: dict[str, Path], student: Path, plan: dict[str, Any], args: argparse.Namespace) -> dict:
    """The student against its teacher: dev metrics, parameters, bytes, latency at batch 32 x 128 tokens."""
    config = EvaluateConfig(model_dir=student, data=plan["data"], compare=paths["teacher"], device=args.device,
                            max_length=args.max_length)
    return evaluate(config)


def table(results: dict[str, Any]) -> str:
    tasks = [t for t in results["tasks"] if "students" in results["tasks"][t]]
    lines = ["| | " + " | ".join(f"{t} ({results['tasks'][t]['metric']})" for t in tasks) + " | average | % of teacher |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    teacher = [results["tasks"][t]["teacher"] for t in tasks]
    average = statistics.mean(teacher) if teacher else float("nan")
    lines.append("| teacher | " + " | ".join(f"{v:.4f}" for v in teacher) + f" | {average:.4f} | 100 |")
    for method in TABLE_METHODS:
        scores = [results["tasks"][t]["students"].get(method, {}).get("metric") for t in tasks]
        if any(s is None for s in scores):
            continue
        mean = statistics.mean(scores)
        kept = f"{100 * mean / average:.1f}" if average else "-"  # an untrained (smoke) teacher can score 0
        lines.append(f"| {method} {STUDENT['layers']}x{STUDENT['hidden']} | " + " | ".join(f"{v:.4f}" for v in scores)
                     + f" | {mean:.4f} | {kept} |")
    lines.append(f"| paper (LRC-BERT, GLUE test) | " + " | ".join("" for _ in tasks) + f" | | {PAPER_KEPT} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("data/paper"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2")
    parser.add_argument("--backbone", default=BUNDLED_MPNET, help="the teacher's backbone (12 x 768 for the paper)")
    parser.add_argument("--budget", type=float, default=1.0, help="fraction of the paper's student epochs")
    parser.add_argument("--time-limit", type=float, help="minutes: scale --budget down so the prediction fits")
    parser.add_argument("--calibrate-only", action="store_true", help="print the predicted times and stop")
    parser.add_argument("--jobs", type=int, default=1, help="student runs of a task trained at once (a GPU has room)")
    parser.add_argument("--init", default="random", help="the students' init (all three methods share it)")
    parser.add_argument("--max-train-examples", type=int, default=0, help="0 = the full train split (the paper)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teacher-epochs", type=float, default=3.0)
    parser.add_argument("--teacher-batch-size", type=int, default=32)
    parser.add_argument("--teacher-lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=16, help="student batch (the paper's 16)")
    parser.add_argument("--student-lr", type=float, default=3e-4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoint-every", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random teacher, 48 rows per task, a sliver of the budget: checks the plumbing")
    args = parser.parse_args()
    setup_logging()
    args.max_train_examples = args.max_train_examples or None
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from calibrate import tiny_backbone

        args.backbone = str(tiny_backbone(args.work_dir / "tiny-backbone"))
        args.max_train_examples, args.max_length, args.teacher_epochs = 48, 32, 1.0
        args.budget = min(args.budget, 0.01)
        STUDENT.update(layers=2, hidden=24, heads=2, intermediate=48)

    plans = [p for p in (task_plan(t, args) for t in args.tasks.split(",")) if p]
    if not plans:
        raise SystemExit("no task could be loaded: check --data-dir and --tasks")
    costs = {p["task"]: calibrate_task(p, args, STUDENT, TABLE_METHODS) for p in plans}
    budget = args.budget
    total = sum(wall(predict(p, costs[p["task"]], budget, args), args.jobs) for p in plans)
    if args.time_limit and total > 60 * args.time_limit:
        fixed = sum(wall(predict(p, costs[p["task"]], 0.0, args), args.jobs) for p in plans)
        budget = max(0.0, budget * (60 * args.time_limit - fixed) / max(total - fixed, 1e-9))
        log.info("--time-limit %.1f min: budget %.3f of the paper's epochs instead of %.3f", args.time_limit, budget,
                 args.budget)
    predictions = {p["task"]: predict(p, costs[p["task"]], budget, args) for p in plans}
    for p in plans:
        pred = predictions[p["task"]]
        log.info("predicted %s (%d rows, %d student steps): %s; wall %.0f s with --jobs %d", p["task"], p["rows"],
                 math.ceil(budget * p["paper_epochs"] * p["steps_per_epoch"]),
                 ", ".join(f"{k} {v:.0f} s" for k, v in pred.items()), wall(pred, args.jobs), args.jobs)
    log.info("predicted total: %.1f min", sum(wall(predictions[p["task"]], args.jobs) for p in plans) / 60)
    if args.calibrate_only or budget <= 0:
        return

    results: dict[str, Any] = {"budget": budget, "device": args.device, "backbone": args.backbone,
                               "costs": costs, "tasks": {}}
    for p in plans:
        task, timings = p["task"], {}
        paths = prepare(p, args, timings)
        configs = {m: student_config(paths, m, budget, p, args) for m in TABLE_METHODS}
        trained = train_students(configs, args.jobs)
        metric = get_task(task).main_metric
        teacher_info = json.loads((paths["teacher"] / "teacher_info.json").read_text())
        entry = {"metric": metric, "teacher": teacher_info["dev_metrics"][metric], "rows": p["rows"],
                 "student_steps": trained["LRC"][0]["steps"], "predicted_s": predictions[task],
                 "measured_s": {**timings, **{m: s for m, (_, s) in trained.items()}},
                 "students": {m: {"metric": s["best"][metric], "all": s["best"], "samples_per_s": s["samples_per_s"],
                                  "device": s.get("device")} for m, (s, _) in trained.items()}}
        entry["speed_and_size"] = speed_and_size(paths, configs["LRC"].output_dir, p, args)
        results["tasks"][task] = entry
        (args.work_dir / "paper_table.json").write_text(json.dumps(results, indent=2, default=str))
        log.info("%s: teacher %.4f, %s", task, entry["teacher"],
                 ", ".join(f"{m} {v['metric']:.4f}" for m, v in entry["students"].items()))
    report = ["# The paper's table", "", f"Budget {budget:.3f} of the paper's epochs; last checkpoint; seed {args.seed}.",
              "", table(results), "", "## Time per stage (s): predicted / measured", "",
              "| task | " + " | ".join(["teacher", "extract", "negatives", *TABLE_METHODS]) + " |",
              "|---|" + "---:|" * (3 + len(TABLE_METHODS))]
    for task, entry in results["tasks"].items():
        cells = [f"{entry['predicted_s'][k]:.0f} / {entry['measured_s'][k]:.0f}"
                 for k in ("teacher", "extract", "negatives", *TABLE_METHODS)]
        report.append(f"| {task} | " + " | ".join(cells) + " |")
    (args.work_dir / "paper_table.md").write_text("\n".join(report) + "\n")
    log.info("written: %s", args.work_dir / "paper_table.md")


if __name__ == "__main__":
    main()
