"""`train-student`'s config and the sweep's over it. Each TrainConfig field is an `option`: its default, its flag
and help, and what a run dir, report.md and a sweep make of it are written here once (pipeline/core/options.py).
The other stages' configs and what they all share are the other pipeline/core/*config.py modules."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.errors import LrcError
from pipeline.core.options import (
    CACHE_CHECKS, check_device_precision, check_optimisation, check_real, check_weights, check_whole, device_option,
    option, precision_option, require,
)

GRANULARITIES = ("flat", "token", "cls")
INTERMEDIATE_LOSSES = ("cos_nce", "hidden_mse", "none")
PROJECTION_INITS = ("auto", "identity", "random")
INIT_SELECTIONS = ("activation", "uniform")  # pipeline/student/select.py
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

    # Where a run reads and writes: a sweep sets them once for every point.
    cache_dir: Path = option(help="A cache dir written by `lrc extract-teacher`.", flags=("--cache",), sweepable=False)
    output_dir: Path = option(help="Where the student (HF format), logs and checkpoints go.",
                              flags=("--output-dir", "-o"), sweepable=False)
    negatives: Path | None = option(None, help="Negatives file from `lrc build-negatives`; default <cache>/negatives.arrow.",
                                    sweepable=False)
    negatives_source: str = option("file", help=(
        "file: K of each row's candidates in the negatives file (random/hard/mixed, the paper's setup); in-batch: K of "
        "the other anchors of the same batch (uniform, no file, no extra rows read; needs --batch-size > --k)."))
    # student shape (the paper's 4 x 312) and initialisation
    layers: int = option(4, help="Student layers (M).")
    hidden: int = option(312, help="Student hidden size.")
    heads: int = option(12, help="Student attention heads (must divide --hidden).")
    intermediate: int = option(1200, help="Student FFN size.")
    # auto: the teacher cut to the student wherever it can be (it beat a random and a general start in every
    # comparison of docs/RESULTS.md); student/run.py's resolve_init makes it concrete before a run records its settings.
    init: str = option("auto", report=11, help=(
        "auto (teacher where the cache holds the teacher's weights and the student is no larger than the teacher, "
        "else random; the log says which and why), random, teacher (the teacher cut to the student: embeddings and the mapped layers, at "
        "--hidden/--heads/--intermediate no larger than the teacher's, keeping the channels, heads, head dims and FFN "
        "neurons --init-selection picks) or a model dir (its depth and width are the student's)."))
    init_selection: str = option("activation", help=(
        "What a narrower --init teacher keeps: activation (the highest importance scores extract-teacher recorded "
        "over the train rows: mean |h| per residual channel, |activation| per FFN neuron, |q_d k_d| and |v_d| per "
        "head dim; evenly spaced where the cache has none) or uniform (evenly spaced). One channel set serves the "
        "whole residual stream; Q is rescaled so the kept dims give the teacher's attention scores."))
    student_family: str | None = option(None, added_at=None, help=(
        "Student family (bert, roberta, deberta-v2, electra, mpnet, distilbert) when it should differ from the "
        "teacher's; it must read the teacher's token ids (same vocabulary; segment embeddings if the teacher reads "
        "segments)."))
    layer_map: tuple[int, ...] | None = option(None, help=(
        "Teacher layer per student layer, e.g. 2,3,5,6; default round_half_up(i*N/M)."))
    # losses and schedule
    intermediate_loss: str = option("cos_nce", report=1, help=(
        "cos_nce (LRC-BERT), hidden_mse (TinyBERT-style baseline) or none (KD-only)."))
    granularity: str = option("flat", report=2, help=(
        "COS-NCE vectors: flat (all real tokens), token (per-token cosine) or cls (first token only; meaningful with "
        "a fine-tuned teacher)."))
    k: int = option(4, flags=("--k",), report=3, help="Negatives per example per step (K); 0 = no negatives.")
    temperature: float = option(1.1, help="Softmax temperature of the soft loss.")
    stage1_fraction: float = option(0.8, report=5, help="Fraction of steps in stage one.")
    stage1_weights: tuple[float, float, float] = option(
        (1.0, 0.0, 0.0), help="alpha:beta:gamma (intermediate:soft:hard) in stage one.")
    stage2_weights: tuple[float, float, float] = option((1.0, 1.0, 3.0), help="alpha:beta:gamma in stage two.")
    one_stage: bool = option(False, flags=("--one-stage",), report=6,
                             help="Train all steps with the stage-two weights (ablation).")
    # Off by default: from the teacher cut (the default start) it cost accuracy on every task measured, and from
    # random weights it changed nothing measurable while doubling the step (docs/RESULTS.md). 1.0 is the paper's.
    perturb_eps: float = option(0.0, report=4, help=(
        "Gradient perturbation size on the embedding output, as in the LRC-BERT paper (which uses it: pass 1.0); "
        "0 = off (the default: it cost accuracy from the teacher cut and doubles each step)."))
    projection_init: str = option("auto", help=(
        "Start of the COS-NCE / MSE projections W_i: auto (identity where student and teacher widths match; for a "
        "narrower --init teacher, each kept channel mapped back to its teacher channel; else the W_i a general "
        "student in --init saved, when they map the same teacher layers; else random), identity or random."))
    # optimisation
    epochs: float = option(3.0, report=9, help="Training epochs (fractions allowed).")
    # stop after this many steps (the schedule still spans them)
    max_steps: int | None = option(None, report=10, help="Train exactly this many steps (overrides --epochs).")
    batch_size: int = option(16, report=8, help=(
        "Training batch size: the global batch of one optimizer step. Under torchrun it is split evenly over the "
        "processes (each takes batch-size / WORLD_SIZE rows; it must divide evenly), so the same value trains the "
        "same way on any number of processes."))
    eval_batch_size: int = option(128, run_only=True)  # no flag: dev batches change no result, only memory
    # 3e-4: every student result in docs/RESULTS.md was measured at 3e-4 (GLUE tables, demo) or 5e-4 (short
    # budget); 1e-4 was never measured for a student, so it cannot be the default.
    learning_rate: float = option(3e-4, flags=("--lr",), report=7, help="Peak learning rate of AdamW.")
    weight_decay: float = option(0.01, help="AdamW weight decay.")
    # added_at: runs recorded before clipping was an option were clipped at 1.0 already
    max_grad_norm: float = option(1.0, added_at=1.0, help=(
        "Clip the global gradient norm (student and projections) to this before each step; 0 = no clipping."))
    warmup_ratio: float = option(0.1, help="Fraction of steps with linear warmup (then linear decay).")
    seed: int = option(42, report=12, help="Random seed (initialisation, data order, negatives draws, dropout).")
    # running
    eval_every: int | None = option(None, run_only=True, help="Also evaluate on dev every N steps (always at epoch ends).")
    # best: the student with the best dev metric; last: the final student (dev is then reported, never used to
    # choose, so it stays an unbiased estimate). General distillation (a corpus cache) has no dev: always the last.
    keep: str = option("best", added_at="best", help=(
        "Which student to keep: best (best dev metric) or last (the final one; dev is only reported). A corpus cache "
        "always keeps the last."))
    checkpoint_every: int = option(200, run_only=True, help="Steps between resumable checkpoints.")
    log_every: int = option(10, run_only=True, help="Steps between log lines in train_log.jsonl.")
    # None = 0 on CPU (the step owns the cores), 2 on CUDA
    num_workers: int | None = option(None, run_only=True, help=(
        "DataLoader worker processes reading the cache; default 0 on CPU, 2 on CUDA."))
    device: str = device_option(run_only=True)  # every command's --device and --precision (options.py)
    precision: str = precision_option()
    resume: bool = option(False, flags=("--resume",), run_only=True, sweepable=False,
                          help="Continue the run in --output-dir from its last checkpoint.")
    overwrite: bool = option(False, run_only=True, sweepable=False, help="Replace a run already in --output-dir.")
    verify_cache: str = option("auto", flags=("--verify-cache",), run_only=True, help=(
        "Shard checks when the cache is opened: auto (full sha256 when the cache fits in half the RAM, else quick), "
        "quick (sizes + sampled hash) or full (every byte; see docs/RELIABILITY.md for the cost)."))

    def __post_init__(self) -> None:
        for flag, value in (("--layers", self.layers), ("--hidden", self.hidden), ("--heads", self.heads),
                            ("--intermediate", self.intermediate)):
            check_whole(flag, value)
        require(self.hidden % self.heads == 0,
                f"student --hidden {self.hidden} is not divisible by --heads {self.heads}: pick sizes where hidden % heads == 0")
        # With --init DIR the checkpoint decides the depth; train-student checks the map against it.
        require(self.layer_map is None or len(self.layer_map) == self.layers or self.init not in ("auto", "random", "teacher"),
                f"--layer-map has {len(self.layer_map or ())} entries for a {self.layers}-layer student: give one teacher layer per student layer")
        require(self.intermediate_loss in INTERMEDIATE_LOSSES,
                f"unknown --intermediate-loss {self.intermediate_loss!r}: choose one of {', '.join(INTERMEDIATE_LOSSES)}")
        require(self.granularity in GRANULARITIES,
                f"unknown --granularity {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        require(self.init_selection in INIT_SELECTIONS,
                f"unknown --init-selection {self.init_selection!r}: choose one of {', '.join(INIT_SELECTIONS)}")
        require(self.projection_init in PROJECTION_INITS,
                f"unknown --projection-init {self.projection_init!r}: choose one of {', '.join(PROJECTION_INITS)}")
        check_whole("--k", self.k, 0)  # 0 = no negatives
        require(self.negatives_source in NEGATIVE_SOURCES,
                f"unknown --negatives-source {self.negatives_source!r}: choose one of {', '.join(NEGATIVE_SOURCES)}")
        require(self.negatives_source != "in-batch" or not self.uses_negatives or self.batch_size > self.k,
                f"--negatives-source in-batch draws K={self.k} negatives from the other anchors of a batch: "
                f"--batch-size {self.batch_size} must be > --k")
        require(self.keep in KEEP_CHOICES, f"unknown --keep {self.keep!r}: choose one of {', '.join(KEEP_CHOICES)}")
        require(self.layer_map is None or all(isinstance(j, int) and j >= 1 for j in self.layer_map),
                f"--layer-map must be 1-based teacher layer indices, got {self.layer_map}")
        check_real("--temperature", self.temperature)
        check_real("--stage1-fraction", self.stage1_fraction, 0.0, 1.0, low_open=False)
        check_weights("--stage1-weights", self.stage1_weights)
        check_weights("--stage2-weights", self.stage2_weights)
        check_real("--perturb-eps", self.perturb_eps, low_open=False)  # 0 = no perturbation
        check_optimisation(self)
        if self.max_steps is not None:
            check_whole("--max-steps", self.max_steps)
        if self.eval_every is not None:
            check_whole("--eval-every", self.eval_every)
        check_whole("--checkpoint-every", self.checkpoint_every)
        check_whole("--log-every", self.log_every)
        if self.num_workers is not None:
            check_whole("--num-workers", self.num_workers, 0)
        check_device_precision(self)
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: pick one")
        require(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}, got {self.verify_cache!r}")

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
        require(len(self.grid) > 0, "the sweep grid is empty: pass --grid FILE or --set key=v1,v2")
        for key, values in self.grid:
            require(len(values) > 0, f"sweep key {key!r} has an empty value list: give at least one value")
        require(self.shard_count > 0 and 0 <= self.shard_index < self.shard_count,
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
