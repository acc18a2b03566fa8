"""A finished training run -> losses.png, dev_metric.png and report.md in its run dir.

Reads only what `train-student` wrote (train_log.jsonl, training_summary.json), so it can be rerun
on any old run dir. Figures are drawn with matplotlib's object API (no pyplot), which needs no
display and leaves the caller's backend alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core import options
from pipeline.core.errors import LrcError
from pipeline.core.train_config import TrainConfig
from pipeline.student.run_dir import METRICS_LOG, SUMMARY

log = logging.getLogger(__name__)

LOSS_PLOT = "losses.png"
DEV_PLOT = "dev_metric.png"
REPORT = "report.md"
# Keys of a step record that are not loss terms.
_STEP_META = ("step", "epoch", "stage", "lr", "grad_norm", "samples_per_s", "loss")


# --------------------------------------------------------------------------- reading the log


def read_log(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, eval records) of train_log.jsonl, in file order; empty lists when there is no log.

    The log is appended line by line, so a kill or a full disk can cut its last line short: that line is
    left out with a warning (a resumed run drops it the same way). A bad line anywhere else is damage, not
    an interrupted write: one-line LrcError naming it."""
    path = run_dir / METRICS_LOG
    if not path.is_file():
        return [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LrcError(f"{path} is unreadable ({type(err).__name__}): rerun the training with --overwrite") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), (int, float))
        except ValueError:
            ok = False
        if ok:
            records.append(record)
        elif number == len(lines):
            log.warning("%s:%d is cut short (a write was interrupted): left out of the report", path, number)
        else:
            raise LrcError(f"{path}:{number} is not a log record ({line[:60]!r}): the log was damaged or edited; "
                           "remove that line or rerun the training with --overwrite")
    return [r for r in records if "eval" not in r], [r for r in records if "eval" in r]


def loss_names(steps: list[dict[str, Any]]) -> list[str]:
    """Every loss term named in the step records, in first-seen order (the total `loss` not included)."""
    names: dict[str, None] = {}
    for record in steps:
        names |= {k: None for k in record if k not in _STEP_META}
    return list(names)


def stage_boundary(steps: list[dict[str, Any]]) -> int | None:
    """The first logged step of stage 2, or None unless both stages occur in the log."""
    stages = {r.get("stage") for r in steps}
    if not {1, 2} <= stages:
        return None
    return min(r["step"] for r in steps if r.get("stage") == 2)


def epoch_ends(records: list[dict[str, Any]]) -> list[int]:
    """Steps where an epoch ended, read from the log in file order.

    The evaluation at an epoch's end is logged with the *next* epoch's number (the loop advances the
    epoch first), so an eval record whose epoch exceeds every epoch seen before it closes an epoch.
    """
    ends, seen = [], 0
    for record in records:
        if "eval" in record and record["epoch"] > seen:
            ends.append(record["step"])
        seen = max(seen, record["epoch"])
    return ends


# --------------------------------------------------------------------------- figures


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LrcError("the run report needs matplotlib: pip install matplotlib") from None
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # x is always an optimizer step
    return figure, axes


def _empty(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)


def plot_losses(steps: list[dict[str, Any]], task: str, path: Path) -> Any:
    """Each loss term and the total over steps, with the stage-1 -> stage-2 switch as a dashed line.

    Returns the matplotlib Figure (after saving it to `path`)."""
    figure, axes = _figure()
    x = [r["step"] for r in steps]
    for name in loss_names(steps):
        points = [(r["step"], r[name]) for r in steps if name in r]
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.2,
                  marker="o" if len(points) <= 30 else None, markersize=3)  # a short run still shows
    if steps:
        axes.plot(x, [r["loss"] for r in steps], label="loss (weighted total)", color="black", linewidth=1.8,
                  marker="o" if len(x) <= 30 else None, markersize=3)
        values = [r[k] for r in steps for k in (*loss_names(steps), "loss") if k in r]
        # Terms differ by orders of magnitude (COS-NCE ~ 4 per layer, a converged soft loss ~ 1e-3).
        if min(values) > 0 and max(values) / min(values) > 100:
            axes.set_yscale("log")
    else:
        _empty(axes, "no step records in train_log.jsonl")
    boundary = stage_boundary(steps)
    if boundary is not None:
        axes.axvline(boundary, color="grey", linestyle="--", linewidth=1, label=f"stage 2 from step {boundary}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(f"{task}: training losses")
    if steps:
        axes.legend(loc="best", fontsize="small")
    figure.savefig(path)
    return figure


def plot_dev(evals: list[dict[str, Any]], epoch_steps: list[int], main_metric: str,
             teacher_dev: dict[str, float] | None, task: str, path: Path) -> Any:
    """Each dev metric over evaluations, the teacher's main metric as a reference line, epoch ends dotted.

    Returns the matplotlib Figure (after saving it to `path`)."""
    figure, axes = _figure()
    names = list(dict.fromkeys(k for r in evals for k in r["eval"]))
    for name in names:
        points = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"student {name}",
                  linewidth=1.8 if name == main_metric else 1.0)
    if teacher_dev is not None and main_metric in teacher_dev:
        value = teacher_dev[main_metric]
        axes.axhline(value, color="black", linestyle="--", linewidth=1, label=f"teacher {main_metric} {value:.4f}")
    for i, step in enumerate(epoch_steps):
        axes.axvline(step, color="grey", linestyle=":", linewidth=1, label="epoch end" if i == 0 else None)
    if not evals:
        _empty(axes, "no dev evaluations (the cache has no dev split)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"dev {main_metric}")
    axes.set_title(f"{task}: dev {main_metric}")
    if evals or teacher_dev:
        axes.legend(loc="best", fontsize="small")
    figure.savefig(path)
    return figure


# --------------------------------------------------------------------------- report.md


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # JSON spells None, bools and lists plainly


def _results_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    config, metric = summary["config"], summary["main_metric"]
    best, teacher = summary["best"], summary["teacher_dev"]
    rows = [
        ("task", summary["task"]),
        ("student", f"{config['layers']} layers x {config['hidden']} hidden, {config['heads']} heads, "
                    f"{config['intermediate']} intermediate; {summary['parameters']:,} parameters"),
        ("layer map (teacher layer per student layer)", str(summary["layer_map"])),
    ]
    if summary.get("kind") == "general":  # summaries before general distillation existed have no kind
        rows.append(("general distillation", "unlabeled corpus, intermediate loss alone; no dev split, the last "
                                             "student is kept (an encoder for `train-student --init`)"))
    elif best:
        others = ", ".join(f"{k} {_number(v)}" for k, v in best.items() if k not in (metric, "step"))
        rows.append((f"{'final' if summary.get('kept') == 'last' else 'best'} dev {metric}", f"**{_number(best[metric])}** at step {best['step']}"
                     + (f" ({others})" if others else "")))
    else:
        rows.append((f"best dev {metric}", "no dev evaluation (the cache has no dev split)"))
    if summary.get("kind") != "general":
        rows.append((f"teacher dev {metric}", _number(teacher[metric]) if teacher else "not available"))
        percent = summary["percent_of_teacher"]
        rows.append(("student / teacher", f"{percent:.1f} %" if percent is not None else "not available"))
    rows.append(("training", f"{summary['steps']} steps, {summary['epochs']} full epochs, "
                             f"{summary['train_seconds']} s, {summary['samples_per_s']} samples/s"))
    return rows


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def render_markdown(summary: dict[str, Any], run_name: str) -> str:
    config = summary["config"]
    # the key settings are the TrainConfig fields marked `report`, in their order (pipeline/core/options.py)
    settings = [(k, f"`{_setting(config[k])}`") for k in options.report_keys(TrainConfig) if k in config]
    lines = [
        f"# Distillation report: {summary['task']} ({run_name})", "",
        *_table(_results_rows(summary), ("", "")), "",
        "## Key settings", "",
        *_table(settings, ("setting", "value")), "",
        "The full settings are in `train_config.json`; every logged step and evaluation in `train_log.jsonl`.", "",
        "## Training losses", "",
        f"![training losses]({LOSS_PLOT})", "",
        f"## Dev {summary['main_metric']}", "",
        f"![dev {summary['main_metric']}]({DEV_PLOT})", "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write losses.png, dev_metric.png and report.md into a finished run dir; returns report.md's path."""
    summary_path = run_dir / SUMMARY
    if not summary_path.is_file():
        raise LrcError(f"no {SUMMARY} in {run_dir}: the run has not finished; finish it with "
                       f"`lrc train-student --resume` before writing its report")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise LrcError(f"{summary_path} is unreadable ({' '.join(str(err).split())[:120]}): it was cut short or "
                       "edited; rerun the training with --overwrite") from None
    steps, evals = read_log(run_dir)
    all_records = sorted(steps + evals, key=lambda r: r["step"])  # stable: keeps file order within a step
    plot_losses(steps, summary["task"], run_dir / LOSS_PLOT)
    plot_dev(evals, epoch_ends(all_records), summary["main_metric"], summary["teacher_dev"], summary["task"],
             run_dir / DEV_PLOT)
    path = run_dir / REPORT
    path.write_text(render_markdown(summary, run_dir.name))
    log.info("report written to %s", path)
    return path
