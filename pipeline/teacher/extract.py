"""Stage one: run the teacher once over a task and write the cache (docs/DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.cache import format as cache
from pipeline.core import distributed, outdir
from pipeline.core.runtime import encode, load_classifier
from pipeline.core.task_data import Examples, load_examples
from pipeline.core.tasks import TaskSpec, get_task
from pipeline.core.teacher_config import ExtractConfig
from pipeline.teacher.teacher_pass import hash_tokenizer, hash_weights, resolve_layers, write_cache

log = logging.getLogger(__name__)

def extract_teacher(config: ExtractConfig) -> dict[str, Any]:
    """Teacher + task data (or a corpus) -> cache dir; resumes a killed run; returns the manifest.

    Under torchrun each rank runs the teacher over its own whole shards (`write_cache`)."""
    with distributed.session(config.device) as ranks, outdir.lock(config.output_dir, "extract-teacher", ranks.is_main):
        return _extract(config)


def _extract(config: ExtractConfig) -> dict[str, Any]:
    if config.corpus is not None:  # unlabeled text for general distillation: pipeline/teacher/corpus.py
        from pipeline.teacher.corpus import extract_corpus

        return extract_corpus(config)
    task = get_task(config.data.task)
    model, tokenizer = load_teacher(config.teacher, task, config.trust_remote_code, config.allow_task_mismatch)
    num_layers = model.config.num_hidden_layers
    layers = resolve_layers(config, num_layers)
    examples = {"train": load_examples(config.data, "train")}
    if config.data.train_file is None or config.data.dev_file is not None:
        examples["dev"] = load_examples(config.data, "dev")
    else:
        log.warning("no --dev-file given with --train-file: the cache has no dev split to evaluate on")
    encoded = {split: encode(tokenizer, ex.text_a, ex.text_b, config.max_length) for split, ex in examples.items()}
    settings = build_settings(config, task, model, tokenizer, layers, examples)
    splits = {split: (ids, types, examples[split]) for split, (ids, types) in encoded.items()}
    extra = {"teacher_path": str(config.teacher.resolve()), "kind": "task"}
    manifest, work = write_cache(model, tokenizer, config, settings, splits, layers, task, extra)
    if work is None:
        return manifest
    rows_done, elapsed = work
    train = manifest["splits"]["train"]
    log.info(
        "cache written to %s: %d train rows, %.1f KB/example, %.1f MB total; %d rows extracted in %.0f s (%.1f ex/s)",
        config.output_dir, train["rows"], train["bytes"] / max(train["rows"], 1) / 1e3,
        sum(s["bytes"] for s in manifest["splits"].values()) / 1e6, rows_done, elapsed, rows_done / max(elapsed, 1e-9),
    )
    return manifest


def load_teacher(teacher_dir: Path, task: TaskSpec, trust_remote_code: bool = False,
                 allow_task_mismatch: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The teacher with its classification head, checked against the task before any work."""
    return load_classifier(teacher_dir, task.num_labels, task.name, "teacher", {
        "missing": "pass a fine-tuned model dir (see `lrc finetune-teacher`)",
        "head": f"fine-tune one first with `lrc finetune-teacher --backbone {teacher_dir} --task {task.name}`",
        "labels": f"use a teacher fine-tuned on {task.name}",
    }, trust_remote_code, allow_task_mismatch)


def _hash_examples(examples: Examples) -> str:
    digest = hashlib.sha256()
    texts_b = examples.text_b if examples.text_b is not None else [""] * len(examples)
    for a, b, y in zip(examples.text_a, texts_b, examples.labels):
        digest.update(f"{a}\t{b}\t{y}\n".encode())
    return digest.hexdigest()


def build_settings(
    config: ExtractConfig, task: TaskSpec, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    layers: list[int], examples: dict[str, Examples],
) -> dict[str, Any]:
    """Everything that decides the cache's bytes; a resumed run must match it exactly."""
    data = asdict(config.data)
    settings = {
        "teacher": {
            "config": model.config.to_dict(),
            "weights_sha256": hash_weights(config.teacher),
            "num_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
        },
        "tokenizer_sha256": hash_tokenizer(tokenizer),
        "task": {"name": task.name, "labels": list(task.labels) if task.labels else None,
                 "num_labels": task.num_labels, "is_regression": task.is_regression, "metric": task.metric},
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in data.items() if k != "data_dir"}
        | {f"{split}_sha256": _hash_examples(ex) for split, ex in examples.items()},
        **cache.storage_settings(config, model.config, layers),
        "splits": {split: {"rows": len(ex), "hidden": split == "train"} for split, ex in examples.items()},
    }
    # Compared with the copy read back from settings.json: normalise through JSON now, or the
    # config's int-keyed id2label ({0: ...} vs {"0": ...}) makes every rerun look like other settings.
    return json.loads(json.dumps(settings))


