"""General distillation (the paper's "LRC-BERT" row) against task distillation from a random student.

1. Corpus: the unlabeled GLUE sentences (benchmarks/make_corpus.py: train splits + QNLI test, never dev),
   or --corpus FILE; a corpus cache of the bundled all-MiniLM-L6-v2 (pre-trained, not fine-tuned) over it.
2. General students (4x312 by default) on that cache: COS-NCE (LRC), and with --general-losses
   cos_nce,hidden_mse also the paper's ablation (general distillation with hidden MSE).
3. For each task, the teacher, task cache and negatives of benchmarks/glue_results.py (reused when there),
   then 4x312 students: LRC from a random init vs from the general student, and from the general student
   KD-only and hidden-MSE. Every run keeps its LAST checkpoint (--keep last): the dev split that the table
   reports never chooses a checkpoint.

Finished runs are reused, killed ones resumed. Results: <work-dir>/<--results>.md and .json.

    python benchmarks/general_results.py --work-dir data/general --tasks cola,sst2,mrpc,stsb --seeds 42,43,44

On a machine with spare cores, split the work into processes that write different --results names
(one that only trains the general students, `--tasks ""`; one that only prepares the tasks, `--rows ""`;
then one per seed), and render them into one table with `--merge NAME,NAME,...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import glue_results
from make_corpus import write_corpus
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.runtime import setup_logging
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.train import train_or_reuse
from pipeline.teacher.extract import extract_teacher

log = logging.getLogger("general_results")

STUDENT = {"layers": 4, "hidden": 312, "heads": 12, "intermediate": 1200}
SHAPE = "4x312"
# row label -> (where the student starts: None = random init, "teacher" = the teacher cut to the student's
# shape, or the general loss of a general student; method of glue_results)
CUT = "teacher"
ROWS: dict[str, tuple[str | None, str]] = {
    "LRC, random init": (None, "LRC"),
    "LRC, cut init": (CUT, "LRC"),
    "KD-only, cut init": (CUT, "KD-only"),
    "Hidden-MSE, cut init": (CUT, "Hidden-MSE"),
    "LRC one-stage, cut init": (CUT, "LRC one-stage"),
    "LRC w/o perturbation, cut init": (CUT, "LRC w/o perturbation"),
    "LRC, general init": ("cos_nce", "LRC"),
    "KD-only, general init": ("cos_nce", "KD-only"),
    "Hidden-MSE, general init": ("cos_nce", "Hidden-MSE"),
    "LRC, general init (hidden-MSE general)": ("hidden_mse", "LRC"),  # the paper's ablation
}


def general_stage(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any]]:
    """Corpus file, corpus cache, negatives and one general student per general loss; stats for the report."""
    work = args.work_dir
    corpus = args.corpus
    if corpus is None:
        corpus = work / f"corpus-glue-{args.max_passages or 'all'}.txt"
        if not corpus.is_file():
            write_corpus(args.data_dir, corpus, args.max_passages, seed=0)
    cache_dir = work / "corpus-cache"
    started = time.perf_counter()
    manifest = extract_teacher(ExtractConfig(
        teacher=None, data=None, output_dir=cache_dir, student_layers=STUDENT["layers"], max_length=args.max_length,
        corpus=CorpusConfig(source=str(corpus), max_passages=args.max_passages if args.corpus else None)))
    stats: dict[str, Any] = {"corpus": str(corpus), "passages": manifest["corpus"]["passages"],
                             "windows": manifest["splits"]["train"]["rows"],
                             "cache_mb": round(manifest["splits"]["train"]["bytes"] / 1e6, 1),
                             "extract_seconds_this_run": round(time.perf_counter() - started, 1)}
    if not (cache_dir / "negatives.json").is_file():
        build_negatives(NegativesConfig(cache_dir=cache_dir, k=args.k))
    students: dict[str, Path] = {}
    for loss in args.general_losses:
        config = TrainConfig(
            cache_dir=cache_dir, output_dir=work / f"general-{loss}", **STUDENT, intermediate_loss=loss, k=args.k,
            epochs=args.general_epochs, max_steps=args.general_steps, learning_rate=args.general_lr,
            seed=args.general_seed, num_workers=0, checkpoint_every=500, perturb_eps=glue_results.PAPER_EPS)
        summary, _ = train_or_reuse(config)  # a corpus cache: general distillation
        records = [r for r in _log(config.output_dir) if loss in r]
        points = records[:: max(1, len(records) // 10)] + records[-1:]  # about ten points and the last
        stats[f"general_{loss}"] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
                                    "samples_per_s": summary["samples_per_s"],
                                    "curve": list(dict.fromkeys((r["step"], r[loss]) for r in points))}
        students[loss] = config.output_dir
    return students, stats


def _log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def task_config(paths: dict[str, Path], row: str, seed: int, students: dict[str, Path],
                args: argparse.Namespace) -> TrainConfig:
    general, method = ROWS[row]
    config = glue_results.run_config(paths, "4x312 random", method, seed, args)
    slug = f"{SHAPE}-{row}-seed{seed}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    init = "random" if general is None else CUT if general == CUT else str(students[general])
    return replace(config, output_dir=paths["cache"].parent / "general-runs" / slug, init=init, keep="last",
                   max_steps=args.student_steps, projection_init=args.projection_init)


def report(stats: dict[str, Any], results: list[dict[str, Any]], teachers: dict[str, dict[str, float]],
           rows: list[str], tasks: list[str], args: argparse.Namespace) -> str:
    lines = [f"# General distillation ({', '.join(tasks)})", ""]
    if "corpus" in stats:
        lines += [f"Corpus {stats['corpus']}: {stats['passages']} passages -> {stats['windows']} windows of <= "
                  f"{args.max_length} tokens, corpus cache {stats['cache_mb']} MB (extraction in this run: "
                  f"{stats['extract_seconds_this_run']} s; 0 when reused).", ""]
    for key, g in stats.items():
        if key.startswith("general_"):
            curve = ", ".join(f"{step}: {value:.4f}" for step, value in g["curve"])
            lines += [f"General student ({key[8:]}, {STUDENT}): {g['steps']} steps, {g['train_seconds']} s, "
                      f"{g['samples_per_s']} samples/s; {key[8:]} by step: {curve}", ""]
    if not tasks:  # the general stage alone
        return "\n".join(lines) + "\n"
    seeds = sorted({r["seed"] for r in results})
    lines += [f"Task students {SHAPE}; each run keeps its LAST checkpoint (dev never chooses one). Seeds "
              f"{seeds}; budget: {args.student_steps or f'{args.student_epochs} epochs'} "
              f"{'steps' if args.student_steps else ''} at lr {args.student_lr}, {args.max_train_examples} train rows.",
              "", glue_results.table(results, teachers, SHAPE, rows, tasks), "",
              "| task | row | seed | dev (main metric) | train s |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['method']} | {r['seed']} | {r['best'][get_task(r['task']).main_metric]:.4f} | "
              f"{r['train_seconds']:.0f} |" for r in sorted(results, key=lambda r: (r['task'], r['method'], r['seed']))]
    return "\n".join(lines) + "\n"


def merge(names: list[str], args: argparse.Namespace) -> None:
    """Render the results of several processes (each its own --results name) into one table."""
    stats: dict[str, Any] = {}
    teachers: dict[str, dict[str, float]] = {}
    results: list[dict[str, Any]] = []
    for name in names:
        part = json.loads((args.work_dir / f"{name}.json").read_text())
        stats.update(part["general"])
        teachers.update(part["teachers"])
        results += part["runs"]
    tasks = [t for t in args.tasks.split(",") if t in teachers]
    rows = [r for r in ROWS if any(x["method"] == r for x in results)]
    (args.work_dir / f"{args.results}.md").write_text(report(stats, results, teachers, rows, tasks, args))
    (args.work_dir / f"{args.results}.json").write_text(
        json.dumps({"general": stats, "teachers": teachers, "runs": results}, indent=2))
    log.info("merged %s into %s", names, args.work_dir / f"{args.results}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("data/general"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--corpus", type=Path, default=None, help="a text file; default: the GLUE sentences")
    parser.add_argument("--max-passages", type=int, default=0, help="seeded subset of the corpus (0 = all)")
    parser.add_argument("--general-losses", default="cos_nce", help="cos_nce and/or hidden_mse (the ablation)")
    parser.add_argument("--general-epochs", type=float, default=1.0)
    parser.add_argument("--general-steps", type=int, default=None, help="overrides --general-epochs")
    parser.add_argument("--general-lr", type=float, default=3e-4)
    parser.add_argument("--general-seed", type=int, default=42, help="one general student serves every task seed")
    parser.add_argument("--tasks", default="cola,sst2,mrpc,stsb", help="'' = only the general stage")
    parser.add_argument("--rows", default=";".join(r for r in ROWS if "hidden-MSE general" not in r and "cut" not in r),
                        help=f"';'-separated subset of: {'; '.join(ROWS)} ('' = only prepare the tasks)")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--max-train-examples", type=int, default=4000, help="seeded subsample of each train split")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=glue_results.per_task, default=glue_results.per_task("3,sst2=1"))
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--student-epochs", type=float, default=4.0)
    parser.add_argument("--student-steps", type=int, default=None, help="overrides --student-epochs")
    parser.add_argument("--student-lr", type=float, default=3e-4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--hidden-dtype", default="float16",
                        help="task caches' storage; int8 re-extracts each task's cache from the same teacher "
                             "into <work-dir>/<task>-int8, with its own negatives")
    parser.add_argument("--projection-init", default=TrainConfig.projection_init,
                        help="W_i start of the task students; 'random' ignores the W_i a general student saved "
                             "(the seed-42 table in docs/RESULTS.md predates saved W_i, so it was random)")
    parser.add_argument("--results", default="general_results", help="name of the .json/.md results in --work-dir")
    parser.add_argument("--merge", default="", help="comma-separated --results names to render as one table "
                                                    "under --results (trains nothing)")
    args = parser.parse_args()
    args.max_passages = args.max_passages or None
    args.max_train_examples = args.max_train_examples or None
    args.general_losses = [x for x in args.general_losses.split(",") if x]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {unknown}: choose from {'; '.join(ROWS)}")
    missing = {ROWS[r][0] for r in rows} - {None, CUT, *args.general_losses}
    if missing:
        parser.error(f"--rows need general students of {sorted(missing)}: add them to --general-losses")
    setup_logging()
    if args.merge:
        merge(args.merge.split(","), args)
        return
    started = time.perf_counter()
    tasks = [t for t in args.tasks.split(",") if t]
    students, stats = general_stage(args) if tasks == [] or any(ROWS[r][0] not in (None, CUT) for r in rows) else ({}, {})
    log.info("general stage done: %s; %.0f min so far", stats, (time.perf_counter() - started) / 60)
    teachers, results = {}, []
    out = args.work_dir / f"{args.results}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"general": stats, "teachers": teachers, "runs": results}, indent=2))
    for task in tasks:
        paths = glue_results.prepare_task(task, args, args.hidden_dtype)  # shared with glue_results.py
        teachers[task] = json.loads((paths["teacher"] / "teacher_info.json").read_text())["dev_metrics"]
        out.write_text(json.dumps({"general": stats, "teachers": teachers, "runs": results}, indent=2))
        for row in rows:
            for seed in args.seeds:
                config = task_config(paths, row, seed, students, args)
                log.info("%s, %s, seed %d; %.0f min so far", task, row, seed, (time.perf_counter() - started) / 60)
                summary, _ = train_or_reuse(config)  # reused when finished, resumed when killed
                results.append({"task": task, "shape": SHAPE, "method": row, "seed": seed, "best": summary["best"],
                                "train_seconds": summary["train_seconds"]})
                out.write_text(json.dumps({"general": stats, "teachers": teachers, "runs": results}, indent=2))
    (args.work_dir / f"{args.results}.md").write_text(report(stats, results, teachers, rows, tasks, args))
    log.info("done in %.0f min: %s", (time.perf_counter() - started) / 60, args.work_dir / f"{args.results}.md")


if __name__ == "__main__":
    main()
