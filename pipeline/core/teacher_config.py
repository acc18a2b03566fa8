"""The teacher stages' configs: `lrc finetune-teacher` (FinetuneConfig) and `lrc extract-teacher` (ExtractConfig, with
CorpusConfig for a corpus cache). Their fields are `option`s, so cli.py generates the commands' options from them;
`nested` fields bring DataConfig's and CorpusConfig's options with them (docs/DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import BUNDLED_BACKBONE, DataConfig
from pipeline.core.options import (
    allow_task_mismatch_option, check_device_precision, check_optimisation, check_whole, device_option, nested, option,
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
        check_device_precision(self)


@dataclass(frozen=True)
class CorpusConfig:
    """Unlabeled text for general distillation: a file or a Hugging Face dataset name.

    A `.txt` file holds one passage per line; `.jsonl`/`.json`/`.csv`/`.tsv`/`.parquet` files and
    datasets hold passages in `text_column`. Anything that is not an existing file is read as a dataset
    name (`dataset_config`, `dataset_split`; needs network access).
    """

    source: str = option(flags=("--corpus",), help=(
        "Unlabeled text instead of --task, for general distillation: a .txt file (one passage per line), a "
        ".jsonl/.csv/.tsv/.parquet file (--text-column, default text) or a Hugging Face dataset name (online)."))
    # extract-teacher has one --text-column for task files and corpora: DataConfig's, listed first
    text_column: str = option("text", help="Column of the passages in a --corpus file or dataset.")
    dataset_config: str | None = option(None, flags=("--corpus-config",), help=(  # e.g. 20231101.en for wikimedia/wikipedia
        "--corpus dataset's config name, e.g. 20231101.en for wikimedia/wikipedia."))
    dataset_split: str = option("train", flags=("--corpus-split",), help="--corpus dataset's split.")
    # the first N passages (a dataset is then streamed, not downloaded whole)
    max_passages: int | None = option(None, help=(
        "Read only the first N passages of --corpus (a dataset is then streamed)."))

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

    teacher: Path | None = option(flags=("--teacher",), help=(
        "Fine-tuned teacher dir (HF format, with a classification head); with --corpus any encoder dir (default: the "
        "bundled all-MiniLM-L6-v2)."))
    data: DataConfig | None = nested(DataConfig, when="task", helps={"task": (
        "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, wnli (or --corpus).")})
    output_dir: Path = option(flags=("--output-dir", "-o"), help="Cache dir to create (or resume).")
    corpus: CorpusConfig | None = nested(CorpusConfig, None, when="source")
    student_layers: int = option(4, help="Store the teacher layers a student of this depth maps to.")
    # --layers all|2,3,5,6 on the command line (cli.py parses it into these two fields)
    layers: tuple[int, ...] | None = option(None, help=(
        "Explicit teacher layers, e.g. 2,3,5,6, or 'all'; overrides --student-layers."))
    all_layers: bool = False
    max_length: int = option(128, help="Truncate inputs to this many tokens.")
    batch_size: int = option(64, help="Teacher batch size.")
    shard_rows: int = option(4096, help="Rows per Arrow shard (the unit of resumption).")
    hidden_dtype: str = option("float16", help=(
        "Storage dtype of hidden states: float16, float32 or int8 (one scale per token per layer: half float16's bytes)."))
    device: str = device_option()
    precision: str = precision_option()
    overwrite: bool = option(False, help="Replace a cache already in --output-dir.")
    allow_task_mismatch: bool = allow_task_mismatch_option()
    trust_remote_code: bool = trust_remote_code_option()

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
        check_device_precision(self)

    @property
    def teacher_source(self) -> str:
        """The model to run: --teacher, or for a corpus cache without one the bundled backbone."""
        return str(self.teacher) if self.teacher is not None else BUNDLED_BACKBONE
