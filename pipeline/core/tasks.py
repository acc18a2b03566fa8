"""The GLUE task table: each task's columns, labels, metric and where its data lives (glue_data/ and the hub);
`get_task` finds one by any usual spelling. Loading a task's examples is pipeline/core/task_data.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.core.errors import LrcError

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
