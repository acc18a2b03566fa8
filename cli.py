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
from pipeline.core.apps_config import DemoConfig, EvaluateConfig, ExportConfig
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.options import default_of
from pipeline.core.teacher_config import ExtractConfig, FinetuneConfig
from pipeline.core.train_config import SweepConfig, TrainConfig

# Each command's options are generated from its config's fields (`config_options`; docs/DESIGN.md §4): a new option
# is its field's `option(...)`. What is left here is how a command's text is parsed and checks across its options.
T, E, O = (functools.partial(default_of, c) for c in (TrainConfig, EvaluateConfig, ExportConfig))

app = typer.Typer(
    help="LRC-BERT distillation as an offline pipeline: run the teacher once, cache its features, "
    "train students from the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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
    """Train a student from the cache with LRC-BERT (COS-NCE + soft + hard, two stages; --perturb-eps 1 adds the paper's perturbation); no teacher."""
    from pipeline.student.train import train_student as run

    output_dir = values["output_dir"]
    summary = run(build_config(TrainConfig, values, _TRAIN_TEXT))
    if summary.get("kind") == "general":
        say(f"general student: {output_dir}  (the last of {summary['steps']} steps; start task distillation "
                   f"with --init {output_dir})")
        return
    say(f"student: {output_dir}  {summary['kept']} dev {json.dumps(summary['best'])}  teacher dev {json.dumps(summary['teacher_dev'])}")


def _parse_batch_sizes(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise LrcError(f"--also-batch-sizes must be comma-separated integers like 1 or 1,8; got {value!r}") from None


_EVALUATE_TEXT: TextFields = {"also_batch_sizes": (",".join(map(str, E("also_batch_sizes"))), _parse_batch_sizes)}


@app.command("evaluate")
@friendly
@signature(*config_options(EvaluateConfig, _EVALUATE_TEXT, last=DATA_OPTIONS + SHARED_LAST), CONFIG_PARAM, VERBOSE_PARAM)
def evaluate(**values: Any) -> None:
    """Dev metric, parameters, size on disk and measured latency/throughput; --compare puts two models side by side."""
    from pipeline.apps.evaluate import evaluate as run, format_table

    typer.echo(format_table(run(build_config(EvaluateConfig, values, _EVALUATE_TEXT))))


_EXPORT_TEXT: TextFields = {"quantize_ops": (",".join(O("quantize_ops")),
                                             lambda text: tuple(x.strip() for x in text.split(",") if x.strip()))}


@app.command("export")
@friendly
@signature(*config_options(ExportConfig, _EXPORT_TEXT), CONFIG_PARAM, VERBOSE_PARAM)
def export(**values: Any) -> None:
    """Export a student to ONNX (needs onnx and onnxruntime: pip install "lrc\\[onnx]"); `lrc evaluate` then takes the output dir."""
    from pipeline.apps.export import export_model

    info = export_model(build_config(ExportConfig, values, _EXPORT_TEXT))
    typer.echo(f"export: {values['output_dir']}  {info['quantize']}  {info['model_bytes'] / 1e6:.1f} MB (source "
               f"{info['source_bytes'] / 1e6:.1f} MB)  max logit diff {info['max_abs_logit_diff']:.2g}  "
               f"{info['export_seconds']} s")


@app.command("demo")
@friendly
@signature(*config_options(DemoConfig, {}, last=("data_dir", "device", "precision")), CONFIG_PARAM, VERBOSE_PARAM)
def demo(**values: Any) -> None:
    """Run the whole pipeline on a real GLUE task with the bundled all-MiniLM-L6-v2 and compare teacher and student."""
    from pipeline.apps.demo import render, run_demo

    # 0 on the command line: the whole train split / corpus (None in DemoConfig)
    zero_is_all = {name: values[name] or None for name in ("max_train_examples", "general_max_passages")}
    typer.echo(render(run_demo(build_config(DemoConfig, {**values, **zero_is_all}, {}))))


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
