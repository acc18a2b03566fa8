"""GLUE task table and data loading: a glue_data/ folder, explicit files, or the hub."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.config import DATA_DIR_ENV, DataConfig
from pipeline.core.errors import LrcError

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev")
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MAIN_METRIC = {"mcc": "mcc", "accuracy": "accuracy", "f1_accuracy": "f1", "pearson_spearman": "pearson"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    glue_dir: str
    text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None  # None = regression
    metric: str
    dev_file: str
    hf_path: str
    hf_config: str
    hf_dev_split: str

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def main_metric(self) -> str:
        return _MAIN_METRIC[self.metric]

    @property
    def score_range(self) -> tuple[float, float] | None:
        """The closed range a regression task's scores lie in (its annotation scale), or None."""
        return _SCORE_RANGES.get(self.name)


def _spec(name: str, glue_dir: str, text: tuple[str, ...], labels: tuple[str, ...] | None, metric: str,
          dev_file: str = "dev.tsv", hf_config: str | None = None, hf_dev_split: str = "validation") -> TaskSpec:
    return TaskSpec(name, glue_dir, text, labels, metric, dev_file, "nyu-mll/glue", hf_config or name, hf_dev_split)


_PAIR = ("sentence1", "sentence2")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")
TASKS: dict[str, TaskSpec] = {
    "cola": _spec("cola", "CoLA", ("sentence",), _BINARY, "mcc"),
    "sst2": _spec("sst2", "SST-2", ("sentence",), _BINARY, "accuracy"),
    "mrpc": _spec("mrpc", "MRPC", _PAIR, _BINARY, "f1_accuracy"),
    "stsb": _spec("stsb", "STS-B", _PAIR, None, "pearson_spearman"),
    "qqp": _spec("qqp", "QQP", ("question1", "question2"), _BINARY, "f1_accuracy"),
    "mnli": _spec("mnli", "MNLI", ("premise", "hypothesis"), _MNLI_LABELS, "accuracy",
                  "dev_matched.tsv", "mnli", "validation_matched"),
    "mnli-mm": _spec("mnli-mm", "MNLI", ("premise", "hypothesis"), _MNLI_LABELS, "accuracy",
                     "dev_mismatched.tsv", "mnli", "validation_mismatched"),
    "qnli": _spec("qnli", "QNLI", ("question", "sentence"), _NLI2, "accuracy"),
    "rte": _spec("rte", "RTE", _PAIR, _NLI2, "accuracy"),
    "wnli": _spec("wnli", "WNLI", _PAIR, _BINARY, "accuracy"),
}
# A score outside its task's scale is a wrong column or a rescaled file, not data: refused at load.
_SCORE_RANGES = {"stsb": (0.0, 5.0)}  # STS-B similarity, 0 (unrelated) to 5 (equivalent)
# Spellings people use (GLUE folder names, HF split names) -> canonical key, compared without - _ or spaces.
_ALIASES = {re.sub(r"[-_ ]", "", key): key for key in TASKS} | {
    "mnlimatched": "mnli",
    "mnlimismatched": "mnli-mm",
}


def get_task(name: str) -> TaskSpec:
    key = _ALIASES.get(re.sub(r"[-_ ]", "", name.strip().lower()))
    if key is None:
        raise LrcError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]


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


@contextlib.contextmanager
def readable(path: Path, reader: Any = None) -> Iterator[None]:
    """Decoding and CSV errors of a data file as one line naming the file, the place and the fix."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise LrcError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte offset {err.start} of "
                       "a block read): re-save it as UTF-8") from None
    except csv.Error as err:
        line = f":{reader.line_num}" if reader is not None else ""
        raise LrcError(f"{path}{line}: {err} (a field over {csv.field_size_limit()} characters, or a quote left "
                       "open that swallows the lines after it): close the quote or shorten that field") from None


def _read_tsv(path: Path, header: bool, num_fields: int | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header names and (line number, fields) rows; quoting off since sentences may start with a quote."""
    if not path.is_file():
        raise LrcError(
            f"data file not found: {path}: pass --data-dir (or set {DATA_DIR_ENV}) to a glue_data/ root "
            f"that holds it, or --train-file/--dev-file"
        )
    # utf-8-sig strips MRPC's byte-order mark, which would otherwise glue itself to the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        with readable(path, reader):
            return _tsv_rows(path, reader, header, num_fields)


def _tsv_rows(path: Path, reader: Any, header: bool, num_fields: int | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    names = next(reader, []) if header else []
    width = len(names) if header else num_fields
    rows = []
    for fields in reader:
        if not fields:  # a blank line (e.g. a trailing one) carries no example
            continue
        if width is not None and len(fields) != width:
            raise LrcError(
                f"{path}:{reader.line_num}: malformed TSV row with {len(fields)} fields, expected {width}: "
                f"fix or remove that line"
            )
        rows.append((reader.line_num, fields))
    return names, rows


def _column_index(path: Path, names: list[str], column: str | int) -> int:
    if isinstance(column, int):
        return column
    if column not in names:
        raise LrcError(f"{path} has no column {column!r} (it has: {', '.join(names)}): is it the right file?")
    return names.index(column)


def _load_glue_tsv(task: TaskSpec, path: Path) -> Examples:
    layout = _TSV_LAYOUTS[task.name]
    names, rows = _read_tsv(path, header=layout.num_fields is None, num_fields=layout.num_fields)
    text_idx = [_column_index(path, names, c) for c in layout.text]
    label_idx = _column_index(path, names, layout.label)
    columns: list[list[str]] = [[fields[i] for _, fields in rows] for i in text_idx]
    labels = [_to_label(task, fields[label_idx], f"{path}:{line}") for line, fields in rows]
    return Examples(columns[0], columns[1] if len(columns) > 1 else None, labels)  # type: ignore[arg-type]


# ---- explicit files (--train-file / --dev-file) ----------------------------------------------------


def read_table(path: Path) -> dict[str, list[Any]]:
    """Column name -> values for a .csv, .tsv, .jsonl/.json (JSON lines) or .parquet file."""
    if not path.is_file():
        raise LrcError(f"data file not found: {path}: check --train-file / --dev-file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except (pa.ArrowException, OSError) as err:
            raise LrcError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:160]}): "
                           "write it again") from None
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, suffix)
    if suffix in (".jsonl", ".json"):
        return _read_json_lines(path)
    raise LrcError(f"unsupported data file type {suffix!r} ({path}): use .csv, .tsv, .jsonl/.json or .parquet")


def _read_delimited(path: Path, suffix: str) -> dict[str, list[Any]]:
    if suffix == ".tsv":
        names, rows = _read_tsv(path, header=True)
        return {name: [fields[i] for _, fields in rows] for i, name in enumerate(names)}
    # A .csv is a real CSV file: commas inside sentences come quoted, so default quote handling is right.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        with readable(path, reader):
            return _csv_columns(path, reader)


def _csv_columns(path: Path, reader: Any) -> dict[str, list[Any]]:
    names = next(reader, [])
    table: dict[str, list[Any]] = {name: [] for name in names}
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(names):
            raise LrcError(
                f"{path}:{reader.line_num}: malformed CSV row with {len(fields)} fields, "
                f"expected {len(names)}: fix or remove that line"
            )
        for name, value in zip(names, fields):
            table[name].append(value)
    return table


def _read_json_lines(path: Path) -> dict[str, list[Any]]:
    records = []
    with path.open(encoding="utf-8") as f, readable(path):
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LrcError(f"{path}:{line_num}: not a JSON object per line ({exc.msg}): write JSON lines") from None
            if not isinstance(record, dict):
                raise LrcError(f"{path}:{line_num}: expected a JSON object per line, got {type(record).__name__}")
            records.append(record)
    names = list(dict.fromkeys(key for record in records for key in record))
    # A key missing from a record reads as None, which the text/label checks then report with its row.
    return {name: [record.get(name) for record in records] for name in names}


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
