"""The teacher stages' configs: `lrc finetune-teacher` (FinetuneConfig) and `lrc extract-teacher` (ExtractConfig, with
CorpusConfig for a corpus cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import BUNDLED_BACKBONE, DataConfig
from pipeline.core.options import (
    DEVICES, PRECISIONS, allow_task_mismatch_option, check_optimisation, check_whole, device_option, nested, option,
    precision_option, require, trust_remote_code_option,
)

HIDDEN_DTYPES = ("float16", "float32", "int8")  # Arrow has no bfloat16; int8: pipeline/cache/quant.py


@dataclass(frozen=True)
class FinetuneConfig:
    """`lrc finetune-teacher`: backbone + task -> teacher dir with a classification head."""

    data: DataConfig = nested(DataConfig)
    output_dir: Path = option(flags=("--output-dir", "-o"), help="Where the teacher (HF format) is written.")
    backbone: str = option(BUNDLED_BACKBONE, help=(
        "Local model dir or hub name; default: the bundled all-MiniLM-L6-v2."))
    max_length: int = option(128, help="Truncate inputs to this many tokens.")
    epochs: float = option(3.0, help="Training epochs (fractions allowed).")
    batch_size: int = option(32, help="Training batch size.")
    eval_batch_size: int = 128
    learning_rate: float = option(5e-5, flags=("--lr",), help="Peak learning rate of AdamW.")
    weight_decay: float = option(0.01, help="AdamW weight decay (not on biases and LayerNorm).")
    max_grad_norm: float = option(1.0, help=(
        "Clip the global gradient norm to this before each step; 0 = no clipping."))
    warmup_ratio: float = option(0.1, help="Fraction of steps with linear warmup.")
    seed: int = option(42, help="Random seed (data order, head initialisation).")
    device: str = device_option()
    precision: str = precision_option()
    overwrite: bool = option(False, help="Replace a teacher already in --output-dir.")
    trust_remote_code: bool = trust_remote_code_option()

    def __post_init__(self) -> None:
        check_whole("--max-length", self.max_length, 8)
        check_optimisation(self)
        require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class CorpusConfig:
    """Unlabeled text for general distillation: a file or a Hugging Face dataset name.

    A `.txt` file holds one passage per line; `.jsonl`/`.json`/`.csv`/`.tsv`/`.parquet` files and
    datasets hold passages in `text_column`. Anything that is not an existing file is read as a dataset
    name (`dataset_config`, `dataset_split`; needs network access).
    """

    source: str
    text_column: str = "text"
    dataset_config: str | None = None  # e.g. "20231101.en" for wikimedia/wikipedia
    dataset_split: str = "train"
    max_passages: int | None = None  # the first N passages (a dataset is then streamed, not downloaded whole)

    def __post_init__(self) -> None:
        require(bool(str(self.source).strip()), "--corpus is empty: pass a text file or a dataset name")
        require(bool(self.text_column), "--text-column is empty: name the column that holds the passages")
        if self.max_passages is not None:
            check_whole("--max-passages", self.max_passages)


@dataclass(frozen=True)
class ExtractConfig:
    """`lrc extract-teacher`: teacher dir + task -> cache dir (Arrow shards + manifest.json).

    With `corpus` instead of `data`, a corpus cache for general distillation: the pre-trained encoder
    `teacher` (no task head needed; None = the bundled all-MiniLM-L6-v2) over unlabeled text.
    Which teacher layers to store: `layers` (explicit 1-based indices) wins; otherwise the
    layers that a student of depth `student_layers` maps to; `all_layers` stores 1..N.
    """

    teacher: Path | None
    data: DataConfig | None
    output_dir: Path
    student_layers: int = 4
    layers: tuple[int, ...] | None = None
    all_layers: bool = False
    max_length: int = 128
    batch_size: int = 64
    shard_rows: int = 4096
    hidden_dtype: str = "float16"
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    allow_task_mismatch: bool = False  # accept a teacher whose teacher_info.json records another task
    trust_remote_code: bool = False  # run Python shipped in the teacher dir: only for code you have read
    corpus: CorpusConfig | None = None

    def __post_init__(self) -> None:
        require((self.data is None) != (self.corpus is None),
                 "pass either --task (a task cache) or --corpus (a corpus cache for general distillation), not both")
        require(self.teacher is not None or self.corpus is not None,
                 "no --teacher given: pass a fine-tuned model dir (see `lrc finetune-teacher`)")
        check_whole("--student-layers", self.student_layers)
        require(
            self.layers is None or (len(self.layers) > 0 and all(isinstance(j, int) and j >= 1 for j in self.layers)),
            f"--layers must be 1-based teacher layer indices, got {self.layers}",
        )
        require(
            self.layers is None or len(set(self.layers)) == len(self.layers),
            f"--layers has a repeated layer: {self.layers}",
        )
        check_whole("--max-length", self.max_length, 8)
        check_whole("--batch-size", self.batch_size)
        check_whole("--shard-rows", self.shard_rows)
        require(
            self.hidden_dtype in HIDDEN_DTYPES,
            f"--hidden-dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}",
        )
        require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def teacher_source(self) -> str:
        """The model to run: --teacher, or for a corpus cache without one the bundled backbone."""
        return str(self.teacher) if self.teacher is not None else BUNDLED_BACKBONE
