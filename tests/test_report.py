"""The run report: losses.png, dev_metric.png and report.md from a real short run, and the log helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.report import (
    DEV_PLOT, LOSS_PLOT, epoch_ends, loss_names, plot_dev, plot_losses, read_log, stage_boundary, write_report,
)
from pipeline.student.train import train_student

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (stage 2 from the 4th step: floor(0.8 * 4) = 3 stage-1 steps), every step logged."""
    root = tmp_path_factory.mktemp("report")
    cache = root / "cache"
    shutil.copytree(tiny_cache, cache)
    build_negatives(NegativesConfig(cache_dir=cache, k=2))
    out = root / "run"
    train_student(TrainConfig(cache_dir=cache, output_dir=out, layers=2, hidden=32, heads=2, intermediate=64, k=2,
                              max_steps=4, batch_size=16, num_workers=0, device="cpu", checkpoint_every=2,
                              eval_every=2, log_every=1))
    return out


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_report_of_a_real_run(run_dir: Path) -> None:
    summary = json.loads((run_dir / "training_summary.json").read_text())
    path = write_report(run_dir)

    assert path == run_dir / "report.md"
    assert _is_png(run_dir / LOSS_PLOT) and _is_png(run_dir / DEV_PLOT)
    text = path.read_text()
    assert "(losses.png)" in text and "(dev_metric.png)" in text and text.count("![") == 2
    best, teacher = summary["best"]["accuracy"], summary["teacher_dev"]["accuracy"]
    assert f"| best dev accuracy | **{best:.4f}** at step {summary['best']['step']} |" in text
    assert f"| teacher dev accuracy | {teacher:.4f} |" in text
    assert f"{100 * best / teacher:.1f} %" in text
    assert "| student | 2 layers x 32 hidden, 2 heads, 64 intermediate;" in text
    assert f"{summary['parameters']:,} parameters" in text
    assert "| 4 steps," in text.replace("training | ", "| ")
    for setting in ("intermediate_loss | `cos_nce`", "granularity | `flat`", "| k | `2`", "perturb_eps | `0.0`",
                    "stage1_fraction | `0.8`", "one_stage | `false`", "learning_rate | `0.0003`",
                    "batch_size | `16`", "init | `random`"):
        assert setting in text, setting


def test_loss_plot_marks_the_stage_switch_of_a_real_run(run_dir: Path, tmp_path: Path) -> None:
    steps, evals = read_log(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["stage"] for r in steps] == [1, 1, 1, 2]
    assert stage_boundary(steps) == 4
    assert loss_names(steps) == ["cos_nce", "soft", "hard"]

    figure = plot_losses(steps, "sst2", tmp_path / "l.png")
    axes = figure.axes[0]
    labels = [line.get_label() for line in axes.lines]
    assert labels == ["cos_nce", "soft", "hard", "loss (weighted total)", "stage 2 from step 4"]
    boundary = axes.lines[-1]
    assert list(boundary.get_xdata()) == [4, 4] and boundary.get_linestyle() == "--"
    assert list(axes.lines[0].get_ydata()) == [r["cos_nce"] for r in steps]
    assert axes.get_xlabel() and axes.get_ylabel() and "sst2" in axes.get_title()

    figure = plot_dev(evals, [], "accuracy", {"accuracy": 0.75}, "sst2", tmp_path / "d.png")
    teacher_line = [line for line in figure.axes[0].lines if line.get_label().startswith("teacher")]
    assert len(teacher_line) == 1 and list(teacher_line[0].get_ydata()) == [0.75, 0.75]


def test_one_stage_run_without_dev_split_still_gets_a_report(run_dir: Path, tmp_path: Path) -> None:
    summary = json.loads((run_dir / "training_summary.json").read_text())
    summary |= {"best": None, "teacher_dev": None, "percent_of_teacher": None}
    summary["config"] |= {"one_stage": True}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    records = [{"soft": 0.5 / s, "hard": 0.7, "loss": 2.6, "step": s, "epoch": 0, "stage": 2, "lr": 1e-4,
                "samples_per_s": 10.0} for s in (1, 2, 3)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    text = write_report(tmp_path).read_text()
    assert _is_png(tmp_path / LOSS_PLOT) and _is_png(tmp_path / DEV_PLOT)
    assert "no dev evaluation" in text and "| teacher dev accuracy | not available |" in text
    assert stage_boundary(records) is None
    figure = plot_losses(records, "sst2", tmp_path / "again.png")
    assert [line.get_label() for line in figure.axes[0].lines] == ["soft", "hard", "loss (weighted total)"]


def test_epoch_ends_follow_the_loops_epoch_numbering() -> None:
    # As the loop writes them (13 batches per epoch): step records carry the running epoch; the eval at an
    # epoch's end carries the next epoch; a mid-epoch eval (eval_every) and the final max_steps eval do not.
    records = [{"step": s, "epoch": 0} for s in range(1, 14)] + [{"step": 13, "epoch": 1, "eval": {}}]
    records += [{"step": 20, "epoch": 1}, {"step": 20, "epoch": 1, "eval": {}}]
    records += [{"step": 26, "epoch": 1}, {"step": 26, "epoch": 2, "eval": {}}]
    records += [{"step": 30, "epoch": 2}, {"step": 30, "epoch": 2, "eval": {}}]
    assert epoch_ends(records) == [13, 26]
    assert epoch_ends([{"step": 13, "epoch": 1, "eval": {}}]) == [13]  # nothing logged before the first eval
    assert epoch_ends([]) == []


def test_unfinished_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LrcError, match="training_summary.json") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)


def test_a_log_cut_short_is_reported_on_and_a_damaged_one_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    """A run killed (or out of disk) mid-append leaves half a JSON line: `lrc report` used to end in a
    JSONDecodeError traceback."""
    from typer.testing import CliRunner

    from cli import app

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    log_path = run / "train_log.jsonl"
    whole = log_path.read_text()
    log_path.write_text(whole + '{"step": 5, "loss": 0.12')  # the last line cut short
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    steps, _ = read_log(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    lines = whole.splitlines()
    log_path.write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[1:]]) + "\n")  # damage mid-file
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("error:") and "train_log.jsonl:2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    log_path.write_text(whole)
    (run / "training_summary.json").write_text('{"task": "sst2", ')
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "training_summary.json is unreadable" in result.stderr
