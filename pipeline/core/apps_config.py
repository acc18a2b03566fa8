"""The configs of the tools over the whole pipeline (pipeline/apps/): `lrc evaluate`, `lrc export` and `lrc demo`.
Their fields are `option`s: cli.py generates each command's options from them (docs/DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import DataConfig, data_dir_option
from pipeline.core.options import (
    allow_task_mismatch_option, check_device_precision, check_real, check_seed, check_whole, default_of, device_option,
    nested, option, precision_option, require, trust_remote_code_option,
)
from pipeline.core.train_config import TrainConfig


@dataclass(frozen=True)
class EvaluateConfig:
    """`lrc evaluate`: a model dir's dev metric, size and speed; optionally beside another model."""

    model_dir: Path = option(argument=True, help=(
        "A teacher or student dir (HF format, with a classification head), or an `lrc export` dir."))
    # the dev split only: evaluate offers no train options
    data: DataConfig = nested(DataConfig, exclude=("train_file", "max_train_examples", "subsample_seed"), helps={
        "dev_file": "Evaluate on this file (.csv, .tsv, .jsonl, .parquet) instead of the dev split."})
    compare: Path | None = option(None, help=(
        "A second model dir (e.g. the teacher) to put side by side, with ratios; latencies are timed interleaved on "
        "the same inputs."))
    max_length: int = option(128, help="Truncate dev inputs to this many tokens.")
    eval_batch_size: int = 128
    # latency/throughput are measured on batches of this shape
    batch_size: int = option(32, help="Batch size of the latency/throughput measurement.")
    # latency also timed at these (1: one request at a time)
    also_batch_sizes: tuple[int, ...] = option((1,), help=(
        "Also time the latency at these batch sizes (comma-separated; empty: none)."))
    seq_length: int = option(128, help="Sequence length of the latency/throughput measurement.")
    timing_batches: int = option(10, help=(
        "Timed batches per batch size (after 2 warm-up batches); the median is reported."))
    device: str = device_option()
    precision: str = precision_option()
    output: Path | None = option(None, help="Also write the results as JSON to this file.")
    allow_task_mismatch: bool = allow_task_mismatch_option()
    trust_remote_code: bool = trust_remote_code_option()

    def __post_init__(self) -> None:
        check_whole("--max-length", self.max_length, 8)
        check_whole("--eval-batch-size", self.eval_batch_size)
        check_whole("--batch-size", self.batch_size)
        check_whole("--seq-length", self.seq_length, 2)
        check_whole("--timing-batches", self.timing_batches)
        for size in self.also_batch_sizes:
            check_whole("--also-batch-sizes", size)
        check_device_precision(self)


EXPORT_FORMATS = ("onnx",)
QUANTIZE = ("none", "int8")
QUANTIZE_OPS = ("MatMul", "Gemm", "Gather")  # what dynamic int8 may quantise in an exported encoder


@dataclass(frozen=True)
class ExportConfig:
    """`lrc export`: a student (or teacher) dir -> an ONNX model dir, optionally with int8 weights."""

    source: Path = option(argument=True, help=(
        "A train-student output dir (or a teacher dir) with a classification head."))
    output_dir: Path = option(flags=("--output-dir", "-o"), help="Where the exported model dir is written.")
    format: str = option("onnx", flags=("--format",), help=f"Export format: {', '.join(EXPORT_FORMATS)}.")
    quantize: str = option("none", help=(
        f"{' or '.join(QUANTIZE)}: int8 = dynamic int8 weights (onnxruntime) of the --quantize-ops, activations "
        "quantised per batch."))
    # Dynamic int8 quantises the weights of these ops; activations are quantised per batch at run time. The
    # word embeddings (a Gather) stay float32 by default: a lookup costs no time, and int8 buys only bytes there
    # (sizes in docs/PERFORMANCE.md, accuracy in docs/RESULTS.md).
    quantize_ops: tuple[str, ...] = option(("MatMul", "Gemm"), help=(
        "With --quantize int8: the op types whose weights become int8 (comma-separated; add Gather to store the "
        "embeddings as int8 too: a third of the bytes)."))
    # 17: LayerNormalization is one op from 17 on, and onnxruntime releases of the last years all run it.
    opset: int = option(17, help="ONNX opset of the graph.")
    # The export is checked against the PyTorch model on random ids of a shape other than the traced one:
    # logits must agree within this (float32: differences are rounding, ~1e-5; a wrong graph is off by >0.01).
    tolerance: float = option(1e-3, help=(
        "Largest |logit difference| to PyTorch the float32 graph may show on a check batch; a larger one refuses "
        "the export."))
    overwrite: bool = option(False, help="Replace an export already in --output-dir.")

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

    task: str = option("sst2", flags=("--task",), help="GLUE task to run the demo on.")
    data_dir: Path | None = data_dir_option()
    work_dir: Path = option(Path("data/demo"), help="Where the teacher, cache, negatives and student go.")
    # the command line's 0 is None here (cli.py)
    max_train_examples: int | None = option(4000, help=(
        "Subsample the train split to this many rows so the demo fits in minutes on 2 CPU cores; 0 = all rows."))
    max_length: int = option(64, help="Truncate inputs to this many tokens.")
    teacher_epochs: float = option(1.0, help="Epochs of teacher fine-tuning.")
    # MiniLM-sized backbones fine-tune faster above BERT-base's 5e-5
    teacher_lr: float = option(1e-4, help="Peak learning rate of teacher fine-tuning.")
    # 2: from the cut teacher, 98.0% of the teacher at 2 epochs (3 seeds, last checkpoint) against 96.8% at one
    # epoch; 4 epochs added 0.3 points on one seed for twice the training time (docs/RESULTS.md).
    student_epochs: float = option(2.0, help="Epochs of student training.")
    student_layers: int = default_of(TrainConfig, "layers")  # the student's shape is train-student's default
    student_hidden: int = default_of(TrainConfig, "hidden")
    student_heads: int = default_of(TrainConfig, "heads")
    student_intermediate: int = default_of(TrainConfig, "intermediate")
    student_lr: float = option(default_of(TrainConfig, "learning_rate"), help="Peak learning rate of the student.")
    k: int = option(default_of(TrainConfig, "k"), flags=("--k",), help="Negatives per example.")
    seed: int = option(42, help="Random seed of every stage.")
    # redo stages whose artifacts were made with other settings
    overwrite: bool = option(False, help=(
        "Redo every stage, replacing what --work-dir holds (without it: artifacts made with the same settings are "
        "reused, others refused)."))
    device: str = device_option()
    precision: str = precision_option()
    # general: first distil the bundled backbone (not fine-tuned) on unlabeled text, then start the task
    # student from that general student (the paper's "LRC-BERT" row). Off by default: it cost 9.5 of the old
    # demo's 23 minutes, and the task student cut from the fine-tuned teacher beats the one started from the
    # general student by 5 points at one epoch and on all four GLUE tasks at 500 steps (docs/RESULTS.md).
    general: bool = option(False, flags=("--general/--no-general",), help=(
        "First distil the bundled backbone on unlabeled text (general distillation), then start the task student "
        "from it (the paper's recipe, about 10 more minutes on 2 CPU cores). Off by default: the task student then "
        "starts from the fine-tuned teacher cut to its shape, which measured better (docs/RESULTS.md)."))
    # None = the sentences of the GLUE train splits in data_dir (+ QNLI test)
    corpus: Path | None = option(None, help=(
        "--general: unlabeled text file (one passage per line); default: the GLUE train sentences in --data-dir and "
        "QNLI test."))
    # A seeded subset of the GLUE sentences, or the first N of --corpus; None = all. 12,800 windows = 800 general
    # steps of 16: the general run the defaults were chosen from. The command line's 0 is None.
    general_max_passages: int | None = option(12800, help=(
        "--general: passages of the corpus to use (a seeded subset of the GLUE sentences, or the first N of "
        "--corpus); 0 = all."))
    general_epochs: float = option(1.0, help="--general: epochs of general distillation.")
    general_lr: float = option(3e-4, help="--general: peak learning rate of general distillation.")

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
        check_device_precision(self)
