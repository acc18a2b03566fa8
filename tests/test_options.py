"""One place per option: a TrainConfig field declared with `option(...)` (pipeline/core/options.py) reaches
train-student's --help, flags and --config files, the sweep's keys, the settings a run dir is compared by (with
the added-at default standing in for runs recorded before it) and report.md, with no edit anywhere else."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
import pipeline.core.teacher_config
import pipeline.core.train_config
import pipeline.student.report
import pipeline.student.sweep_grid
import pipeline.student.train
import pipeline.teacher.extract
import pipeline.teacher.finetune
from conftest import assert_refused
from pipeline.core import options
from pipeline.core.config import DataConfig
from pipeline.core.options import nested, option
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig, FinetuneConfig
from pipeline.core.train_config import TrainConfig
from pipeline.student.run_dir import RUN_CONFIG, comparable_settings, previous_run

C, O = Path("cache"), Path("out")


@pytest.fixture()
def extended(monkeypatch: pytest.MonkeyPatch):
    """TrainConfig plus two options, swapped in where lrc looks the class up; cli.py rebuilt from it (its
    commands are made at import), and rebuilt from the real TrainConfig afterwards."""
    new = dataclasses.make_dataclass("TrainConfig", [
        ("warmup_shape", str, option("linear", added_at="linear", report=13,
                                     help="Shape of the warmup: linear or cosine.")),
        ("progress_bar", bool, option(False, run_only=True, sweepable=False, help="Draw a progress bar.")),
    ], bases=(TrainConfig,), frozen=True)
    for module in (pipeline.core.train_config, pipeline.student.sweep_grid, pipeline.student.report):
        monkeypatch.setattr(module, "TrainConfig", new)
    yield new, importlib.reload(cli)
    monkeypatch.undo()
    importlib.reload(cli)


def test_every_train_option_is_declared_with_option() -> None:
    """A plain field would be compared on reuse with no added-at default and missing from --help: declare it."""
    assert [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata] == []


def test_the_derived_lists_are_the_ones_written_out_before() -> None:
    assert options.run_only(TrainConfig) == {"resume", "overwrite", "num_workers", "device", "log_every", "eval_every",
                                             "eval_batch_size", "checkpoint_every", "verify_cache"}
    assert options.added_at(TrainConfig) == {"keep": "best", "max_grad_norm": 1.0, "student_family": None}
    assert options.report_keys(TrainConfig) == ("intermediate_loss", "granularity", "k", "perturb_eps",
                                                "stage1_fraction", "one_stage", "learning_rate", "batch_size",
                                                "epochs", "max_steps", "init", "seed")
    assert options.fixed_keys(TrainConfig) == ("cache_dir", "output_dir", "negatives", "resume", "overwrite")
    assert options.flag_aliases(TrainConfig) == {"lr": "learning_rate"}


def test_a_new_option_reaches_help_flags_and_config_files(extended, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    new, cli_module = extended
    runner = CliRunner()
    result = runner.invoke(cli_module.app, ["train-student", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("--warmup-shape", "Shape of the warmup: linear or cosine.", "[default: linear]", "--progress-bar",
                 "Draw a progress bar."):
        assert text in result.stdout, text

    seen = []
    monkeypatch.setattr(pipeline.student.train, "train_student",
                        lambda config: seen.append(config) or {"kind": "general", "steps": 1})
    base = ["train-student", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "o")]
    result = runner.invoke(cli_module.app, [*base, "--warmup-shape", "cosine", "--progress-bar", "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert type(seen[-1]) is new and seen[-1].warmup_shape == "cosine" and seen[-1].progress_bar
    assert seen[-1].learning_rate == 1e-4
    settings = tmp_path / "train.toml"
    settings.write_text('warmup-shape = "cosine"\n')
    assert runner.invoke(cli_module.app, [*base, "--config", str(settings)]).exit_code == 0
    assert seen[-1].warmup_shape == "cosine" and not seen[-1].progress_bar


def test_a_new_option_reaches_the_sweep(extended) -> None:
    new, _ = extended
    assert pipeline.student.sweep_grid.sweep_keys()["warmup_shape"] is str
    assert pipeline.student.sweep_grid.parse_grid(["warmup-shape=linear,cosine"], None) == (
        ("warmup_shape", ("linear", "cosine")),)
    assert_refused(lambda: pipeline.student.sweep_grid.parse_grid(["progress_bar=true"], None),
                   "a sweep cannot vary 'progress_bar'")


def test_a_new_option_is_compared_on_reuse_and_older_runs_match_its_added_at_value(extended, tmp_path: Path) -> None:
    new, _ = extended
    assert "warmup_shape" not in comparable_settings(new(cache_dir=C, output_dir=O))  # at its added-at value
    assert comparable_settings(new(cache_dir=C, output_dir=O, warmup_shape="cosine"))["warmup_shape"] == "cosine"
    assert "progress_bar" not in comparable_settings(new(cache_dir=C, output_dir=O, progress_bar=True))  # run-only
    # a run recorded before the option existed: its train_config.json does not name it
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_CONFIG).write_text(json.dumps(comparable_settings(TrainConfig(cache_dir=C, output_dir=out))))
    assert previous_run(new(cache_dir=C, output_dir=out, progress_bar=True), "fp").changed == []
    changed = previous_run(new(cache_dir=C, output_dir=out, warmup_shape="cosine"), "fp").changed
    assert [(c.key, c.requested) for c in changed] == [("warmup_shape", "cosine")]


def test_a_new_option_reaches_the_report(extended) -> None:
    new, _ = extended
    config = json.loads(json.dumps(dataclasses.asdict(new(cache_dir=C, output_dir=O, warmup_shape="cosine")),
                                   default=str))
    summary = {"task": "sst2", "kind": "general", "config": config, "main_metric": "accuracy", "best": None,
               "teacher_dev": None, "parameters": 1000, "layer_map": [2, 3, 5, 6], "steps": 4, "epochs": 0,
               "train_seconds": 1.0, "samples_per_s": 10.0}
    text = pipeline.student.report.render_markdown(summary, "run")
    assert text.index("| seed | `42` |") < text.index("| warmup_shape | `cosine` |")
    assert "progress_bar" not in text


# ------------------------------------------------ the other commands: their configs, and the configs they nest


@pytest.fixture()
def extended_teacher(monkeypatch: pytest.MonkeyPatch):
    """FinetuneConfig, ExtractConfig and the configs they nest (DataConfig, CorpusConfig) each plus one option, cli.py
    rebuilt from them: a field's `option(...)` alone must reach the command (options.nested flattens the nested ones)."""
    data = dataclasses.make_dataclass("DataConfig", [
        ("min_words", int, option(0, help="Drop examples with fewer words."))], bases=(DataConfig,), frozen=True)
    corpus = dataclasses.make_dataclass("CorpusConfig", [
        ("min_chars", int, option(0, help="Skip passages shorter than this."))], bases=(CorpusConfig,), frozen=True)
    finetune = dataclasses.make_dataclass("FinetuneConfig", [
        ("data", DataConfig, nested(data)),
        ("label_smoothing", float, option(0.0, help="Label smoothing of the cross-entropy."))],
        bases=(FinetuneConfig,), frozen=True)
    extract = dataclasses.make_dataclass("ExtractConfig", [
        ("data", DataConfig, nested(data, when="task")), ("corpus", CorpusConfig, nested(corpus, None, when="source")),
        ("pool_every", int, option(1, help="Store the pooled vector of every Nth row."))],
        bases=(ExtractConfig,), frozen=True)
    monkeypatch.setattr(pipeline.core.teacher_config, "FinetuneConfig", finetune)
    monkeypatch.setattr(pipeline.core.teacher_config, "ExtractConfig", extract)
    yield finetune, extract, importlib.reload(cli)
    monkeypatch.undo()
    importlib.reload(cli)


def test_a_new_option_of_a_teacher_command_or_its_nested_config_reaches_help_and_config(
        extended_teacher, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    finetune, extract, cli_module = extended_teacher
    runner = CliRunner()
    for command, texts in (("finetune-teacher", ("--label-smoothing", "Label smoothing of the cross-entropy.",
                                                 "--min-words", "Drop examples with fewer words.")),
                           ("extract-teacher", ("--pool-every", "Store the pooled vector of every Nth row.",
                                                "--min-words", "--min-chars", "Skip passages shorter than this."))):
        result = runner.invoke(cli_module.app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for text in texts:
            assert text in result.stdout, (command, text)

    seen = []
    monkeypatch.setattr(pipeline.teacher.finetune, "finetune_teacher", lambda c: seen.append(c) or {"dev_metrics": {}})
    monkeypatch.setattr(pipeline.teacher.extract, "extract_teacher",
                        lambda c: seen.append(c) or {"layers": [1], "splits": {}})
    out = ["-o", str(tmp_path / "o")]
    result = runner.invoke(cli_module.app, ["finetune-teacher", "--task", "sst2", *out, "--label-smoothing", "0.1",
                                            "--min-words", "3", "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert type(seen[-1]) is finetune and seen[-1].label_smoothing == 0.1 and seen[-1].learning_rate == 1e-4
    assert seen[-1].data.min_words == 3 and seen[-1].data.task == "sst2"
    settings = tmp_path / "extract.toml"
    settings.write_text('pool-every = 4\nmin_words = 2\n')  # a flag's name or the field's
    result = runner.invoke(cli_module.app, ["extract-teacher", "--teacher", "t", "--task", "sst2", *out,
                                            "--config", str(settings)])
    assert result.exit_code == 0, result.output
    assert type(seen[-1]) is extract and seen[-1].pool_every == 4 and seen[-1].data.min_words == 2
    assert seen[-1].corpus is None
    result = runner.invoke(cli_module.app, ["extract-teacher", "--corpus", "c.txt", *out, "--min-chars", "20"])
    assert result.exit_code == 0, result.output
    assert seen[-1].data is None and seen[-1].corpus.min_chars == 20 and seen[-1].corpus.text_column == "text"
