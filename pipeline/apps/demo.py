"""`lrc demo`: fine-tune a teacher, cache it, build negatives, train a student, compare the two.

By default the task student starts from the fine-tuned teacher cut to the student's shape (train-student's
`--init auto`). `--general` first distils the bundled backbone (pre-trained, not fine-tuned) on unlabeled
text into a general student of the student's shape (itself cut from the backbone), and starts the task
student from that general student instead (the paper's recipe).

Each stage reuses what an earlier run left in the work dir when its settings match, so a
second `lrc demo` finishes in seconds; an artifact made with other settings is refused, and
`--overwrite` redoes every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from transformers import AutoConfig

from pipeline.apps.evaluate import evaluate, format_table
from pipeline.core import atomic, outdir
from pipeline.core.apps_config import DemoConfig, EvaluateConfig
from pipeline.core.config import BUNDLED_BACKBONE, DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.runtime import from_pretrained
from pipeline.core.task_data import load_examples
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig, FinetuneConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.train import train_or_reuse
from pipeline.teacher.corpus import glue_sentences
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.finetune import finetune_teacher, resolve_backbone

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stage(name: str, times: dict[str, float]) -> Iterator[None]:
    log.info("==== %s", name)
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 1)
    log.info("==== %s done in %.1f s", name, times[name])


@dataclass(frozen=True)
class Plan:
    """Every stage's config, built (and so validated) before the first stage runs: a value only a late stage
    refuses (e.g. `--k 0` for build-negatives) is found in seconds, not after fine-tuning and extraction."""

    paths: dict[str, Path]
    finetune: FinetuneConfig
    extract: ExtractConfig
    negatives: NegativesConfig | None  # None with --k 0: the student trains without negatives
    train: TrainConfig
    evaluate: EvaluateConfig
    corpus_extract: ExtractConfig | None = None  # --general: the corpus cache, its negatives, the general student
    corpus_negatives: NegativesConfig | None = None
    general_train: TrainConfig | None = None


def plan(config: DemoConfig) -> Plan:
    """The demo's stages as configs, with the paths they write under the work dir; writes nothing."""
    task = get_task(config.task)
    data = DataConfig(task=task.name, data_dir=config.data_dir, max_train_examples=config.max_train_examples,
                      subsample_seed=config.seed)
    work = config.work_dir
    paths = {"teacher": work / f"teacher-{task.name}", "cache": work / f"cache-{task.name}",
             "student": work / f"student-{task.name}{'-general' if config.general else ''}"}
    paths["negatives"] = paths["cache"] / "negatives.arrow"
    run = dict(device=config.device, precision=config.precision, overwrite=config.overwrite)
    student = dict(layers=config.student_layers, hidden=config.student_hidden, heads=config.student_heads,
                   intermediate=config.student_intermediate, k=config.k, seed=config.seed, **run)
    general: dict[str, Any] = {}
    if config.general:
        paths |= {"corpus_cache": work / "cache-corpus", "general_student": work / "general-student",
                  "corpus": config.corpus if config.corpus is not None else glue_corpus_path(config)}
        general = dict(
            corpus_extract=ExtractConfig(
                teacher=None, data=None, output_dir=paths["corpus_cache"], student_layers=config.student_layers,
                max_length=config.max_length, corpus=CorpusConfig(
                    source=str(paths["corpus"]),
                    max_passages=config.general_max_passages if config.corpus is not None else None), **run),
            corpus_negatives=NegativesConfig(cache_dir=paths["corpus_cache"], k=config.k, seed=config.seed,
                                             overwrite=config.overwrite)
            if config.k > 0 else None,
            general_train=TrainConfig(cache_dir=paths["corpus_cache"], output_dir=paths["general_student"],
                                      epochs=config.general_epochs, learning_rate=config.general_lr, **student),
        )
    return Plan(
        paths=paths,
        finetune=FinetuneConfig(data=data, output_dir=paths["teacher"], max_length=config.max_length,
                                epochs=config.teacher_epochs, learning_rate=config.teacher_lr, seed=config.seed, **run),
        extract=ExtractConfig(teacher=paths["teacher"], data=data, output_dir=paths["cache"],
                              student_layers=config.student_layers, max_length=config.max_length, **run),
        negatives=NegativesConfig(cache_dir=paths["cache"], k=config.k, seed=config.seed, overwrite=config.overwrite)
        if config.k > 0 else None,
        train=TrainConfig(cache_dir=paths["cache"], output_dir=paths["student"],
                          init=str(paths["general_student"]) if config.general else "auto",
                          epochs=config.student_epochs, learning_rate=config.student_lr, **student),
        evaluate=EvaluateConfig(model_dir=paths["student"], data=data, compare=paths["teacher"],
                                max_length=config.max_length, device=config.device),
        **general,
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage; return (and write to <work_dir>/demo_results.json) times, metrics and ratios."""
    stages = plan(config)  # every stage's settings checked before anything is written
    check_backbone(config, resolve_backbone(BUNDLED_BACKBONE))  # the package is there, the student fits it
    load_examples(stages.finetune.data, "dev")  # fail now if the task data is missing, before any dir or training
    outdir.check(config.work_dir, "demo", overwrite=False, option="--work-dir", adopt=True)
    with outdir.lock(config.work_dir, "demo"):
        outdir.mark(config.work_dir, "demo")
        return _run(config, stages)


def check_backbone(config: DemoConfig, backbone: str) -> None:
    """What only the backbone can refuse, read from its config alone: a student deeper than the teacher (extract
    would refuse it, after fine-tuning) and inputs longer than its position table."""
    model = from_pretrained(AutoConfig.from_pretrained, backbone, "the demo's backbone", False)
    if config.student_layers > model.num_hidden_layers:
        raise LrcError(f"--student-layers {config.student_layers} is deeper than the demo's teacher "
                       f"({model.num_hidden_layers} layers): pass at most {model.num_hidden_layers}")
    if config.max_length > model.max_position_embeddings:
        raise LrcError(f"--max-length {config.max_length} is longer than the demo's backbone reads "
                       f"({model.max_position_embeddings} positions): pass at most {model.max_position_embeddings}")


def _run(config: DemoConfig, stages: Plan) -> dict[str, Any]:
    task = get_task(config.task)
    work, paths = config.work_dir, dict(stages.paths)
    subsample = f"a seeded subset of {config.max_train_examples} rows" if config.max_train_examples else "all rows"
    log.info("lrc demo on %s: train split = %s (--max-train-examples), artifacts under %s", task.name, subsample, work)

    times: dict[str, float] = {}
    if config.general:
        general_stages(config, stages, times)
    teacher = task_stages(stages, times)
    with _stage("train-student", times):
        summary, _ = train_or_reuse(stages.train)
    with _stage("evaluate", times):
        results = evaluate(stages.evaluate)

    outcome = {"task": task.name, "stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
               "teacher_info": teacher, "student_summary": summary, "evaluation": results,
               "artifacts": {k: str(v) for k, v in paths.items()}}
    name = "demo_general_results" if config.general else "demo_results"
    (work / f"{name}.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
    (work / f"{name}.md").write_text(render(outcome))
    return outcome


def task_stages(stages: Plan, times: dict[str, float]) -> dict[str, Any]:
    """Teacher -> task cache -> negatives, each reused when finished with these settings; returns the teacher's
    info. benchmarks/short_budget.py starts its students from the same three."""
    with _stage("finetune-teacher", times):
        teacher = finetune_teacher(stages.finetune)
    with _stage("extract-teacher", times):
        extract_teacher(stages.extract)
    if stages.negatives is not None:
        with _stage("build-negatives", times):
            build_negatives(stages.negatives)
    return teacher


def general_stages(config: DemoConfig, stages: Plan, times: dict[str, float]) -> None:
    """Corpus -> corpus cache -> negatives -> general student; each reused when finished with these settings.
    Task-independent, so every task's --general demo in one work dir shares them."""
    assert stages.corpus_extract is not None and stages.general_train is not None
    with _stage("make-corpus", times):
        if config.corpus is None:
            glue_corpus_file(config)
    with _stage("extract-corpus", times):
        extract_teacher(stages.corpus_extract)
    if stages.corpus_negatives is not None:
        with _stage("build-negatives-corpus", times):
            build_negatives(stages.corpus_negatives)
    with _stage("train-general-student", times):
        train_or_reuse(stages.general_train)  # the corpus cache built above: general distillation


def glue_corpus_path(config: DemoConfig) -> Path:
    """Where `glue_corpus_file` writes the GLUE sentences for these settings."""
    return config.work_dir / f"corpus-glue-{config.general_max_passages or 'all'}-seed{config.seed}.txt"


def glue_corpus_file(config: DemoConfig) -> Path:
    """The unlabeled GLUE sentences (train splits + QNLI test), a seeded subset, one per line; written once."""
    if config.data_dir is None:
        raise LrcError("--general needs unlabeled text: pass --data-dir (or set LRC_DATA_DIR) to a glue_data/ folder, "
                       "or --corpus FILE")
    size = config.general_max_passages
    path = glue_corpus_path(config)
    if path.is_file():
        return path
    sentences = glue_sentences(config.data_dir)
    if size is not None and size < len(sentences):
        sentences = [sentences[i] for i in sorted(random.Random(config.seed).sample(range(len(sentences)), size))]
    config.work_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(s + "\n" for s in sentences))  # a killed demo never leaves half a corpus
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
