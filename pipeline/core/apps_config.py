"""The configs of the tools over the whole pipeline (pipeline/apps/): `lrc evaluate`, `lrc export` and `lrc demo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import DataConfig, default_data_dir
from pipeline.core.options import DEVICES, PRECISIONS, check_real, check_seed, check_whole, default_of, require
from pipeline.core.train_config import TrainConfig


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
