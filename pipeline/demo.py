"""`lrc demo`: fine-tune a teacher, cache it, build negatives, train a student, compare the two.

By default (`--general`) it first distils the bundled backbone (pre-trained, not fine-tuned) on unlabeled
text into a general student of the student's shape, and starts the task student from it (the paper's
recipe); `--no-general` starts the task student from random weights.

Each stage reuses what an earlier run left in the work dir when its settings match, so a
second `lrc demo` finishes in seconds; an artifact made with other settings is refused, and
`--overwrite` redoes every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline import outdir
from pipeline.config import (
    BUNDLED_BACKBONE, CorpusConfig, DataConfig, DemoConfig, EvaluateConfig, ExtractConfig, FinetuneConfig, NegativesConfig, TrainConfig,
)
from pipeline.corpus import glue_sentences
from pipeline.errors import LrcError
from pipeline.evaluate import evaluate, format_table
from pipeline.extract import extract_teacher
from pipeline.finetune import finetune_teacher, resolve_backbone
from pipeline.negatives import build_negatives
from pipeline.tasks import TaskSpec, get_task, load_examples
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
    # Fail now, in one line and before the work dir exists, if the backbone package or the task data is missing.
    task = get_task(config.task)
    resolve_backbone(BUNDLED_BACKBONE)
    data = DataConfig(task=task.name, data_dir=config.data_dir, max_train_examples=config.max_train_examples,
                      subsample_seed=config.seed)
    load_examples(data, "dev")
    outdir.check(config.work_dir, "demo", overwrite=False, option="--work-dir", adopt=True)
    with outdir.lock(config.work_dir, "demo"):
        outdir.mark(config.work_dir, "demo")
        return _run(config, task, data)


def _run(config: DemoConfig, task: TaskSpec, data: DataConfig) -> dict[str, Any]:
    work = config.work_dir
    paths = {"teacher": work / f"teacher-{task.name}", "cache": work / f"cache-{task.name}",
             "student": work / f"student-{task.name}{'-general' if config.general else ''}"}
    paths["negatives"] = paths["cache"] / "negatives.arrow"
    subsample = f"a seeded subset of {config.max_train_examples} rows" if config.max_train_examples else "all rows"
    log.info("lrc demo on %s: train split = %s (--max-train-examples), artifacts under %s", task.name, subsample, work)

    times: dict[str, float] = {}
    init = "random"
    if config.general:
        paths |= general_stages(config, times)
        init = str(paths["general_student"])
    teacher = task_stages(config, data, paths, times)
    train = TrainConfig(
        cache_dir=paths["cache"], output_dir=paths["student"], layers=config.student_layers,
        hidden=config.student_hidden, heads=config.student_heads, intermediate=config.student_intermediate,
        init=init, k=config.k, epochs=config.student_epochs, learning_rate=config.student_lr, seed=config.seed,
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
    name = "demo_general_results" if config.general else "demo_results"
    (work / f"{name}.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
    (work / f"{name}.md").write_text(render(outcome))
    return outcome


def task_stages(config: DemoConfig, data: DataConfig, paths: dict[str, Path], times: dict[str, float]) -> dict[str, Any]:
    """Teacher -> task cache -> negatives at `paths` (teacher, cache), each reused when finished with these
    settings; returns the teacher's info. benchmarks/short_budget.py starts its students from the same three."""
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
    return teacher


def general_stages(config: DemoConfig, times: dict[str, float]) -> dict[str, Path]:
    """Corpus -> corpus cache -> negatives -> general student; each reused when finished with these settings.
    Task-independent, so every task's --general demo in one work dir shares them."""
    work = config.work_dir
    paths = {"corpus_cache": work / "cache-corpus", "general_student": work / "general-student"}
    with _stage("make-corpus", times):
        corpus = config.corpus if config.corpus is not None else glue_corpus_file(config)
    paths["corpus"] = corpus
    with _stage("extract-corpus", times):
        extract_teacher(ExtractConfig(
            teacher=None, data=None, output_dir=paths["corpus_cache"], student_layers=config.student_layers,
            max_length=config.max_length, device=config.device, precision=config.precision,
            corpus=CorpusConfig(source=str(corpus),
                                max_passages=config.general_max_passages if config.corpus is not None else None),
            overwrite=config.overwrite,
        ))
    with _stage("build-negatives-corpus", times):
        build_negatives(NegativesConfig(cache_dir=paths["corpus_cache"], k=config.k, seed=config.seed))
    train = TrainConfig(
        cache_dir=paths["corpus_cache"], output_dir=paths["general_student"], layers=config.student_layers,
        hidden=config.student_hidden, heads=config.student_heads, intermediate=config.student_intermediate,
        k=config.k, epochs=config.general_epochs, learning_rate=config.general_lr, seed=config.seed,
        device=config.device, precision=config.precision, overwrite=config.overwrite,
    )
    with _stage("train-general-student", times):
        train_or_reuse(train)  # the corpus cache built above: general distillation
    return paths


def glue_corpus_file(config: DemoConfig) -> Path:
    """The unlabeled GLUE sentences (train splits + QNLI test), a seeded subset, one per line; written once."""
    if config.data_dir is None:
        raise LrcError("--general needs unlabeled text: pass --data-dir (or set LRC_DATA_DIR) to a glue_data/ folder, "
                       "or --corpus FILE")
    size = config.general_max_passages
    path = config.work_dir / f"corpus-glue-{size or 'all'}-seed{config.seed}.txt"
    if path.is_file():
        return path
    sentences = glue_sentences(config.data_dir)
    if size is not None and size < len(sentences):
        sentences = [sentences[i] for i in sorted(random.Random(config.seed).sample(range(len(sentences)), size))]
    config.work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed demo never leaves half a corpus under the final name
    log.info("wrote %d unlabeled GLUE sentences to %s", len(sentences), path)
    return path


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
