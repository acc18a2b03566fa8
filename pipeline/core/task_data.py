"""A task's examples: from an explicit file, a glue_data/ folder or the hub, with every label
checked against the task's label set or score range, and the train split optionally subsampled."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import DATA_DIR_ENV, DataConfig
from pipeline.core.data_files import column_index, read_table, read_tsv
from pipeline.core.errors import LrcError
from pipeline.core.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class Examples:
    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence tasks
    labels: list[int] | list[float]  # index into TaskSpec.labels, or a float score (stsb)

    def __len__(self) -> int:
        return len(self.text_a)


@dataclass(frozen=True)
class _TsvLayout:
    """Where a glue_data/ TSV keeps its fields: header names, or indices when it has no header."""

    text: tuple[str | int, ...]
    label: str | int
    num_fields: int | None = None  # only for headerless files


# GLUE's own file columns (they differ from the canonical HF names in TaskSpec.text_columns).
_TSV_LAYOUTS = {
    "cola": _TsvLayout((3,), 1, num_fields=4),  # no header: source, label, original-label, sentence
    "sst2": _TsvLayout(("sentence",), "label"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate"),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "mnli-mm": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "wnli": _TsvLayout(("sentence1", "sentence2"), "label"),
}


def load_examples(data: DataConfig, split: str) -> Examples:
    """The task's `split` ("train" or "dev"): explicit file, else data_dir, else the hub."""
    if split not in SPLITS:
        raise LrcError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    task = get_task(data.task)
    explicit = data.train_file if split == "train" else data.dev_file
    if explicit is not None:
        examples = _load_generic(task, Path(explicit), data)
        source = str(explicit)
    elif data.data_dir is not None:
        path = Path(data.data_dir) / task.glue_dir / ("train.tsv" if split == "train" else task.dev_file)
        examples = _load_glue_tsv(task, path)
        source = str(path)
    else:
        examples = _load_hub(task, split)
        source = f"{task.hf_path}/{task.hf_config}"
    if len(examples) == 0:
        raise LrcError(f"the {split} split of {task.name} ({source}) is empty: point at a file with examples")
    if split == "train" and data.max_train_examples is not None:
        examples = _subsample(examples, data.max_train_examples, data.subsample_seed)
    logger.info("loaded %d %s examples of %s from %s", len(examples), split, task.name, source)
    return examples


def _subsample(examples: Examples, size: int, seed: int) -> Examples:
    """A seeded random subset, kept in file order so that row ids stay monotone."""
    if size >= len(examples):
        logger.info("--max-train-examples %d >= %d train examples: keeping all", size, len(examples))
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    text_b = None if examples.text_b is None else [examples.text_b[i] for i in keep]
    labels: Any = [examples.labels[i] for i in keep]
    return Examples([examples.text_a[i] for i in keep], text_b, labels)


# ---- labels ----------------------------------------------------------------------------------------


def _to_label(task: TaskSpec, value: Any, where: str) -> int | float:
    """A label name, an int (or integral float / digit string) class index, or a float score."""
    if task.labels is None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise LrcError(f"{where}: score {value!r} is not a number: {task.name} needs a float label") from None
        if not math.isfinite(score):  # float() accepts "nan" and "inf"; either would poison every loss
            raise LrcError(f"{where}: score {value!r} is not a finite number: fix or remove that example")
        low, high = task.score_range or (-math.inf, math.inf)
        if not low <= score <= high:
            raise LrcError(f"{where}: score {value!r} is outside {task.name}'s range [{low:g}, {high:g}]: fix the "
                           "file or pass the right --task / --label-column")
        return score
    if isinstance(value, str) and value.strip() in task.labels:
        return task.labels.index(value.strip())
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    if index is None or not 0 <= index < len(task.labels):
        raise LrcError(
            f"{where}: label {value!r} is not in {task.name}'s label set {list(task.labels)} "
            f"(or 0..{len(task.labels) - 1}): fix the file or pass the right --task / --label-column"
        )
    return index


# ---- glue_data/ TSV files --------------------------------------------------------------------------


def _load_glue_tsv(task: TaskSpec, path: Path) -> Examples:
    layout = _TSV_LAYOUTS[task.name]
    names, rows = read_tsv(path, header=layout.num_fields is None, num_fields=layout.num_fields)
    text_idx = [column_index(path, names, c) for c in layout.text]
    label_idx = column_index(path, names, layout.label)
    columns: list[list[str]] = [[fields[i] for _, fields in rows] for i in text_idx]
    labels = [_to_label(task, fields[label_idx], f"{path}:{line}") for line, fields in rows]
    return Examples(columns[0], columns[1] if len(columns) > 1 else None, labels)  # type: ignore[arg-type]


# ---- explicit files (--train-file / --dev-file) ----------------------------------------------------


def _load_generic(task: TaskSpec, path: Path, data: DataConfig) -> Examples:
    """Each column flag overrides one default: the task's canonical text columns and "label"."""
    table = read_table(path)
    text_col = data.text_column or task.text_columns[0]
    pair_col = data.text_pair_column or (task.text_columns[1] if len(task.text_columns) > 1 else None)
    label_col = data.label_column or "label"
    for column, flag in ((text_col, "--text-column"), (pair_col, "--text-pair-column"), (label_col, "--label-column")):
        if column is not None and column not in table:
            raise LrcError(
                f"{path} has no column {column!r} (it has: {', '.join(table) or 'none'}): pass {flag} naming one"
            )
    text_a = _texts(path, table[text_col], text_col)
    text_b = None if pair_col is None else _texts(path, table[pair_col], pair_col)
    labels = [_to_label(task, value, f"{path} row {i}") for i, value in enumerate(table[label_col])]
    return Examples(text_a, text_b, labels)  # type: ignore[arg-type]


def _texts(path: Path, values: list[Any], column: str) -> list[str]:
    for i, value in enumerate(values):
        if value is None:
            raise LrcError(f"{path} row {i}: column {column!r} is empty: every example needs its text")
    return [str(value) for value in values]


# ---- the hub ---------------------------------------------------------------------------------------


def _load_hub(task: TaskSpec, split: str) -> Examples:
    hf_split = "train" if split == "train" else task.hf_dev_split
    try:
        import datasets

        ds = datasets.load_dataset(task.hf_path, task.hf_config, split=hf_split)
    except Exception as exc:  # offline, no such dataset, network: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LrcError(
            f"could not load {task.hf_path}/{task.hf_config} ({hf_split}) from the hub ({reason}): "
            f"pass --data-dir or set {DATA_DIR_ENV} to a local glue_data/ folder"
        ) from None
    columns = [list(ds[c]) for c in task.text_columns]
    labels = [_to_label(task, value, f"{task.hf_path}/{task.hf_config} {hf_split} row {i}")
              for i, value in enumerate(ds["label"])]
    return Examples(columns[0], columns[1] if len(columns) > 1 else None, labels)  # type: ignore[arg-type]
