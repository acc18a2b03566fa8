"""`lrc` command line: each command turns its options into a config and calls one pipeline function."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pipeline.config import (
    BUNDLED_BACKBONE, DATA_DIR_ENV, DataConfig, DemoConfig, EvaluateConfig, ExtractConfig, FinetuneConfig,
    NegativesConfig, SweepConfig, TrainConfig, default_of, load_config_file,
)
from pipeline.errors import LrcError

app = typer.Typer(
    help="LRC-BERT distillation as an offline pipeline: run the teacher once, cache its features, "
    "train students from the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends in one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.runtime import setup_logging

        setup_logging(bool(kwargs.get("verbose")))
        try:
            return command(*args, **kwargs)
        except LrcError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE`: its values become the defaults, so flags on the command line override them."""
    if value is None:
        return None
    try:
        values = load_config_file(value)
    except LrcError as err:
        raise typer.BadParameter(str(err)) from None
    known = {p.name for p in ctx.command.params if p.name not in ("config", "verbose")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{value} sets unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=_load_config,
    help="TOML or YAML file of option values (names as the flags, - or _); flags given here override it.",
)

# Options shared by every command that reads task data.
TaskOpt = typer.Option(..., "--task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, wnli.")
DataDirOpt = typer.Option(
    None, "--data-dir", envvar=DATA_DIR_ENV,
    help=f"A glue_data/ folder in the standard GLUE layout (or set ${DATA_DIR_ENV}). Unset: load from the Hugging Face hub.",
)
TrainFileOpt = typer.Option(None, help="Your own train file (.csv, .tsv, .jsonl, .parquet) instead of GLUE's.")
DevFileOpt = typer.Option(None, help="Your own dev file (same formats) instead of GLUE's.")
TextColOpt = typer.Option(None, help="Column of the first text in --train-file/--dev-file (default: the task's).")
PairColOpt = typer.Option(None, help="Column of the second text, for pair tasks (default: the task's).")
LabelColOpt = typer.Option(None, help="Label column in --train-file/--dev-file (default: label).")
MaxTrainOpt = typer.Option(None, help="Use a seeded random subset of this many train examples (default: all).")
SubsampleSeedOpt = typer.Option(0, help="Seed of the --max-train-examples subset.")
DeviceOpt = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu or cuda.")
PrecisionOpt = typer.Option("fp32", help="fp32, or bf16 autocast (faster on recent CPUs and GPUs).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging.")


def _data(task: str, data_dir: Optional[Path], train_file: Optional[Path], dev_file: Optional[Path],
          text_column: Optional[str], text_pair_column: Optional[str], label_column: Optional[str],
          max_train_examples: Optional[int], subsample_seed: int) -> DataConfig:
    return DataConfig(
        task=task, data_dir=data_dir, train_file=train_file, dev_file=dev_file, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column,
        max_train_examples=max_train_examples, subsample_seed=subsample_seed,
    )


@app.command("finetune-teacher")
@_friendly
def finetune_teacher(
    task: str = TaskOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the teacher (HF format) is written."),
    backbone: str = typer.Option(BUNDLED_BACKBONE, help="Local model dir or hub name; default: the bundled all-MiniLM-L6-v2."),
    max_length: int = typer.Option(128, help="Truncate inputs to this many tokens."),
    epochs: float = typer.Option(3.0, help="Training epochs (fractions allowed)."),
    batch_size: int = typer.Option(32, help="Training batch size."),
    lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate of AdamW."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay (not on biases and LayerNorm)."),
    warmup_ratio: float = typer.Option(0.1, help="Fraction of steps with linear warmup."),
    seed: int = typer.Option(42, help="Random seed (data order, head initialisation)."),
    overwrite: bool = typer.Option(False, help="Replace a teacher already in --output-dir."),
    data_dir: Optional[Path] = DataDirOpt, train_file: Optional[Path] = TrainFileOpt, dev_file: Optional[Path] = DevFileOpt,
    text_column: Optional[str] = TextColOpt, text_pair_column: Optional[str] = PairColOpt,
    label_column: Optional[str] = LabelColOpt, max_train_examples: Optional[int] = MaxTrainOpt,
    subsample_seed: int = SubsampleSeedOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Fine-tune a backbone on a task: writes a teacher dir with a classification head and its dev metric."""
    from pipeline.finetune import finetune_teacher as run

    data = _data(task, data_dir, train_file, dev_file, text_column, text_pair_column, label_column,
                 max_train_examples, subsample_seed)
    info = run(FinetuneConfig(
        data=data, output_dir=output_dir, backbone=backbone, max_length=max_length, epochs=epochs,
        batch_size=batch_size, learning_rate=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        seed=seed, device=device, precision=precision, overwrite=overwrite,
    ))
    typer.echo(f"teacher: {output_dir}  dev {json.dumps(info['dev_metrics'])}")


def _parse_layers(value: Optional[str]) -> tuple[Optional[tuple[int, ...]], bool]:
    if value is None:
        return None, False
    if value.strip().lower() == "all":
        return None, True
    try:
        return tuple(int(x) for x in value.split(",") if x.strip()), False
    except ValueError:
        raise LrcError(f"--layers must be 'all' or comma-separated layer numbers like 2,3,5,6; got {value!r}") from None


@app.command("extract-teacher")
@_friendly
def extract_teacher(
    teacher: Path = typer.Option(..., "--teacher", help="Fine-tuned teacher dir (HF format, with a classification head)."),
    task: str = TaskOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Cache dir to create (or resume)."),
    student_layers: int = typer.Option(4, help="Store the teacher layers a student of this depth maps to."),
    layers: Optional[str] = typer.Option(None, help="Explicit teacher layers, e.g. 2,3,5,6, or 'all'; overrides --student-layers."),
    max_length: int = typer.Option(128, help="Truncate inputs to this many tokens."),
    batch_size: int = typer.Option(64, help="Teacher batch size."),
    shard_rows: int = typer.Option(4096, help="Rows per Arrow shard (the unit of resumption)."),
    hidden_dtype: str = typer.Option("float16", help="Storage dtype of hidden states: float16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace a cache already in --output-dir."),
    data_dir: Optional[Path] = DataDirOpt, train_file: Optional[Path] = TrainFileOpt, dev_file: Optional[Path] = DevFileOpt,
    text_column: Optional[str] = TextColOpt, text_pair_column: Optional[str] = PairColOpt,
    label_column: Optional[str] = LabelColOpt, max_train_examples: Optional[int] = MaxTrainOpt,
    subsample_seed: int = SubsampleSeedOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Run the teacher once over a task and write hidden states, logits and pooled vectors to an Arrow cache."""
    from pipeline.extract import extract_teacher as run

    explicit, all_layers = _parse_layers(layers)
    data = _data(task, data_dir, train_file, dev_file, text_column, text_pair_column, label_column,
                 max_train_examples, subsample_seed)
    manifest = run(ExtractConfig(
        teacher=teacher, data=data, output_dir=output_dir, student_layers=student_layers, layers=explicit,
        all_layers=all_layers, max_length=max_length, batch_size=batch_size, shard_rows=shard_rows,
        hidden_dtype=hidden_dtype, device=device, precision=precision, overwrite=overwrite,
    ))
    typer.echo(f"cache: {output_dir}  layers {manifest['layers']}  rows "
               + ", ".join(f"{s}={v['rows']}" for s, v in manifest["splits"].items()))


@app.command("inspect-cache")
@_friendly
def inspect_cache(
    cache_dir: Path = typer.Argument(..., help="A cache dir written by `lrc extract-teacher`."),
    verify: bool = typer.Option(False, "--verify", help="Also check every shard's sha256 (reads every byte)."),
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Print what a cache holds (teacher, task, rows, layers, sizes); --verify checks every checksum."""
    from pipeline.cache import describe, open_cache

    cache = open_cache(cache_dir, verify=verify)
    typer.echo(describe(cache))
    if verify:
        typer.echo("verify: every shard matches its checksum")


@app.command("build-negatives")
@_friendly
def build_negatives(
    cache_dir: Path = typer.Option(..., "--cache", help="A cache dir written by `lrc extract-teacher`."),
    k: int = typer.Option(4, "--k", help="Negatives per example used in each training step (K)."),
    candidates: Optional[int] = typer.Option(None, help="Candidates stored per example (M >= K); default max(4K, 16)."),
    strategy: str = typer.Option("random", help="random (uniform, the paper's), hard (nearest other-label neighbours) or mixed."),
    index: str = typer.Option("auto", help="auto (exact when small, approximate when large), flat, ivf or hnsw."),
    output: Optional[Path] = typer.Option(None, help="Output file; default <cache>/negatives.arrow."),
    hard_pool: Optional[int] = typer.Option(None, help="Width of the nearest-neighbour list hard candidates are drawn from; default 4M."),
    regression_margin: float = typer.Option(0.5, help="Regression tasks: hard negatives differ in label by at least this."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same file."),
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Sample M candidate negatives per training row with FAISS over the cached pooled teacher vectors."""
    from pipeline.negatives import build_negatives as run

    path = run(NegativesConfig(
        cache_dir=cache_dir, k=k, candidates=candidates, strategy=strategy, index=index, output=output,
        hard_pool=hard_pool, regression_margin=regression_margin, seed=seed,
    ))
    typer.echo(f"negatives: {path}")


def _parse_weights(value: str, name: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise LrcError(f"{name} must be alpha:beta:gamma, e.g. 1:1:3; got {value!r}")
    return parts  # type: ignore[return-value]


@app.command("train-student")
@_friendly
def train_student(
    cache_dir: Path = typer.Option(..., "--cache", help="A cache dir written by `lrc extract-teacher`."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the student (HF format), logs and checkpoints go."),
    negatives: Optional[Path] = typer.Option(None, help="Negatives file from `lrc build-negatives`; default <cache>/negatives.arrow."),
    layers: int = typer.Option(4, help="Student layers (M)."),
    hidden: int = typer.Option(312, help="Student hidden size."),
    heads: int = typer.Option(12, help="Student attention heads (must divide --hidden)."),
    intermediate: int = typer.Option(1200, help="Student FFN size."),
    init: str = typer.Option("random", help="random, teacher (copy embeddings + mapped layers; needs --hidden = teacher width) or a model dir."),
    student_family: Optional[str] = typer.Option(default_of(TrainConfig, "student_family"), help="Student family (bert, roberta, deberta-v2, electra, mpnet, distilbert) when it should differ from the teacher's; it must read the teacher's token ids (same vocabulary; segment embeddings if the teacher reads segments)."),
    layer_map: Optional[str] = typer.Option(None, help="Teacher layer per student layer, e.g. 2,3,5,6; default round_half_up(i*N/M)."),
    intermediate_loss: str = typer.Option("cos_nce", help="cos_nce (LRC-BERT), hidden_mse (TinyBERT-style baseline) or none (KD-only)."),
    granularity: str = typer.Option("flat", help="COS-NCE vectors: flat (all real tokens), token (per-token cosine) or cls (first token; collapsed a random student's [CLS] in docs/RESULTS.md)."),
    k: int = typer.Option(4, "--k", help="Negatives per example per step (K); 0 = no negatives."),
    temperature: float = typer.Option(1.1, help="Softmax temperature of the soft loss."),
    stage1_fraction: float = typer.Option(0.8, help="Fraction of steps in stage one."),
    stage1_weights: str = typer.Option("1:0:0", help="alpha:beta:gamma (intermediate:soft:hard) in stage one."),
    stage2_weights: str = typer.Option("1:1:3", help="alpha:beta:gamma in stage two."),
    one_stage: bool = typer.Option(False, "--one-stage", help="Train all steps with the stage-two weights (ablation)."),
    perturb_eps: float = typer.Option(1.0, help="Gradient perturbation size on the embedding output; 0 = off."),
    projection_init: str = typer.Option("auto", help="Start of the COS-NCE / MSE projections W_i: auto (identity where student and teacher widths match, else random), identity or random."),
    epochs: float = typer.Option(3.0, help="Training epochs (fractions allowed)."),
    max_steps: Optional[int] = typer.Option(None, help="Train exactly this many steps (overrides --epochs)."),
    batch_size: int = typer.Option(16, help="Training batch size."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate of AdamW."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    warmup_ratio: float = typer.Option(0.1, help="Fraction of steps with linear warmup (then linear decay)."),
    seed: int = typer.Option(42, help="Random seed (initialisation, data order, negatives draws, dropout)."),
    eval_every: Optional[int] = typer.Option(None, help="Also evaluate on dev every N steps (always at epoch ends)."),
    checkpoint_every: int = typer.Option(200, help="Steps between resumable checkpoints."),
    log_every: int = typer.Option(10, help="Steps between log lines in train_log.jsonl."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader worker processes reading the cache; default 0 on CPU, 2 on CUDA."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output-dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a run already in --output-dir."),
    device: str = DeviceOpt, precision: str = PrecisionOpt, config: Optional[Path] = ConfigOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train a student from the cache with LRC-BERT (COS-NCE + soft + hard, two stages, perturbation); no teacher."""
    from pipeline.train import train_student as run

    mapping, _ = _parse_layers(layer_map) if layer_map else (None, False)
    summary = run(TrainConfig(
        cache_dir=cache_dir, output_dir=output_dir, negatives=negatives, layers=layers, hidden=hidden, heads=heads,
        intermediate=intermediate, init=init, student_family=student_family, layer_map=mapping, intermediate_loss=intermediate_loss,
        granularity=granularity, k=k, temperature=temperature, stage1_fraction=stage1_fraction,
        stage1_weights=_parse_weights(stage1_weights, "--stage1-weights"),
        stage2_weights=_parse_weights(stage2_weights, "--stage2-weights"), one_stage=one_stage,
        perturb_eps=perturb_eps, projection_init=projection_init, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, learning_rate=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, seed=seed,
        eval_every=eval_every, checkpoint_every=checkpoint_every, log_every=log_every, num_workers=num_workers,
        device=device, precision=precision, resume=resume, overwrite=overwrite,
    ))
    typer.echo(f"student: {output_dir}  best dev {json.dumps(summary['best'])}  teacher dev {json.dumps(summary['teacher_dev'])}")


@app.command("evaluate")
@_friendly
def evaluate(
    model_dir: Path = typer.Argument(..., help="A teacher or student dir (HF format, with a classification head)."),
    task: str = TaskOpt,
    compare: Optional[Path] = typer.Option(None, help="A second model dir (e.g. the teacher) to put side by side, with ratios."),
    max_length: int = typer.Option(128, help="Truncate dev inputs to this many tokens."),
    batch_size: int = typer.Option(32, help="Batch size of the latency/throughput measurement."),
    seq_length: int = typer.Option(128, help="Sequence length of the latency/throughput measurement."),
    timing_batches: int = typer.Option(10, help="Timed batches (after 2 warm-up batches); the median is reported."),
    output: Optional[Path] = typer.Option(None, help="Also write the results as JSON to this file."),
    data_dir: Optional[Path] = DataDirOpt,
    dev_file: Optional[Path] = typer.Option(None, help="Evaluate on this file (.csv, .tsv, .jsonl, .parquet) instead of the dev split."),
    text_column: Optional[str] = TextColOpt, text_pair_column: Optional[str] = PairColOpt,
    label_column: Optional[str] = LabelColOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Dev metric, parameters, size on disk and measured latency/throughput; --compare puts two models side by side."""
    from pipeline.evaluate import evaluate as run, format_table

    data = _data(task, data_dir, None, dev_file, text_column, text_pair_column, label_column, None, 0)
    results = run(EvaluateConfig(
        model_dir=model_dir, data=data, compare=compare, max_length=max_length, batch_size=batch_size,
        seq_length=seq_length, timing_batches=timing_batches, device=device, precision=precision, output=output,
    ))
    typer.echo(format_table(results))


@app.command("demo")
@_friendly
def demo(
    task: str = typer.Option("sst2", "--task", help="GLUE task to run the demo on."),
    work_dir: Path = typer.Option(Path("data/demo"), help="Where the teacher, cache, negatives and student go."),
    max_train_examples: int = typer.Option(4000, help="Subsample the train split to this many rows so the demo fits in ~15 min on 2 CPU cores; 0 = all rows."),
    max_length: int = typer.Option(64, help="Truncate inputs to this many tokens."),
    teacher_epochs: float = typer.Option(1.0, help="Epochs of teacher fine-tuning."),
    teacher_lr: float = typer.Option(1e-4, help="Peak learning rate of teacher fine-tuning."),
    student_epochs: float = typer.Option(4.0, help="Epochs of student training."),
    student_lr: float = typer.Option(3e-4, help="Peak learning rate of the student."),
    k: int = typer.Option(4, "--k", help="Negatives per example."),
    seed: int = typer.Option(42, help="Random seed of every stage."),
    data_dir: Optional[Path] = DataDirOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Run the whole pipeline on a real GLUE task with the bundled all-MiniLM-L6-v2 and compare teacher and student."""
    from pipeline.demo import render, run_demo

    outcome = run_demo(DemoConfig(
        task=task, data_dir=data_dir, work_dir=work_dir, max_train_examples=max_train_examples or None,
        max_length=max_length, teacher_epochs=teacher_epochs, teacher_lr=teacher_lr, student_epochs=student_epochs,
        student_lr=student_lr,
        k=k, seed=seed, device=device, precision=precision,
    ))
    typer.echo(render(outcome))


@app.command("sweep")
@_friendly
def sweep(
    cache_dir: Path = typer.Option(..., "--cache", help="The cache every run trains from (the teacher is never opened)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where run-NNN-*/ dirs and results.csv/.md go."),
    grid: Optional[Path] = typer.Option(None, help="TOML/YAML file: train-student setting -> list of values."),
    set_: list[str] = typer.Option([], "--set", help="key=v1,v2 (repeatable; overrides the grid file's key), e.g. --set lr=1e-4,3e-4."),
    shard: str = typer.Option("0/1", help="I/N: run only points with index % N == I (spread a sweep over N machines)."),
    base: Optional[Path] = typer.Option(None, help="TOML/YAML file of train-student settings shared by every run."),
    verbose: bool = VerboseOpt,
) -> None:
    """Rerun train-student over a grid on one cache and negatives file; writes a results table (CSV + markdown)."""
    from dataclasses import replace

    from pipeline.sweep import parse_grid, parse_shard, run_sweep

    # A base file is a grid with one value per key: the same names, checks and type coercion.
    shared = {key: values[0] for key, values in parse_grid([], base)} if base is not None else {}
    base_config = replace(TrainConfig(cache_dir=cache_dir, output_dir=output_dir), **shared)
    index, count = parse_shard(shard)
    table = run_sweep(SweepConfig(base=base_config, grid=parse_grid(set_, grid), output_dir=output_dir,
                                  shard_index=index, shard_count=count))
    typer.echo(f"results: {table}")


@app.command("report")
@_friendly
def report(
    run_dir: Path = typer.Argument(..., help="A train-student output dir."),
    verbose: bool = VerboseOpt,
) -> None:
    """(Re)write report.md and the loss / dev-metric plots of a training run."""
    from pipeline.report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


def main() -> None:  # pragma: no cover - `python cli.py ...`
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
