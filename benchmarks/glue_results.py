"""Does it work? LRC students against KD-only and hidden-MSE baselines, and LRC ablations, on real GLUE.

For each task: fine-tune a MiniLM teacher, extract one cache (layers 2..6, which serve both student
shapes), build random and hard negatives, then train every method for every student shape with the
same budget, all from that one cache. Finished runs are reused, so a killed run continues where it
stopped. Results go to <work-dir>/results.md and results.json.

Defaults are the budget docs/RESULTS.md reports: 4,000 train rows per task, teacher 3 epochs (SST-2: 1),
students 1,000 steps of 16 (4 epochs) at lr 3e-4. Each run is logged as it starts ("run i/n") with the
time so far; pass --tasks/--shapes/--methods/--seeds to run a part, and --only-finished to write the
tables from what has run. benchmarks/reproduce_results.sh runs the whole set behind RESULTS.md (hours).

    python benchmarks/glue_results.py --work-dir data/results --tasks sst2 --methods LRC,KD-only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.cache.manifest import read_manifest
from pipeline.cache.negatives_file import read_negatives
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.runtime import setup_logging
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import ExtractConfig, FinetuneConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.run_dir import previous_run
from pipeline.student.train import train_or_reuse
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.finetune import finetune_teacher

log = logging.getLogger("glue_results")

# name -> TrainConfig overrides. "LRC" is the paper's method, perturbation on (train-student's default is off);
# the baselines get no perturbation: that is part of LRC.
PAPER_EPS = 1.0
METHODS: dict[str, dict[str, Any]] = {
    "LRC": {},
    "KD-only": {"intermediate_loss": "none", "perturb_eps": 0.0},
    "Hidden-MSE": {"intermediate_loss": "hidden_mse", "perturb_eps": 0.0},
    "LRC w/o COS-NCE": {"intermediate_loss": "none"},
    "LRC w/o perturbation": {"perturb_eps": 0.0},
    "LRC one-stage": {"one_stage": True},
    "LRC token": {"granularity": "token"},
    "LRC cls": {"granularity": "cls"},
    "LRC hard negatives": {"negatives": "hard"},
    "LRC random projection": {"projection_init": "random"},
}
METHODS["Hidden-MSE random projection"] = {**METHODS["Hidden-MSE"], "projection_init": "random"}
SHAPES: dict[str, dict[str, Any]] = {
    "4x312 random": {"layers": 4, "hidden": 312, "heads": 12, "intermediate": 1200, "init": "random"},
    "3x384 from teacher": {"layers": 3, "hidden": 384, "heads": 12, "intermediate": 1536, "init": "teacher"},
}


def prepare_task(task: str, args: argparse.Namespace, hidden_dtype: str = "float16") -> dict[str, Path]:
    """Teacher, cache and both negatives files of one task (each reused when already there). Another
    `hidden_dtype` gets its own dir, <work-dir>/<task>-<dtype>/cache, from the same teacher and rows, so
    runs placed beside a cache never mix storages."""
    work = args.work_dir / task
    data = DataConfig(task=task, data_dir=args.data_dir, max_train_examples=args.max_train_examples)
    cache_dir = work if hidden_dtype == "float16" else args.work_dir / f"{task}-{hidden_dtype}"
    paths = {"teacher": work / "teacher", "cache": cache_dir / "cache"}
    finetune_teacher(FinetuneConfig(data=data, output_dir=paths["teacher"], max_length=args.max_length,
                                    epochs=args.teacher_epochs.get(task, args.teacher_epochs["default"]),
                                    learning_rate=args.teacher_lr))
    extract_teacher(ExtractConfig(teacher=paths["teacher"], data=data, output_dir=paths["cache"],
                                  layers=(2, 3, 4, 5, 6), max_length=args.max_length, hidden_dtype=hidden_dtype))
    for strategy in ("random", "hard"):
        out = paths["cache"] / f"negatives-{strategy}.arrow"
        if not _usable_negatives(out, paths["cache"]):
            out.unlink(missing_ok=True)  # ours to replace: this script named it
            out.with_suffix(".json").unlink(missing_ok=True)
            build_negatives(NegativesConfig(cache_dir=paths["cache"], k=args.k, strategy=strategy, output=out))
        paths[f"negatives-{strategy}"] = out
    return paths


def _usable_negatives(path: Path, cache_dir: Path) -> bool:
    """A negatives file this lrc reads (format, checksum, ids) built from this very cache."""
    try:
        _, _, meta = read_negatives(path)
    except LrcError:
        return False
    return meta["cache_fingerprint"] == read_manifest(cache_dir)["fingerprint"]


def run_config(paths: dict[str, Path], shape: str, method: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    overrides = dict(METHODS[method])
    negatives = paths[f"negatives-{overrides.pop('negatives', 'random')}"]
    slug = f"{shape}-{method}-seed{seed}".replace(" ", "_").replace("/", "")
    base = TrainConfig(cache_dir=paths["cache"], output_dir=paths["cache"].parent / "runs" / slug, negatives=negatives,
                       k=args.k, epochs=args.student_epochs, learning_rate=args.student_lr, seed=seed,
                       num_workers=0, checkpoint_every=500, perturb_eps=PAPER_EPS)
    return replace(base, **SHAPES[shape], **overrides)


def table(results: list[dict[str, Any]], teachers: dict[str, dict[str, float]], shape: str, methods: list[str],
          tasks: list[str]) -> str:
    """Rows: methods (mean over seeds); columns: tasks (every dev metric, the main one first) and the
    average of the main metrics; the last column is that average as a % of the teacher's."""
    main = {t: get_task(t).main_metric for t in tasks}
    names = {t: [main[t]] + [m for m in teachers[t] if m not in (main[t], "epoch")] for t in tasks}
    head = "| method | " + " | ".join(f"{t} ({'/'.join(names[t])})" for t in tasks) + " | average | % of teacher |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 2)]
    teacher_avg = sum(teachers[t][main[t]] for t in tasks) / len(tasks)
    cells = [" / ".join(f"{teachers[t][m]:.4f}" for m in names[t]) for t in tasks]
    lines.append("| teacher | " + " | ".join(cells) + f" | {teacher_avg:.4f} | 100 |")
    for method in methods:
        cells, scores = [], []
        for t in tasks:
            runs = [r["best"] for r in results if r["task"] == t and r["shape"] == shape and r["method"] == method]
            if not runs:
                cells.append("-")
                continue
            means = [sum(r[m] for r in runs) / len(runs) for m in names[t]]
            scores.append(means[0])
            text = [f"{v:.4f}" for v in means]
            if len(runs) > 1:  # the sample sd of the main metric over seeds: the noise a reader needs
                text[0] += f" ± {statistics.stdev(r[names[t][0]] for r in runs):.4f}"
            cells.append(" / ".join(text) + (f" (n={len(runs)})" if len(runs) > 1 else ""))
        if not scores:
            continue
        average = sum(scores) / len(scores) if len(scores) == len(tasks) else None
        avg_cell = f"{average:.4f}" if average is not None else "-"
        pct = f"{100 * average / teacher_avg:.1f}" if average is not None else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg_cell} | {pct} |")
    return "\n".join(lines)


def per_task(text: str) -> dict[str, float]:
    """'3' or '3,sst2=1' -> {'default': 3.0, 'sst2': 1.0}."""
    values: dict[str, float] = {}
    for item in text.split(","):
        task, _, value = item.rpartition("=")
        values[task or "default"] = float(value)
    if "default" not in values:
        raise argparse.ArgumentTypeError(f"{text!r} has no value for the other tasks: add one without 'task='")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("data/results"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--tasks", default="cola,sst2,mrpc,stsb")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--max-train-examples", type=int, default=4000,
                        help="seeded subsample of every train split (0 = all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=per_task, default=per_task("3,sst2=1"),
                        help="teacher epochs, optionally per task: '3' or '3,sst2=1' (the best dev epoch is kept)")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--student-epochs", type=float, default=4.0)
    parser.add_argument("--student-lr", type=float, default=3e-4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--only-finished", action="store_true",
                        help="train nothing: write the tables from the runs already finished (to assemble parallel runs)")
    args = parser.parse_args()
    args.max_train_examples = args.max_train_examples or None
    setup_logging()
    tasks, shapes, methods = args.tasks.split(","), args.shapes.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()

    teachers, results, failures = {}, [], []
    plan = [(t, sh, m, s) for t in tasks for sh in shapes for m in methods for s in seeds]
    prepared: dict[str, dict[str, Path]] = {}
    for i, (task, shape, method, seed) in enumerate(plan, 1):
        if args.only_finished and not (args.work_dir / task / "cache" / "manifest.json").is_file():
            continue  # nothing of this task has been run
        if task not in prepared:
            log.info("preparing %s (teacher, cache, negatives); %.0f min so far", task, (time.perf_counter() - started) / 60)
            prepared[task] = prepare_task(task, args)
            info = json.loads((prepared[task]["teacher"] / "teacher_info.json").read_text())
            teachers[task] = info["dev_metrics"]
        config = run_config(prepared[task], shape, method, seed, args)
        log.info("run %d/%d: %s, %s, %s, seed %d; %.0f min so far", i, len(plan), task, shape, method, seed,
                 (time.perf_counter() - started) / 60)
        if args.only_finished:
            previous = previous_run(config, read_manifest(config.cache_dir)["fingerprint"])
            if previous.state != "finished" or previous.changed:
                continue
        try:  # finished runs are reused and killed ones resumed (train_or_reuse); a failed run ends only itself
            summary, _ = train_or_reuse(config)
        except LrcError as err:
            failures.append(f"{task}, {shape}, {method}, seed {seed}: {err}")
            log.error("run %d/%d failed: %s", i, len(plan), err)
            continue
        results.append({"task": task, "shape": shape, "method": method, "seed": seed, "best": summary["best"],
                        "train_seconds": summary["train_seconds"], "teacher_dev": summary["teacher_dev"]})
        (args.work_dir / "results.json").write_text(json.dumps({"teachers": teachers, "runs": results}, indent=2))

    tasks = [t for t in tasks if t in teachers]  # --only-finished skips tasks never started
    report = [f"# GLUE results ({', '.join(tasks)})", ""]
    for shape in shapes:
        report += [f"## {shape}", "", table(results, teachers, shape, methods, tasks), ""]
    report += ["## Wall time per run (s)", "", "| task | shape | method | seed | train s |", "|---|---|---|---|---|"]
    report += [f"| {r['task']} | {r['shape']} | {r['method']} | {r['seed']} | {r['train_seconds']:.0f} |" for r in results]
    if failures:
        report += ["", "## Failed runs", "", *(f"- {f}" for f in failures)]
    (args.work_dir / "results.md").write_text("\n".join(report) + "\n")
    log.info("done in %.0f min: %s", (time.perf_counter() - started) / 60, args.work_dir / "results.md")


if __name__ == "__main__":
    main()
