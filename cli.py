"""`lrc` command line: each command turns its options into a config and calls one pipeline function."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.apps.command_line import (
    CONFIG_PARAM, VERBOSE_PARAM, ConfigOpt, TextFields, VerboseOpt, build_config, config_options, friendly, say,
    signature,
)
from pipeline.core import options
from pipeline.core.apps_config import EXPORT_FORMATS, QUANTIZE, DemoConfig, EvaluateConfig, ExportConfig
from pipeline.core.config import DATA_DIR_ENV, DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.options import default_of
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig, FinetuneConfig
from pipeline.core.train_config import SweepConfig, TrainConfig

# Every default below is read from the config dataclasses (one source): F("epochs") is FinetuneConfig's. The
# options of train-student and build-negatives are generated from their configs' fields (`config_options`).
F, X, T, E, D, O = (functools.partial(default_of, c) for c in (FinetuneConfig, ExtractConfig, TrainConfig,
                                                               EvaluateConfig, DemoConfig, ExportConfig))

app = typer.Typer(
    help="LRC-BERT distillation as an offline pipeline: run the teacher once, cache its features, "
    "train students from the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


TrustRemoteCodeOpt = typer.Option(
    default_of(ExtractConfig, "trust_remote_code"), "--trust-remote-code",
    help="Run Python code shipped inside the model dir (its config's auto_map). It runs with your permissions: "
    "pass this only for a model whose code you have read.",
)
AllowTaskMismatchOpt = typer.Option(
    default_of(ExtractConfig, "allow_task_mismatch"), "--allow-task-mismatch",
    help="Use a model whose teacher_info.json / training_summary.json records another task (a deliberate transfer).",
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
SubsampleSeedOpt = typer.Option(default_of(DataConfig, "subsample_seed"), help="Seed of the --max-train-examples subset.")
# every command's --device and --precision say what train-student's say
DeviceOpt = typer.Option(T("device"), help=options.help_of(TrainConfig, "device"))
PrecisionOpt = typer.Option(T("precision"), help=options.help_of(TrainConfig, "precision"))


def _data(task: str, data_dir: Optional[Path], train_file: Optional[Path], dev_file: Optional[Path],
          text_column: Optional[str], text_pair_column: Optional[str], label_column: Optional[str],
          max_train_examples: Optional[int], subsample_seed: int) -> DataConfig:
    return DataConfig(
        task=task, data_dir=data_dir, train_file=train_file, dev_file=dev_file, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column,
        max_train_examples=max_train_examples, subsample_seed=subsample_seed,
    )


# The data options (DataConfig's, but --task) and the shared ones end every command that has them, as --help
# has always listed them.
DATA_OPTIONS = tuple(f.name for f, _ in options.command_line(DataConfig) if f.name != "task")
SHARED_LAST = ("device", "precision", "allow_task_mismatch", "trust_remote_code")


@app.command("finetune-teacher")
@friendly
@signature(*config_options(FinetuneConfig, {}, last=DATA_OPTIONS + SHARED_LAST), CONFIG_PARAM, VERBOSE_PARAM)
def finetune_teacher(**values: Any) -> None:
    """Fine-tune a backbone on a task: writes a teacher dir with a classification head and its dev metric."""
    from pipeline.teacher.finetune import finetune_teacher as run

    info = run(build_config(FinetuneConfig, values, {}))
    typer.echo(f"teacher: {values['output_dir']}  dev {json.dumps(info['dev_metrics'])}")


def _parse_layers(value: Optional[str]) -> tuple[Optional[tuple[int, ...]], bool]:
    if value is None:
        return None, False
    if value.strip().lower() == "all":
        return None, True
    try:
        return tuple(int(x) for x in value.split(",") if x.strip()), False
    except ValueError:
        raise LrcError(f"--layers must be 'all' or comma-separated layer numbers like 2,3,5,6; got {value!r}") from None


# --layers is text: all or 2,3,5,6 (`_parse_layers`; `all` sets all_layers instead).
_EXTRACT_TEXT: TextFields = {"layers": (None, lambda text: _parse_layers(text)[0])}


@app.command("extract-teacher")
@friendly
@signature(*config_options(ExtractConfig, _EXTRACT_TEXT, last=DATA_OPTIONS + SHARED_LAST), CONFIG_PARAM, VERBOSE_PARAM)
def extract_teacher(**values: Any) -> None:
    """Run the teacher once over a task and write hidden states, logits and pooled vectors to an Arrow cache."""
    from pipeline.teacher.extract import extract_teacher as run

    all_layers = _parse_layers(values["layers"])[1]
    if (values["task"] is None) == (values["source"] is None):  # source: --corpus
        raise LrcError("pass --task (a task cache from a fine-tuned teacher) or --corpus (unlabeled text for general "
                       "distillation), exactly one of them")
    task_only = {"--train-file": "train_file", "--dev-file": "dev_file", "--text-pair-column": "text_pair_column",
                 "--label-column": "label_column", "--max-train-examples": "max_train_examples"}
    given = [flag for flag, name in task_only.items() if values[name] is not None]
    if values["source"] is not None and given:
        raise LrcError(f"{', '.join(given)} belong(s) to task caches: with --corpus use --text-column and --max-passages")
    manifest = run(build_config(ExtractConfig, {**values, "all_layers": all_layers}, _EXTRACT_TEXT))
    say(f"cache: {values['output_dir']}  layers {manifest['layers']}  rows "
        + ", ".join(f"{s}={v['rows']}" for s, v in manifest["splits"].items()))


@app.command("inspect-cache")
@friendly
def inspect_cache(
    cache_dir: Path = typer.Argument(..., help="A cache dir written by `lrc extract-teacher`."),
    verify: bool = typer.Option(False, "--verify", help="Also check the sha256 of every shard and every other file the manifest records (reads every byte)."),
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Print what a cache holds (teacher, task, rows, layers, sizes); --verify checks every checksum."""
    from pipeline.cache.describe import describe
    from pipeline.cache.reader import open_cache

    cache = open_cache(cache_dir, check="full" if verify else "quick")
    typer.echo(describe(cache))
    if verify:
        typer.echo("verify: every shard matches its checksum, and so does every other file the manifest records "
                   "(tokenizer, teacher weights, importance scores); the manifest matches its fingerprint")


@app.command("build-negatives")
@friendly
@signature(*config_options(NegativesConfig, {}), CONFIG_PARAM, VERBOSE_PARAM)
def build_negatives(**values: Any) -> None:
    """Sample M candidate negatives per training row with FAISS over the cached pooled teacher vectors."""
    from pipeline.negatives.build import build_negatives as run

    typer.echo(f"negatives: {run(build_config(NegativesConfig, values, {}))}")


def _weights_text(weights: tuple[float, ...]) -> str:
    return ":".join(f"{w:g}" for w in weights)


def _parse_weights(value: str, name: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise LrcError(f"{name} must be alpha:beta:gamma, e.g. 1:1:3; got {value!r}")
    return parts  # type: ignore[return-value]


# Typed as text on the command line and parsed here (pipeline/apps/command_line.py `build_config`).
_TRAIN_TEXT: TextFields = {
    "layer_map": (None, lambda text: _parse_layers(text)[0] if text else None),
    "stage1_weights": (_weights_text(T("stage1_weights")), lambda text: _parse_weights(text, "--stage1-weights")),
    "stage2_weights": (_weights_text(T("stage2_weights")), lambda text: _parse_weights(text, "--stage2-weights")),
}


@app.command("train-student")
@friendly
@signature(*config_options(TrainConfig, _TRAIN_TEXT, last=("device", "precision")), CONFIG_PARAM, VERBOSE_PARAM)
def train_student(**values: Any) -> None:
    """Train a student from the cache with LRC-BERT (COS-NCE + soft + hard, two stages, perturbation); no teacher."""
    from pipeline.student.train import train_student as run

    output_dir = values["output_dir"]
    summary = run(build_config(TrainConfig, values, _TRAIN_TEXT))
    if summary.get("kind") == "general":
        say(f"general student: {output_dir}  (the last of {summary['steps']} steps; start task distillation "
                   f"with --init {output_dir})")
        return
    say(f"student: {output_dir}  {summary['kept']} dev {json.dumps(summary['best'])}  teacher dev {json.dumps(summary['teacher_dev'])}")


@app.command("evaluate")
@friendly
def evaluate(
    model_dir: Path = typer.Argument(..., help="A teacher or student dir (HF format, with a classification head), or an `lrc export` dir."),
    task: str = TaskOpt,
    compare: Optional[Path] = typer.Option(None, help="A second model dir (e.g. the teacher) to put side by side, with ratios; latencies are timed interleaved on the same inputs."),
    max_length: int = typer.Option(E("max_length"), help="Truncate dev inputs to this many tokens."),
    batch_size: int = typer.Option(E("batch_size"), help="Batch size of the latency/throughput measurement."),
    also_batch_sizes: str = typer.Option(",".join(map(str, E("also_batch_sizes"))), help="Also time the latency at these batch sizes (comma-separated; empty: none)."),
    seq_length: int = typer.Option(E("seq_length"), help="Sequence length of the latency/throughput measurement."),
    timing_batches: int = typer.Option(E("timing_batches"), help="Timed batches per batch size (after 2 warm-up batches); the median is reported."),
    output: Optional[Path] = typer.Option(None, help="Also write the results as JSON to this file."),
    data_dir: Optional[Path] = DataDirOpt,
    dev_file: Optional[Path] = typer.Option(None, help="Evaluate on this file (.csv, .tsv, .jsonl, .parquet) instead of the dev split."),
    text_column: Optional[str] = TextColOpt, text_pair_column: Optional[str] = PairColOpt,
    label_column: Optional[str] = LabelColOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    allow_task_mismatch: bool = AllowTaskMismatchOpt, trust_remote_code: bool = TrustRemoteCodeOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Dev metric, parameters, size on disk and measured latency/throughput; --compare puts two models side by side."""
    from pipeline.apps.evaluate import evaluate as run, format_table

    data = _data(task, data_dir, None, dev_file, text_column, text_pair_column, label_column, None, 0)
    results = run(EvaluateConfig(
        model_dir=model_dir, data=data, compare=compare, max_length=max_length, batch_size=batch_size,
        also_batch_sizes=_parse_batch_sizes(also_batch_sizes),
        seq_length=seq_length, timing_batches=timing_batches, device=device, precision=precision, output=output,
        allow_task_mismatch=allow_task_mismatch, trust_remote_code=trust_remote_code,
    ))
    typer.echo(format_table(results))


def _parse_batch_sizes(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise LrcError(f"--also-batch-sizes must be comma-separated integers like 1 or 1,8; got {value!r}") from None


@app.command("export")
@friendly
def export(
    source: Path = typer.Argument(..., help="A train-student output dir (or a teacher dir) with a classification head."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the exported model dir is written."),
    fmt: str = typer.Option(O("format"), "--format", help=f"Export format: {', '.join(EXPORT_FORMATS)}."),
    quantize: str = typer.Option(O("quantize"), help=f"{' or '.join(QUANTIZE)}: int8 = dynamic int8 weights "
                                 "(onnxruntime) of the --quantize-ops, activations quantised per batch."),
    quantize_ops: str = typer.Option(",".join(O("quantize_ops")), help="With --quantize int8: the op types whose "
                                     "weights become int8 (comma-separated; add Gather to store the embeddings as "
                                     "int8 too: a third of the bytes)."),
    opset: int = typer.Option(O("opset"), help="ONNX opset of the graph."),
    tolerance: float = typer.Option(O("tolerance"), help="Largest |logit difference| to PyTorch the float32 graph "
                                    "may show on a check batch; a larger one refuses the export."),
    overwrite: bool = typer.Option(O("overwrite"), help="Replace an export already in --output-dir."),
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Export a student to ONNX (needs onnx and onnxruntime: pip install "lrc\\[onnx]"); `lrc evaluate` then takes the output dir."""
    from pipeline.apps.export import export_model

    ops = tuple(x.strip() for x in quantize_ops.split(",") if x.strip())
    info = export_model(ExportConfig(source=source, output_dir=output_dir, format=fmt, quantize=quantize,
                                     quantize_ops=ops, opset=opset, tolerance=tolerance, overwrite=overwrite))
    typer.echo(f"export: {output_dir}  {info['quantize']}  {info['model_bytes'] / 1e6:.1f} MB (source "
               f"{info['source_bytes'] / 1e6:.1f} MB)  max logit diff {info['max_abs_logit_diff']:.2g}  "
               f"{info['export_seconds']} s")


@app.command("demo")
@friendly
def demo(
    task: str = typer.Option(D("task"), "--task", help="GLUE task to run the demo on."),
    work_dir: Path = typer.Option(D("work_dir"), help="Where the teacher, cache, negatives and student go."),
    max_train_examples: int = typer.Option(D("max_train_examples"), help="Subsample the train split to this many rows so the demo fits in minutes on 2 CPU cores; 0 = all rows."),
    max_length: int = typer.Option(D("max_length"), help="Truncate inputs to this many tokens."),
    teacher_epochs: float = typer.Option(D("teacher_epochs"), help="Epochs of teacher fine-tuning."),
    teacher_lr: float = typer.Option(D("teacher_lr"), help="Peak learning rate of teacher fine-tuning."),
    student_epochs: float = typer.Option(D("student_epochs"), help="Epochs of student training."),
    student_lr: float = typer.Option(D("student_lr"), help="Peak learning rate of the student."),
    k: int = typer.Option(D("k"), "--k", help="Negatives per example."),
    seed: int = typer.Option(D("seed"), help="Random seed of every stage."),
    overwrite: bool = typer.Option(D("overwrite"), help="Redo every stage, replacing what --work-dir holds (without it: artifacts made with the same settings are reused, others refused)."),
    general: bool = typer.Option(D("general"), "--general/--no-general", help="First distil the bundled backbone on unlabeled text (general distillation), then start the task student from it (the paper's recipe, about 10 more minutes on 2 CPU cores). Off by default: the task student then starts from the fine-tuned teacher cut to its shape, which measured better (docs/RESULTS.md)."),
    corpus: Optional[Path] = typer.Option(D("corpus"), help="--general: unlabeled text file (one passage per line); default: the GLUE train sentences in --data-dir and QNLI test."),
    general_max_passages: int = typer.Option(D("general_max_passages"), help="--general: passages of the corpus to use (a seeded subset of the GLUE sentences, or the first N of --corpus); 0 = all."),
    general_epochs: float = typer.Option(D("general_epochs"), help="--general: epochs of general distillation."),
    general_lr: float = typer.Option(D("general_lr"), help="--general: peak learning rate of general distillation."),
    data_dir: Optional[Path] = DataDirOpt, device: str = DeviceOpt, precision: str = PrecisionOpt,
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Run the whole pipeline on a real GLUE task with the bundled all-MiniLM-L6-v2 and compare teacher and student."""
    from pipeline.apps.demo import render, run_demo

    outcome = run_demo(DemoConfig(
        task=task, data_dir=data_dir, work_dir=work_dir, max_train_examples=max_train_examples or None,
        max_length=max_length, teacher_epochs=teacher_epochs, teacher_lr=teacher_lr, student_epochs=student_epochs,
        student_lr=student_lr,
        k=k, seed=seed, overwrite=overwrite, device=device, precision=precision, general=general, corpus=corpus,
        general_max_passages=general_max_passages or None, general_epochs=general_epochs, general_lr=general_lr,
    ))
    typer.echo(render(outcome))


@app.command("sweep")
@friendly
def sweep(
    cache_dir: Path = typer.Option(..., "--cache", help="The cache every run trains from (the teacher is never opened)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where run-NNN-*/ dirs and results.csv/.md go."),
    grid: Optional[Path] = typer.Option(None, help="TOML/YAML file: train-student setting -> list of values."),
    set_: list[str] = typer.Option([], "--set", help="key=v1,v2 (repeatable; overrides the grid file's key), e.g. --set lr=1e-4,3e-4."),
    shard: str = typer.Option("0/1", help="I/N: run only points with index % N == I (spread a sweep over N machines)."),
    base: Optional[Path] = typer.Option(None, help="TOML/YAML file of train-student settings shared by every run."),
    overwrite: bool = typer.Option(T("overwrite"), help="Retrain every point, replacing what its run dir holds (without it: finished points are reused, unfinished ones resumed, and a point holding other settings fails)."),
    config: Optional[Path] = ConfigOpt, verbose: bool = VerboseOpt,
) -> None:
    """Rerun train-student over a grid on one cache and negatives file; writes a results table (CSV + markdown)."""
    from dataclasses import replace

    from pipeline.student.sweep import parse_shard, run_sweep
    from pipeline.student.sweep_grid import parse_grid

    # A base file is a grid with one value per key: the same names, checks and type coercion.
    shared = {key: values[0] for key, values in parse_grid([], base)} if base is not None else {}
    base_config = replace(TrainConfig(cache_dir=cache_dir, output_dir=output_dir, overwrite=overwrite), **shared)
    index, count = parse_shard(shard)
    table = run_sweep(SweepConfig(base=base_config, grid=parse_grid(set_, grid), output_dir=output_dir,
                                  shard_index=index, shard_count=count))
    say(f"results: {table}")


@app.command("report")
@friendly
def report(
    run_dir: Path = typer.Argument(..., help="A train-student output dir."),
    verbose: bool = VerboseOpt,
) -> None:
    """(Re)write report.md and the loss / dev-metric plots of a training run."""
    from pipeline.student.report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


def main() -> None:  # pragma: no cover - `python cli.py ...`
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
