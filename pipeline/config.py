"""One frozen dataclass per stage, validated on construction. Defaults live only here."""

from __future__ import annotations

import itertools
import math
import numbers
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any
from pathlib import Path

from pipeline.errors import LrcError

DATA_DIR_ENV = "LRC_DATA_DIR"
BUNDLED_BACKBONE = "bundled:all-MiniLM-L6-v2"
BUNDLED_MPNET = "bundled:all-mpnet-base-v2"  # 12 x 768, the optional extra lrc[mpnet]
HIDDEN_DTYPES = ("float16", "float32", "int8")  # Arrow has no bfloat16; int8: pipeline/quant.py
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
CACHE_CHECKS = ("auto", "quick", "full")  # how much of a cache is hashed at open (pipeline/cache_read.py)


def default_data_dir() -> Path | None:
    """The GLUE data root from $LRC_DATA_DIR, or None (then tasks fall back to the hub)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def default_of(config_class: type, name: str) -> Any:
    """The default of one config field. cli.py takes every default from here, so it lives in one place."""
    for f in fields(config_class):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise ValueError(f"{config_class.__name__} has no field {name!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LrcError(message)


# One policy for every number a user gives: checked here, when the config is built, so a bad value is refused
# before any stage starts work (and before any dir is created). NaN fails every comparison and inf is refused
# explicitly, so no non-finite value gets through a range check.


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """phi(i) = round_half_up(i * N / M) for i = 1..M: the last student layer maps to the last teacher layer."""
    n, m = teacher_layers, student_layers
    return [(2 * i * n + m) // (2 * m) for i in range(1, m + 1)]


def _whole(flag: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer option (a count, a size, a length, a step interval) in [minimum, maximum]."""
    # numbers.Integral: a numpy integer from a script is a whole number too; a bool never is
    _require(isinstance(value, numbers.Integral) and not isinstance(value, bool),
             f"{flag} must be a whole number, got {value!r}")
    top = f" and <= {maximum}" if maximum is not None else ""
    _require(value >= minimum and (maximum is None or value <= maximum), f"{flag} must be >= {minimum}{top}, got {value}")


def _real(flag: str, value: Any, low: float = 0.0, high: float = math.inf, low_open: bool = True,
          high_open: bool = True) -> None:
    """A finite number in the interval from low to high (open ends exclude the bound)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        upper = "inf" if high == math.inf else f"{high:g}"
        raise LrcError(f"{flag} must be a finite number in {left}{low:g}, {upper}{right}, got {value!r}")


def _seed(flag: str, value: Any) -> None:
    _whole(flag, value, 0, 2**32 - 1)  # numpy's seed range; torch and random accept it too


def _weights(flag: str, value: Any) -> None:
    """alpha:beta:gamma loss weights: three finite numbers >= 0, not all zero (the step would learn nothing)."""
    _require(isinstance(value, (tuple, list)) and len(value) == 3, f"{flag} must be alpha:beta:gamma, got {value!r}")
    for w in value:
        _real(flag, w, 0.0, low_open=False)
    _require(any(w > 0 for w in value), f"{flag} {':'.join(f'{w:g}' for w in value)} are all 0: nothing would be trained")


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
        _require(bool(self.task), "no task given: pass --task (e.g. --task sst2)")
        if self.max_train_examples is not None:
            _whole("--max-train-examples", self.max_train_examples)
        _seed("--subsample-seed", self.subsample_seed)
        _require(
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
        _whole("--max-length", self.max_length, 8)
        _real("--epochs", self.epochs)
        _whole("--batch-size", self.batch_size)
        _whole("--eval-batch-size", self.eval_batch_size)
        _real("--lr", self.learning_rate)
        _real("--weight-decay", self.weight_decay, low_open=False)
        _real("--max-grad-norm", self.max_grad_norm, low_open=False)  # 0 = no clipping
        _real("--warmup-ratio", self.warmup_ratio, 0.0, 1.0, low_open=False)
        _seed("--seed", self.seed)
        _require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


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
        _require(bool(str(self.source).strip()), "--corpus is empty: pass a text file or a dataset name")
        _require(bool(self.text_column), "--text-column is empty: name the column that holds the passages")
        if self.max_passages is not None:
            _whole("--max-passages", self.max_passages)


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
        _require((self.data is None) != (self.corpus is None),
                 "pass either --task (a task cache) or --corpus (a corpus cache for general distillation), not both")
        _require(self.teacher is not None or self.corpus is not None,
                 "no --teacher given: pass a fine-tuned model dir (see `lrc finetune-teacher`)")
        _whole("--student-layers", self.student_layers)
        _require(
            self.layers is None or (len(self.layers) > 0 and all(isinstance(j, int) and j >= 1 for j in self.layers)),
            f"--layers must be 1-based teacher layer indices, got {self.layers}",
        )
        _require(
            self.layers is None or len(set(self.layers)) == len(self.layers),
            f"--layers has a repeated layer: {self.layers}",
        )
        _whole("--max-length", self.max_length, 8)
        _whole("--batch-size", self.batch_size)
        _whole("--shard-rows", self.shard_rows)
        _require(
            self.hidden_dtype in HIDDEN_DTYPES,
            f"--hidden-dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}",
        )
        _require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def teacher_source(self) -> str:
        """The model to run: --teacher, or for a corpus cache without one the bundled backbone."""
        return str(self.teacher) if self.teacher is not None else BUNDLED_BACKBONE


NEGATIVE_STRATEGIES = ("random", "hard", "mixed")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


@dataclass(frozen=True)
class NegativesConfig:
    """`lrc build-negatives`: cache dir -> negatives.arrow (M candidates per train row)."""

    cache_dir: Path
    k: int = 4
    candidates: int | None = None  # M; None = max(4 * k, 16)
    strategy: str = "random"
    index: str = "auto"
    output: Path | None = None  # None = <cache_dir>/negatives.arrow
    hard_pool: int | None = None  # top list the hard candidates are drawn from; None = 4 * M
    regression_margin: float = 0.5  # hard negatives of a regression task differ by at least this
    exact_max_rows: int = 50_000  # `auto` uses exact search up to this many rows
    recall_sample: int = 1000  # queries checked against exact search for an approximate index
    seed: int = 0
    verify_cache: str = "auto"  # shard hashes checked at open: auto, quick or full (pipeline/cache_read.py)

    def __post_init__(self) -> None:
        _whole("--k", self.k)
        if self.candidates is not None:
            _whole("--candidates", self.candidates)
        _require(
            self.candidates is None or self.candidates >= self.k,
            f"--candidates (M={self.candidates}) must be >= --k ({self.k})",
        )
        if self.hard_pool is not None:
            _whole("--hard-pool", self.hard_pool)
        _whole("exact_max_rows", self.exact_max_rows, 0)
        _whole("recall_sample", self.recall_sample, 0)
        _seed("--seed", self.seed)
        _require(
            self.strategy in NEGATIVE_STRATEGIES,
            f"unknown --strategy {self.strategy!r}: choose one of {', '.join(NEGATIVE_STRATEGIES)}",
        )
        _require(
            self.index in INDEX_TYPES,
            f"unknown --index {self.index!r}: choose one of {', '.join(INDEX_TYPES)}",
        )
        _real("--regression-margin", self.regression_margin, low_open=False)
        _require(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}, got {self.verify_cache!r}")

    @property
    def num_candidates(self) -> int:
        return self.candidates if self.candidates is not None else max(4 * self.k, 16)

    @property
    def output_path(self) -> Path:
        return self.output if self.output is not None else self.cache_dir / "negatives.arrow"


GRANULARITIES = ("flat", "token", "cls")
INTERMEDIATE_LOSSES = ("cos_nce", "hidden_mse", "none")
PROJECTION_INITS = ("auto", "identity", "random")
INIT_SELECTIONS = ("activation", "uniform")  # pipeline/select.py
KEEP_CHOICES = ("best", "last")
# file: K of each row's M candidates in negatives.arrow (random, hard or mixed; the paper's setup); in-batch: K
# of the other anchors of the same batch (uniform random negatives with no file and no extra rows read).
NEGATIVE_SOURCES = ("file", "in-batch")


@dataclass(frozen=True)
class TrainConfig:
    """`lrc train-student`: cache + negatives -> student dir. The teacher is never loaded.

    `intermediate_loss` picks the method: `cos_nce` is LRC-BERT; `hidden_mse` the TinyBERT-style
    baseline; `none` leaves soft + hard only (KD-only; trained in one stage).
    """

    cache_dir: Path
    output_dir: Path
    negatives: Path | None = None  # None = <cache_dir>/negatives.arrow
    negatives_source: str = "file"  # file | in-batch (NEGATIVE_SOURCES)
    # student shape (the paper's 4 x 312) and initialisation
    layers: int = 4
    hidden: int = 312
    heads: int = 12
    intermediate: int = 1200
    # auto: the teacher cut to the student's shape wherever the cache holds the teacher's weights and the shape
    # fits inside the teacher (it beats a random and a general start: docs/RESULTS.md), else random.
    init: str = "auto"  # auto | random | teacher | a model dir
    # Which teacher channels, heads, head dims and FFN neurons a narrower --init teacher keeps: activation (the
    # highest importance scores stage one recorded; evenly spaced where the cache has none) or uniform (evenly
    # spaced). A teacher-width student keeps every channel either way.
    init_selection: str = "activation"
    student_family: str | None = None  # e.g. bert; None = the teacher's family (pipeline/families.py lists them)
    layer_map: tuple[int, ...] | None = None  # teacher layer per student layer; None = round_half_up(i * N / M)
    # losses and schedule
    intermediate_loss: str = "cos_nce"
    granularity: str = "flat"
    k: int = 4
    temperature: float = 1.1
    stage1_fraction: float = 0.8
    stage1_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)  # alpha, beta, gamma
    stage2_weights: tuple[float, float, float] = (1.0, 1.0, 3.0)
    one_stage: bool = False
    perturb_eps: float = 1.0  # 0 turns gradient perturbation off
    # W_i start (auto): identity where the widths match; the kept channels scattered back to the teacher's for a
    # narrower --init teacher; else a general --init's. Or identity, or random.
    projection_init: str = "auto"
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None  # stop after this many steps (the schedule still spans them)
    batch_size: int = 16
    eval_batch_size: int = 128
    # 3e-4: every student result in docs/RESULTS.md was measured at 3e-4 (GLUE tables, demo) or 5e-4 (short
    # budget); 1e-4 was never measured for a student, so it cannot be the default.
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # clip the global gradient norm before each step; 0 = off
    warmup_ratio: float = 0.1
    seed: int = 42
    # running
    eval_every: int | None = None  # also evaluate every N steps (always at each epoch end)
    # best: the student with the best dev metric; last: the final student (dev is then reported, never used to
    # choose, so it stays an unbiased estimate). General distillation (a corpus cache) has no dev: always the last.
    keep: str = "best"
    checkpoint_every: int = 200  # steps between resumable checkpoints
    log_every: int = 10
    num_workers: int | None = None  # DataLoader workers; None = 0 on CPU (the step owns the cores), 2 on CUDA
    device: str = "auto"
    precision: str = "fp32"
    resume: bool = False
    overwrite: bool = False
    verify_cache: str = "auto"  # shard hashes checked at open: auto, quick or full (pipeline/cache_read.py)

    def __post_init__(self) -> None:
        for flag, value in (("--layers", self.layers), ("--hidden", self.hidden), ("--heads", self.heads),
                            ("--intermediate", self.intermediate)):
            _whole(flag, value)
        _require(self.hidden % self.heads == 0,
                 f"student --hidden {self.hidden} is not divisible by --heads {self.heads}: pick sizes where hidden % heads == 0")
        # With --init DIR the checkpoint decides the depth; train-student checks the map against it.
        _require(self.layer_map is None or len(self.layer_map) == self.layers or self.init not in ("auto", "random", "teacher"),
                 f"--layer-map has {len(self.layer_map or ())} entries for a {self.layers}-layer student: give one teacher layer per student layer")
        _require(self.intermediate_loss in INTERMEDIATE_LOSSES,
                 f"unknown --intermediate-loss {self.intermediate_loss!r}: choose one of {', '.join(INTERMEDIATE_LOSSES)}")
        _require(self.granularity in GRANULARITIES,
                 f"unknown --granularity {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        _require(self.init_selection in INIT_SELECTIONS,
                 f"unknown --init-selection {self.init_selection!r}: choose one of {', '.join(INIT_SELECTIONS)}")
        _require(self.projection_init in PROJECTION_INITS,
                 f"unknown --projection-init {self.projection_init!r}: choose one of {', '.join(PROJECTION_INITS)}")
        _whole("--k", self.k, 0)  # 0 = no negatives
        _require(self.negatives_source in NEGATIVE_SOURCES,
                 f"unknown --negatives-source {self.negatives_source!r}: choose one of {', '.join(NEGATIVE_SOURCES)}")
        _require(self.negatives_source != "in-batch" or not self.uses_negatives or self.batch_size > self.k,
                 f"--negatives-source in-batch draws K={self.k} negatives from the other anchors of a batch: "
                 f"--batch-size {self.batch_size} must be > --k")
        _require(self.keep in KEEP_CHOICES, f"unknown --keep {self.keep!r}: choose one of {', '.join(KEEP_CHOICES)}")
        _require(self.layer_map is None or all(isinstance(j, int) and j >= 1 for j in self.layer_map),
                 f"--layer-map must be 1-based teacher layer indices, got {self.layer_map}")
        _real("--temperature", self.temperature)
        _real("--stage1-fraction", self.stage1_fraction, 0.0, 1.0, low_open=False)
        _weights("--stage1-weights", self.stage1_weights)
        _weights("--stage2-weights", self.stage2_weights)
        _real("--perturb-eps", self.perturb_eps, low_open=False)  # 0 = no perturbation
        _real("--epochs", self.epochs)
        if self.max_steps is not None:
            _whole("--max-steps", self.max_steps)
        _whole("--batch-size", self.batch_size)
        _whole("--eval-batch-size", self.eval_batch_size)
        _real("--lr", self.learning_rate)
        _real("--weight-decay", self.weight_decay, low_open=False)
        _real("--max-grad-norm", self.max_grad_norm, low_open=False)  # 0 = no clipping
        _real("--warmup-ratio", self.warmup_ratio, 0.0, 1.0, low_open=False)
        _seed("--seed", self.seed)
        if self.eval_every is not None:
            _whole("--eval-every", self.eval_every)
        _whole("--checkpoint-every", self.checkpoint_every)
        _whole("--log-every", self.log_every)
        if self.num_workers is not None:
            _whole("--num-workers", self.num_workers, 0)
        _require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        _require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: pick one")
        _require(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}, got {self.verify_cache!r}")

    @property
    def negatives_path(self) -> Path:
        return self.negatives if self.negatives is not None else self.cache_dir / "negatives.arrow"

    @property
    def uses_negatives(self) -> bool:
        return self.intermediate_loss == "cos_nce" and self.k > 0


@dataclass(frozen=True)
class SweepConfig:
    """`lrc sweep`: `train-student` over a grid on one cache and one negatives file.

    `grid` keeps the user's key order; each point overrides fields of `base` (a TrainConfig whose
    output_dir is replaced by one run dir per point). `shard_index`/`shard_count` run every
    shard_count-th point, so several machines can share a grid.
    """

    base: TrainConfig
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    output_dir: Path
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        _require(len(self.grid) > 0, "the sweep grid is empty: pass --grid FILE or --set key=v1,v2")
        for key, values in self.grid:
            _require(len(values) > 0, f"sweep key {key!r} has an empty value list: give at least one value")
        _require(self.shard_count > 0 and 0 <= self.shard_index < self.shard_count,
                 f"--shard {self.shard_index}/{self.shard_count} is not valid: use I/N with 0 <= I < N")
        # Every point of the whole grid (every shard's) is a valid train-student config, or the sweep is refused
        # before its first point trains: a bad value found hours into a sweep would cost every point before it.
        keys = [key for key, _ in self.grid]
        for combo in itertools.product(*(values for _, values in self.grid)):
            point = dict(zip(keys, combo))
            try:
                replace(self.base, **point)
            except LrcError as err:
                shown = ", ".join(f"{k}={v}" for k, v in point.items())
                raise LrcError(f"sweep point ({shown}) is refused: {err}") from None
            except TypeError as err:  # a key that is not a TrainConfig field (parse_grid names them first)
                raise LrcError(f"sweep point ({point}) is refused: {err}") from None


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
        _whole("--max-length", self.max_length, 8)
        _whole("--eval-batch-size", self.eval_batch_size)
        _whole("--batch-size", self.batch_size)
        _whole("--seq-length", self.seq_length, 2)
        _whole("--timing-batches", self.timing_batches)
        for size in self.also_batch_sizes:
            _whole("--also-batch-sizes", size)
        _require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


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
    # (43.6 -> 14.6 MB for the 4 x 312 student with "Gather" added; docs/RESULTS.md).
    quantize_ops: tuple[str, ...] = ("MatMul", "Gemm")
    # The export is checked against the PyTorch model on random ids of a shape other than the traced one:
    # logits must agree within this (float32: differences are rounding, ~1e-5; a wrong graph is off by >0.01).
    tolerance: float = 1e-3
    overwrite: bool = False

    def __post_init__(self) -> None:
        _require(self.format in EXPORT_FORMATS, f"--format must be one of {EXPORT_FORMATS}, got {self.format!r}")
        _require(self.quantize in QUANTIZE, f"--quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        _require(bool(self.quantize_ops) and set(self.quantize_ops) <= set(QUANTIZE_OPS),
                 f"--quantize-ops must be some of {', '.join(QUANTIZE_OPS)}, got {','.join(self.quantize_ops)!r}")
        _require(14 <= self.opset <= 20, f"--opset must be in 14..20 (what the exporter and onnxruntime share), got {self.opset}")
        _require(self.tolerance > 0, f"--tolerance must be positive, got {self.tolerance}")


@dataclass(frozen=True)
class DemoConfig:
    """`lrc demo`: the whole pipeline on one GLUE task with the bundled MiniLM backbone.

    The defaults are the best recipe measured for the paper's 4 x 312 student that fits in under half an
    hour on a 2-core CPU (docs/RESULTS.md, "Short budget"): general distillation of the pre-trained backbone on
    unlabeled GLUE sentences, then task distillation from that general student (its two stages). The train
    split is subsampled to `max_train_examples` rows (None = all) and the teacher gets one epoch.
    """

    task: str = "sst2"
    data_dir: Path | None = field(default_factory=default_data_dir)
    work_dir: Path = Path("data/demo")
    max_train_examples: int | None = 4000
    max_length: int = 64
    teacher_epochs: float = 1.0
    teacher_lr: float = 1e-4  # MiniLM-sized backbones fine-tune faster above BERT-base's 5e-5
    student_epochs: float = 4.0
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
    # student from that general student (the paper's "LRC-BERT" row). On by default: at one epoch of 4,000
    # SST-2 rows it gave +4.6 points over a random start (3 seeds), and +1.4 at the demo's 4 epochs (one seed).
    general: bool = True
    corpus: Path | None = None  # None = the sentences of the GLUE train splits in data_dir (+ QNLI test)
    # A seeded subset of the GLUE sentences, or the first N of --corpus; None = all. 12,800 windows = 800 general
    # steps of 16: the general run the defaults were chosen from.
    general_max_passages: int | None = 12800
    general_epochs: float = 1.0
    general_lr: float = 3e-4

    def __post_init__(self) -> None:
        # The demo's own fields; what each stage makes of them is checked by building every stage's config
        # before the first stage runs (pipeline/demo.py: plan).
        _require(self.max_train_examples is None or self.max_train_examples > 0,
                 "--max-train-examples must be positive (or 0 for the whole train split)")
        _require(self.general_max_passages is None or self.general_max_passages > 0,
                 "--general-max-passages must be positive (or 0 for the whole corpus)")
        _whole("--max-length", self.max_length, 8)
        for flag, value in (("--teacher-epochs", self.teacher_epochs), ("--teacher-lr", self.teacher_lr),
                            ("--student-epochs", self.student_epochs), ("--student-lr", self.student_lr),
                            ("--general-epochs", self.general_epochs), ("--general-lr", self.general_lr)):
            _real(flag, value)
        _whole("--k", self.k, 0)  # 0 = no negatives (no build-negatives stage)
        _seed("--seed", self.seed)
        _require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


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
