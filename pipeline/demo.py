"""`lrc demo`: fine-tune a teacher, cache it, build negatives, train a student, compare the two.

Each stage reuses what an earlier run left in the work dir when its settings match, so a
second `lrc demo` finishes in seconds; an artifact made with other settings is refused, and
`--overwrite` redoes every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import (
    BUNDLED_BACKBONE, DataConfig, DemoConfig, EvaluateConfig, ExtractConfig, FinetuneConfig, NegativesConfig, TrainConfig,
)
from pipeline.evaluate import evaluate, format_table
from pipeline.extract import extract_teacher
from pipeline.finetune import finetune_teacher, resolve_backbone
from pipeline.negatives import build_negatives
from pipeline.tasks import get_task, load_examples
from pipeline.train import train_or_reuse

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stage(name: str, times: dict[str, float]) -> Iterator[None]:
    log.info("==== %s", name)
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 1)
    log.info("==== %s done in %.1f s", name, times[name])


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage; return (and write to <work_dir>/demo_results.json) times, metrics and ratios."""
    task = get_task(config.task)
    resolve_backbone(BUNDLED_BACKBONE)  # fail now, in one line, if the backbone package is missing
    data = DataConfig(task=task.name, data_dir=config.data_dir, max_train_examples=config.max_train_examples,
                      subsample_seed=config.seed)
    load_examples(data, "dev")  # fail now if the task data is missing, before any training
    work = config.work_dir
    paths = {"teacher": work / f"teacher-{task.name}", "cache": work / f"cache-{task.name}",
             "student": work / f"student-{task.name}"}
    paths["negatives"] = paths["cache"] / "negatives.arrow"
    subsample = f"a seeded subset of {config.max_train_examples} rows" if config.max_train_examples else "all rows"
    log.info("lrc demo on %s: train split = %s (--max-train-examples), artifacts under %s", task.name, subsample, work)

    times: dict[str, float] = {}
    with _stage("finetune-teacher", times):
        teacher = finetune_teacher(FinetuneConfig(
            data=data, output_dir=paths["teacher"], max_length=config.max_length, epochs=config.teacher_epochs,
            learning_rate=config.teacher_lr, seed=config.seed, device=config.device, precision=config.precision,
            overwrite=config.overwrite,
        ))
    with _stage("extract-teacher", times):
        extract_teacher(ExtractConfig(
            teacher=paths["teacher"], data=data, output_dir=paths["cache"], student_layers=config.student_layers,
            max_length=config.max_length, device=config.device, precision=config.precision, overwrite=config.overwrite,
        ))
    with _stage("build-negatives", times):
        build_negatives(NegativesConfig(cache_dir=paths["cache"], k=config.k, seed=config.seed))
    train = TrainConfig(
        cache_dir=paths["cache"], output_dir=paths["student"], layers=config.student_layers,
        hidden=config.student_hidden, heads=config.student_heads, intermediate=config.student_intermediate,
        k=config.k, epochs=config.student_epochs, learning_rate=config.student_lr, seed=config.seed,
        device=config.device, precision=config.precision, overwrite=config.overwrite,
    )
    with _stage("train-student", times):
        summary, _ = train_or_reuse(train)
    with _stage("evaluate", times):
        results = evaluate(EvaluateConfig(model_dir=paths["student"], data=data, compare=paths["teacher"],
                                          max_length=config.max_length, device=config.device))

    outcome = {"task": task.name, "stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
               "teacher_info": teacher, "student_summary": summary, "evaluation": results,
               "artifacts": {k: str(v) for k, v in paths.items()}}
    (work / "demo_results.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
    (work / "demo_results.md").write_text(render(outcome))
    return outcome


def render(outcome: dict[str, Any]) -> str:
    """The demo's closing table and where everything went, as plain text (also markdown-safe)."""
    times = outcome["stage_seconds"]
    lines = [f"lrc demo: {outcome['task']}", "", "student (left) vs teacher (right), dev split:",
             format_table(outcome["evaluation"]), "",
             "wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
             + f"; total {outcome['total_seconds']:.0f} s", "", "artifacts:"]
    lines += [f"  {name:<10} {path}" for name, path in outcome["artifacts"].items()]
    lines.append(f"  {'report':<10} {Path(outcome['artifacts']['student']) / 'report.md'}")
    return "\n".join(lines) + "\n"
