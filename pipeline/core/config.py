"""One frozen dataclass per stage, validated on construction. Defaults live only in these dataclasses.

TrainConfig and SweepConfig live in pipeline/core/train_config.py (TrainConfig's fields carry their flags and help, see
pipeline/core/options.py); they are imported here so that every stage's config comes from this one module."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from pipeline.core.errors import LrcError
from pipeline.core.options import (  # noqa: F401 - the shared names are re-exported: callers import them from here
    CACHE_CHECKS, DEVICES, PRECISIONS, check_optimisation, check_real, check_seed, check_whole, default_of, help_of, option, require,
)
from pipeline.core.train_config import (  # noqa: F401 - re-exported, as above
    GRANULARITIES, INIT_SELECTIONS, INTERMEDIATE_LOSSES, KEEP_CHOICES, NEGATIVE_SOURCES, PROJECTION_INITS,
    SweepConfig, TrainConfig,
)

DATA_DIR_ENV = "LRC_DATA_DIR"
BUNDLED_BACKBONE = "bundled:all-MiniLM-L6-v2"
BUNDLED_MPNET = "bundled:all-mpnet-base-v2"  # 12 x 768, the optional extra lrc[mpnet]
HIDDEN_DTYPES = ("float16", "float32", "int8")  # Arrow has no bfloat16; int8: pipeline/cache/quant.py


def default_data_dir() -> Path | None:
    """The GLUE data root from $LRC_DATA_DIR, or None (then tasks fall back to the hub)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """phi(i) = round_half_up(i * N / M) for i = 1..M: the last student layer maps to the last teacher layer."""
    n, m = teacher_layers, student_layers
    return [(2 * i * n + m) // (2 * m) for i in range(1, m + 1)]


@dataclass(frozen=True)
class DataConfig:
    """Where a task's examples come from: a glue_data/ root, the hub, or explicit files."""

    task: str
    data_dir: Path | None = field(default_factory=default_data_dir)
    train_file: Path | None = None
    dev_file: Path | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_train_examples: int | None = None  # a seeded random subset of train, None = all
    subsample_seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.task), "no task given: pass --task (e.g. --task sst2)")
        if self.max_train_examples is not None:
            check_whole("--max-train-examples", self.max_train_examples)
        check_seed("--subsample-seed", self.subsample_seed)
        require(
            self.text_pair_column is None or self.text_column is not None,
            "--text-pair-column needs --text-column too",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """`lrc finetune-teacher`: backbone + task -> teacher dir with a classification head."""

    data: DataConfig
    output_dir: Path
    backbone: str = BUNDLED_BACKBONE
    max_length: int = 128
    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 128
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # clip the global gradient norm before each step; 0 = off
    warmup_ratio: float = 0.1
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    trust_remote_code: bool = False  # run Python shipped in the backbone dir: only for code you have read

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


NEGATIVE_STRATEGIES = ("random", "hard", "mixed")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


@dataclass(frozen=True)
class NegativesConfig:
    """`lrc build-negatives`: cache dir -> negatives.arrow (M candidates per train row)."""

    # Declared like TrainConfig's fields (pipeline/core/options.py), so cli.py builds build-negatives' options from them.
    cache_dir: Path = option(help="A cache dir written by `lrc extract-teacher`.", flags=("--cache",))
    k: int = option(4, flags=("--k",), help="Negatives per example used in each training step (K).")
    candidates: int | None = option(None, help="Candidates stored per example (M >= K); default max(4K, 16).")
    strategy: str = option("random", help="random (uniform, the paper's), hard (nearest other-label neighbours) or mixed.")
    index: str = option("auto", help="auto (exact when small, approximate when large), flat, ivf or hnsw.")
    output: Path | None = option(None, help="Output file; default <cache>/negatives.arrow.")
    hard_pool: int | None = option(None, help=(
        "Width of the nearest-neighbour list hard candidates are drawn from; default 4M."))
    regression_margin: float = option(0.5, help="Regression tasks: hard negatives differ in label by at least this.")
    exact_max_rows: int = 50_000  # `auto` uses exact search up to this many rows (no flag)
    recall_sample: int = 1000  # queries checked against exact search for an approximate index (no flag)
    seed: int = option(0, help="Random seed; the same seed gives the same file.")
    verify_cache: str = option("auto", flags=("--verify-cache",), help=help_of(TrainConfig, "verify_cache"))
    overwrite: bool = option(False, help="Replace a negatives file built with other settings (the same settings reuse it).")

    def __post_init__(self) -> None:
        check_whole("--k", self.k)
        if self.candidates is not None:
            check_whole("--candidates", self.candidates)
        require(
            self.candidates is None or self.candidates >= self.k,
            f"--candidates (M={self.candidates}) must be >= --k ({self.k})",
        )
        if self.hard_pool is not None:
            check_whole("--hard-pool", self.hard_pool)
        check_whole("exact_max_rows", self.exact_max_rows, 0)
        check_whole("recall_sample", self.recall_sample, 0)
        check_seed("--seed", self.seed)
        require(
            self.strategy in NEGATIVE_STRATEGIES,
            f"unknown --strategy {self.strategy!r}: choose one of {', '.join(NEGATIVE_STRATEGIES)}",
        )
        require(
            self.index in INDEX_TYPES,
            f"unknown --index {self.index!r}: choose one of {', '.join(INDEX_TYPES)}",
        )
        check_real("--regression-margin", self.regression_margin, low_open=False)
        require(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}, got {self.verify_cache!r}")

    @property
    def num_candidates(self) -> int:
        return self.candidates if self.candidates is not None else max(4 * self.k, 16)

    @property
    def output_path(self) -> Path:
        return self.output if self.output is not None else self.cache_dir / "negatives.arrow"


@dataclass(frozen=True)
class EvaluateConfig:
    """`lrc evaluate`: a model dir's dev metric, size and speed; optionally beside another model."""

    model_dir: Path
    data: DataConfig
    compare: Path | None = None
    max_length: int = 128
    eval_batch_size: int = 128
    batch_size: int = 32  # latency/throughput are measured on batches of this shape
    also_batch_sizes: tuple[int, ...] = (1,)  # latency also timed at these (1: one request at a time)
    seq_length: int = 128
    timing_batches: int = 10
    device: str = "auto"
    precision: str = "fp32"
    output: Path | None = None  # also write the results as JSON here
    allow_task_mismatch: bool = False  # evaluate a model whose recorded task (teacher_info.json, training_summary.json) differs
    trust_remote_code: bool = False  # run Python shipped in the model dir: only for code you have read

    def __post_init__(self) -> None:
        check_whole("--max-length", self.max_length, 8)
        check_whole("--eval-batch-size", self.eval_batch_size)
        check_whole("--batch-size", self.batch_size)
        check_whole("--seq-length", self.seq_length, 2)
        check_whole("--timing-batches", self.timing_batches)
        for size in self.also_batch_sizes:
            check_whole("--also-batch-sizes", size)
        require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


EXPORT_FORMATS = ("onnx",)
QUANTIZE = ("none", "int8")
QUANTIZE_OPS = ("MatMul", "Gemm", "Gather")  # what dynamic int8 may quantise in an exported encoder


@dataclass(frozen=True)
class ExportConfig:
    """`lrc export`: a student (or teacher) dir -> an ONNX model dir, optionally with int8 weights."""

    source: Path
    output_dir: Path
    format: str = "onnx"
    quantize: str = "none"
    # 17: LayerNormalization is one op from 17 on, and onnxruntime releases of the last years all run it.
    opset: int = 17
    # Dynamic int8 quantises the weights of these ops; activations are quantised per batch at run time. The
    # word embeddings (a Gather) stay float32 by default: a lookup costs no time, and int8 buys only bytes there
    # (sizes in docs/PERFORMANCE.md, accuracy in docs/RESULTS.md).
    quantize_ops: tuple[str, ...] = ("MatMul", "Gemm")
    # The export is checked against the PyTorch model on random ids of a shape other than the traced one:
    # logits must agree within this (float32: differences are rounding, ~1e-5; a wrong graph is off by >0.01).
    tolerance: float = 1e-3
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(self.format in EXPORT_FORMATS, f"--format must be one of {EXPORT_FORMATS}, got {self.format!r}")
        require(self.quantize in QUANTIZE, f"--quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        require(bool(self.quantize_ops) and set(self.quantize_ops) <= set(QUANTIZE_OPS),
                 f"--quantize-ops must be some of {', '.join(QUANTIZE_OPS)}, got {','.join(self.quantize_ops)!r}")
        require(14 <= self.opset <= 20, f"--opset must be in 14..20 (what the exporter and onnxruntime share), got {self.opset}")
        require(self.tolerance > 0, f"--tolerance must be positive, got {self.tolerance}")


@dataclass(frozen=True)
class DemoConfig:
    """`lrc demo`: the whole pipeline on one GLUE task with the bundled MiniLM backbone.

    The defaults are the best recipe measured for the paper's 4 x 312 student on a 2-core CPU (docs/RESULTS.md,
    "`lrc demo` with its defaults"): the student starts from the fine-tuned teacher cut to its shape
    (`--init auto`) and trains two epochs of task distillation (its two stages), with no general stage. The
    train split is subsampled to `max_train_examples` rows (None = all) and the teacher gets one epoch.
    """

    task: str = "sst2"
    data_dir: Path | None = field(default_factory=default_data_dir)
    work_dir: Path = Path("data/demo")
    max_train_examples: int | None = 4000
    max_length: int = 64
    teacher_epochs: float = 1.0
    teacher_lr: float = 1e-4  # MiniLM-sized backbones fine-tune faster above BERT-base's 5e-5
    # 2: from the cut teacher, 98.0% of the teacher at 2 epochs (3 seeds, last checkpoint) against 96.8% at one
    # epoch; 4 epochs added 0.3 points on one seed for twice the training time (docs/RESULTS.md).
    student_epochs: float = 2.0
    student_layers: int = default_of(TrainConfig, "layers")  # the student's shape is train-student's default
    student_hidden: int = default_of(TrainConfig, "hidden")
    student_heads: int = default_of(TrainConfig, "heads")
    student_intermediate: int = default_of(TrainConfig, "intermediate")
    student_lr: float = default_of(TrainConfig, "learning_rate")
    k: int = default_of(TrainConfig, "k")
    seed: int = 42
    overwrite: bool = False  # redo stages whose artifacts were made with other settings
    device: str = "auto"
    precision: str = "fp32"
    # general: first distil the bundled backbone (not fine-tuned) on unlabeled text, then start the task
    # student from that general student (the paper's "LRC-BERT" row). Off by default: it cost 9.5 of the old
    # demo's 23 minutes, and the task student cut from the fine-tuned teacher beats the one started from the
    # general student by 5 points at one epoch and on all four GLUE tasks at 500 steps (docs/RESULTS.md).
    general: bool = False
    corpus: Path | None = None  # None = the sentences of the GLUE train splits in data_dir (+ QNLI test)
    # A seeded subset of the GLUE sentences, or the first N of --corpus; None = all. 12,800 windows = 800 general
    # steps of 16: the general run the defaults were chosen from.
    general_max_passages: int | None = 12800
    general_epochs: float = 1.0
    general_lr: float = 3e-4

    def __post_init__(self) -> None:
        # The demo's own fields; what each stage makes of them is checked by building every stage's config
        # before the first stage runs (pipeline/apps/demo.py: plan).
        require(self.max_train_examples is None or self.max_train_examples > 0,
                 "--max-train-examples must be positive (or 0 for the whole train split)")
        require(self.general_max_passages is None or self.general_max_passages > 0,
                 "--general-max-passages must be positive (or 0 for the whole corpus)")
        check_whole("--max-length", self.max_length, 8)
        for flag, value in (("--teacher-epochs", self.teacher_epochs), ("--teacher-lr", self.teacher_lr),
                            ("--student-epochs", self.student_epochs), ("--student-lr", self.student_lr),
                            ("--general-epochs", self.general_epochs), ("--general-lr", self.general_lr)):
            check_real(flag, value)
        check_whole("--k", self.k, 0)  # 0 = no negatives (no build-negatives stage)
        check_seed("--seed", self.seed)
        require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML or YAML mapping of option names to values (dashes or underscores)."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise LrcError(f"config file {path} must end in .toml, .yaml or .yml")
    if not path.is_file():
        raise LrcError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        import tomllib

        parse = tomllib.loads
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LrcError(f"reading {path} needs pyyaml: `pip install pyyaml`, or write the file as TOML") from None
        parse = yaml.safe_load
    try:
        data = parse(path.read_text()) or {}
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: one line, not a traceback
        raise LrcError(f"config file {path} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LrcError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
