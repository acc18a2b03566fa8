"""The short budget where new users start: which 4x312 recipe learns most in one epoch of 4,000 SST-2 rows?

Teacher, task cache and negatives are `lrc demo`'s (its defaults: the bundled all-MiniLM-L6-v2 fine-tuned one
epoch on a seeded 4,000-row subset of SST-2; pipeline/apps/demo.py `task_stages`, reused when there). Every student
then sees one epoch of those rows at lr 5e-4, batch 16, and keeps its LAST checkpoint (dev never chooses one).
Rows: lrc recipes (LRC two-stage and one-stage, KD-only, hidden MSE) from a random init, from the teacher
cut to 4x312 (`--init teacher`, activation or uniform selection) and, with --general-student DIR, from a
general-distilled student; and a plain online loop outside lrc's trainer (the
teacher runs every step; hidden MSE + soft KL at t = 1, constant lr, no clipping, no perturbation), the
reference a user would write by hand. Per (row, seed) results go to <work-dir>/short_budget.json as they
arrive, so a killed run continues where it stopped.

    python benchmarks/short_budget.py --work-dir data/short --seeds 42,43,44 --general-student data/general/general-cos_nce

With --cache DIR the students learn from that task cache (and its negatives) instead of the demo's: another teacher
(benchmarks/mpnet_cut.sh), the same rows and budget; the online loop needs the demo's teacher and is left out.
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

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from glue_results import PAPER_EPS  # the LRC rows are the paper's method, perturbation on
from pipeline.apps.demo import plan, task_stages
from pipeline.cache.reader import open_cache
from pipeline.core.apps_config import DemoConfig
from pipeline.core.config import DataConfig, layer_map
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import encode, pad_batch, predict_logits, seed_everything, setup_logging
from pipeline.core.task_data import load_examples
from pipeline.core.tasks import get_task
from pipeline.core.train_config import TrainConfig
from pipeline.student import losses
from pipeline.student.model import Projections, build_student, student_config
from pipeline.student.train import train_or_reuse

log = logging.getLogger("short_budget")

BASELINE = {"intermediate_loss": "none", "perturb_eps": 0.0}  # as benchmarks/glue_results.py: no perturbation
# row -> (init: "random", "general" or "teacher", TrainConfig overrides); "online" rows run online_loop instead.
# "teacher": the 4x312 student cut from the 6x384 teacher (pipeline/student/select.py), with --init-selection as given.
ROWS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "LRC (two-stage)": ("random", {}),
    "LRC one-stage": ("random", {"one_stage": True}),
    "LRC, stage one 0.5": ("random", {"stage1_fraction": 0.5}),
    "KD-only": ("random", BASELINE),
    "Hidden-MSE": ("random", {**BASELINE, "intermediate_loss": "hidden_mse"}),
    "Online loop (hidden MSE + soft KL)": ("random", None),
    "LRC one-stage, general init": ("general", {"one_stage": True}),
    "KD-only, general init": ("general", BASELINE),
    "LRC (two-stage), general init": ("general", {}),
    "Hidden-MSE, general init": ("general", {**BASELINE, "intermediate_loss": "hidden_mse"}),
    "LRC, selected init (activation)": ("teacher", {"init_selection": "activation"}),
    "KD-only, selected init (activation)": ("teacher", {**BASELINE, "init_selection": "activation"}),
    "LRC, selected init (uniform)": ("teacher", {"init_selection": "uniform"}),
    "KD-only, selected init (uniform)": ("teacher", {**BASELINE, "init_selection": "uniform"}),
    "Hidden-MSE, selected init (activation)": ("teacher", {**BASELINE, "intermediate_loss": "hidden_mse",
                                                          "init_selection": "activation"}),
    "LRC one-stage, selected init (activation)": ("teacher", {"init_selection": "activation", "one_stage": True}),
    "LRC w/o perturbation, selected init (activation)": ("teacher", {"init_selection": "activation",
                                                                    "perturb_eps": 0.0}),
}


def lrc_run(paths: dict[str, Path], row: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    init, overrides = ROWS[row]
    slug = f"{row}-seed{seed}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "")
    config = TrainConfig(cache_dir=paths["cache"], output_dir=args.work_dir / "runs" / slug,
                         init=init if init in ("random", "teacher") else str(args.general_student), epochs=1.0,
                         learning_rate=args.lr, batch_size=args.batch_size, seed=seed, keep="last", num_workers=0,
                         perturb_eps=PAPER_EPS)
    summary, _ = train_or_reuse(replace(config, **overrides))
    return {"dev": summary["best"], "train_seconds": summary["train_seconds"]}


def online_loop(paths: dict[str, Path], demo: DemoConfig, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """What a user writes by hand: teacher and student side by side, one pass, AdamW at a constant lr."""
    seed_everything(seed)
    cache = open_cache(paths["cache"])
    task = get_task(demo.task)
    teacher = AutoModelForSequenceClassification.from_pretrained(paths["teacher"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    t_layers = teacher.config.num_hidden_layers
    mapping = layer_map(t_layers, demo.student_layers)
    shape = student_config(cache.manifest["teacher"]["config"], demo.student_layers, demo.student_hidden,
                           demo.student_heads, demo.student_intermediate, cache.task)
    student = build_student(shape, "random", None, mapping)
    projections = Projections(demo.student_hidden, teacher.config.hidden_size, demo.student_layers)
    params = list(student.parameters()) + list(projections.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    data = DataConfig(task=task.name, data_dir=demo.data_dir, max_train_examples=demo.max_train_examples,
                      subsample_seed=demo.seed)
    train, dev = load_examples(data, "train"), load_examples(data, "dev")
    ids, types = encode(tokenizer, train.text_a, train.text_b, demo.max_length)
    order = np.random.default_rng(seed).permutation(len(ids))
    started = time.perf_counter()
    student.train()
    for b in range(0, len(order), args.batch_size):
        rows = order[b : b + args.batch_size]
        input_ids, token_types, mask = pad_batch([ids[r] for r in rows], [types[r] for r in rows],
                                                 tokenizer.pad_token_id, torch.device("cpu"))
        inputs = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        out = student(**inputs, output_hidden_states=True)
        projected = projections(list(out.hidden_states[1:]))
        loss = sum(losses.hidden_mse(z, target.hidden_states[j], mask) for z, j in zip(projected, mapping))
        loss = loss + losses.soft_loss(out.logits, target.logits, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    dev_ids, dev_types = encode(tokenizer, dev.text_a, dev.text_b, demo.max_length)
    logits = predict_logits(student, dev_ids, dev_types, 128, torch.device("cpu"), pad_id=tokenizer.pad_token_id)
    return {"dev": compute_metrics(task, logits, np.asarray(dev.labels)), "train_seconds": round(seconds, 1)}


def report(results: dict[str, dict[str, Any]], rows: list[str], teacher: dict[str, float], metric: str,
           args: argparse.Namespace) -> str:
    source = args.cache or "lrc demo's"
    lines = [f"# Short budget: 4x312 students, one epoch of {args.max_train_examples} SST-2 rows, lr {args.lr}, "
             f"batch {args.batch_size}, last checkpoint", "",
             f"Teacher ({source}): dev {metric} {teacher[metric]:.4f}. Seeds {args.seeds}.", "",
             f"| row | dev {metric}: mean ± sd (n) | per seed | % of teacher | train s (mean) |", "|---|---|---|---|---|"]
    for row in rows:
        got = [results[f"{row}|{s}"] for s in args.seeds if f"{row}|{s}" in results]
        if not got:
            continue
        values = [r["dev"][metric] for r in got]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.mean(values)
        lines.append(f"| {row} | {mean:.4f} ± {sd:.4f} ({len(values)}) | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{100 * mean / teacher[metric]:.1f} | {statistics.mean(r['train_seconds'] for r in got):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("data/short"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--general-student", type=Path, default=None, help="a general student dir for the general rows")
    parser.add_argument("--rows", default=None, help=f"';'-separated subset of: {'; '.join(ROWS)}")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--max-train-examples", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=None, help="a task cache (with negatives) to train from instead "
                        "of the demo's")
    parser.add_argument("--results", default="short_budget", help="name of the .json/.md results in --work-dir "
                        "(a second process over other rows writes its own)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(";")] if args.rows else [
        r for r in ROWS if ROWS[r][0] != "general" or args.general_student is not None]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {unknown}: choose from {'; '.join(ROWS)}")
    if any(ROWS[r][0] == "general" for r in rows) and args.general_student is None:
        parser.error("the general rows need --general-student DIR")
    if args.cache is not None and any(ROWS[r][1] is None for r in rows):
        parser.error("the online loop runs the demo's teacher: leave it out of --rows with --cache")
    setup_logging()
    demo = DemoConfig(data_dir=args.data_dir, work_dir=args.work_dir, max_train_examples=args.max_train_examples)
    if args.cache is None:
        stages = plan(demo)
        paths = {"teacher": stages.paths["teacher"], "cache": stages.paths["cache"]}
        teacher = task_stages(stages, {})["dev_metrics"]
    else:  # the teacher's dev metrics from its cached dev logits
        cache = open_cache(args.cache)
        demo = replace(demo, task=cache.task["name"])
        paths, dev = {"cache": args.cache}, cache.split("dev")
        teacher = compute_metrics(get_task(demo.task), dev.logits(), dev.labels())
    metric = get_task(demo.task).main_metric
    out = args.work_dir / f"{args.results}.json"
    results = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for seed in args.seeds:  # seed-major: every row gets a first seed before any gets a third
        for row in rows:
            key = f"{row}|{seed}"
            if key in results and ROWS[row][1] is None:
                continue  # the online loop has no run dir to reuse; lrc rows are reused by train_or_reuse
            log.info("%s, seed %d", row, seed)
            results[key] = online_loop(paths, demo, seed, args) if ROWS[row][1] is None else lrc_run(paths, row, seed, args)
            out.write_text(json.dumps({"teacher": teacher, "runs": results}, indent=2))
            (args.work_dir / f"{args.results}.md").write_text(report(results, rows, teacher, metric, args))
    log.info("done: %s", args.work_dir / f"{args.results}.md")


if __name__ == "__main__":
    main()
