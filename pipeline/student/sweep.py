"""`lrc sweep`: `train-student` over a grid of settings on one cache and one negatives file.

The grid comes from a TOML/YAML file (`learning_rate = [1e-4, 3e-4]`) and/or `--set key=v1,v2`
(pipeline/student/sweep_grid.py); its points are the cartesian product in grid order, point i trains into
`<output-dir>/run-NNN-<settings>/`.
Only `train_student` is called, so the teacher is never loaded: a sweep costs student training only.

Resuming follows `train.train_or_reuse`, the policy demo and the benchmarks use too: a point whose run
dir holds a finished run with the same settings is reused, an unfinished one resumes from its
checkpoint, so rerunning a killed sweep continues where it stopped. A run with other settings (or on a
re-extracted cache) is reported as a failed point; `--overwrite` retrains every point. Every point of the grid is
checked as a train-student config when the SweepConfig is built, so a bad value is refused before the first point
trains. A point that fails while running (LrcError, out of memory) is recorded with its message and the sweep goes
on; the sweep then exits with an error naming it, and a rerun tries it again. `results.csv` and
`results.md` are rewritten after every point (pending points included), so partial results survive.

Spreading a sweep over several machines: give each machine the same cache (a copy is fine; the same
path on each is simplest) with its negatives file, and the same grid and settings, and run machine I
of N with `--shard I/N`: it trains the points with index % N == I and writes
`results-shard-I-of-N.csv/.md` (so shards sharing a disk do not overwrite each other's tables).
To assemble: put every finished `run-*` dir into one output dir (a shared disk already does; else
copy them over) and rerun the sweep there without `--shard`: finished points are recognised by their
settings and the cache fingerprint and reused, not retrained, and `results.csv` then covers the
whole grid. (Concatenating the shards' CSVs, minus repeated headers, gives the same rows.)
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.reader import open_cache
from pipeline.core import atomic, distributed, outdir
from pipeline.core.errors import LrcError
from pipeline.core.tasks import get_task
from pipeline.core.train_config import SweepConfig, TrainConfig
from pipeline.student.run import check_against_cache
from pipeline.student.sweep_grid import format_value, grid_points, run_name
from pipeline.student.train import train_or_reuse

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- running the points


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N); SweepConfig checks 0 <= I < N."""
    index, _, count = text.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise LrcError(f"--shard {text!r} is not I/N: write e.g. --shard 0/4 for the first of 4 machines") from None


def _row(name: str, point: dict[str, Any], status: str, summary: dict[str, Any] | None = None,
         message: str = "") -> dict[str, Any]:
    best = summary["best"] if summary else None
    return {
        "run": name, "point": point, "status": status, "message": message,
        "dev": best[summary["main_metric"]] if best else None,
        "percent_of_teacher": summary["percent_of_teacher"] if summary else None,
        "best_step": best["step"] if best else None,
        "train_seconds": summary["train_seconds"] if summary else None,
    }


def _run_point(base: TrainConfig, point: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    try:
        config = replace(base, **point, output_dir=run_dir, resume=False)  # validates the point
        summary, status = train_or_reuse(config)
    except (LrcError, torch.OutOfMemoryError) as err:  # one bad point (e.g. a batch size too large) ends only itself
        message = " ".join(str(err).split())
        log.error("%s failed: %s", run_dir.name, message)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _row(run_dir.name, point, "failed", message=message)
    return _row(run_dir.name, point, status, summary)


# --------------------------------------------------------------------------- results tables


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else format_value(value)


def write_results(output_dir: Path, stem: str, keys: list[str], metric: str, rows: list[dict[str, Any]],
                  title: str) -> None:
    """<stem>.csv (full precision, one row per point) and <stem>.md (a readable table), both atomically."""
    header = ["run", *keys, f"dev_{metric}", "percent_of_teacher", "best_step", "train_seconds", "status", "message"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([r["run"], *(format_value(r["point"][k]) for k in keys),
                         *("" if r[c] is None else r[c] for c in ("dev", "percent_of_teacher", "best_step",
                                                                  "train_seconds")), r["status"], r["message"]])
    atomic.write_text(output_dir / f"{stem}.csv", buffer.getvalue())

    best = max((r["dev"] for r in rows if r["dev"] is not None), default=None)
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in ("done", "reused", "failed", "pending"))
    lines = [f"# {title}", "", f"Points: {counts}. Full precision in `{stem}.csv`.", "",
             "| " + " | ".join(["run", *keys, f"dev {metric}", "% of teacher", "best step", "train s", "status"])
             + " |",
             "|" + "---|" * (len(keys) + 6)]
    for r in rows:
        dev = _cell(r["dev"])
        status = f"{r['status']}: {r['message']}" if r["message"] else r["status"]
        cells = [r["run"], *(format_value(r["point"][k]) for k in keys), f"**{dev}**" if dev and r["dev"] == best else dev,
                 "" if r["percent_of_teacher"] is None else f"{r['percent_of_teacher']:.1f}",
                 _cell(r["best_step"]), "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}", status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    atomic.write_text(output_dir / f"{stem}.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the sweep


def run_sweep(config: SweepConfig) -> Path:
    """Train (or reuse) this shard's points in grid order; returns the results CSV's path.

    Under torchrun rank r of W is shard r/W (each point trains in one process on that rank's device) and
    rank 0 writes `results.csv`/`.md` over the whole grid once every rank has finished. The process group
    only carries the finished rows (gloo, also on GPUs), and waits as long as the slowest rank trains."""
    with distributed.session(config.base.device, gloo=True, timeout=distributed.SWEEP_TIMEOUT) as ranks:
        if ranks.distributed:
            if config.shard_count > 1:
                raise LrcError(f"--shard {config.shard_index}/{config.shard_count} under torchrun: the ranks already "
                               "split the grid (rank r runs shard r of WORLD_SIZE); drop --shard")
            config = replace(config, shard_index=ranks.rank, shard_count=ranks.world_size)
        with outdir.lock(config.output_dir, "sweep", ranks.is_main):
            return _run_shard(config, ranks)


def _run_shard(config: SweepConfig, ranks: distributed.Ranks) -> Path:
    cache = open_cache(config.base.cache_dir)  # for the task's metric
    metric = get_task(cache.task["name"]).main_metric
    points = grid_points(config.grid)
    mine = [i for i in range(len(points)) if i % config.shard_count == config.shard_index]
    keys = [k for k, _ in config.grid]
    sharded = config.shard_count > 1
    stem = f"results-shard-{config.shard_index}-of-{config.shard_count}" if sharded else "results"
    title = f"Sweep on {cache.task['name']}: {len(points)} points" + (
        f", shard {config.shard_index}/{config.shard_count} ({len(mine)} points)" if sharded else "")
    # the results tables and run dirs go only into a sweep's own dir, never into a cache or a user's folder
    outdir.refuse_nested(config.output_dir, {"cache": config.base.cache_dir})
    outdir.check(config.output_dir, "sweep", overwrite=False, adopt=True)
    varying = [k for k, values in config.grid if len(values) > 1] or keys  # the slug names what differs
    names = {i: run_name(i, {k: points[i][k] for k in varying}) for i in mine}
    # What each point asks of this cache (its layer map, its --init dir's shape) is checked for every point before
    # the first trains, as the values themselves were when the SweepConfig was built.
    for i in mine:
        try:
            check_against_cache(replace(config.base, **points[i], output_dir=config.output_dir / names[i]), cache)
        except LrcError as err:
            raise LrcError(f"sweep point {names[i]} is refused before any point trains: {err}") from None
    outdir.mark(config.output_dir, "sweep")
    rows = {i: _row(names[i], points[i], "pending") for i in mine}
    write_results(config.output_dir, stem, keys, metric, list(rows.values()), title)
    log.info("%s; cache %s", title, config.base.cache_dir)

    for n, i in enumerate(mine, 1):
        log.info("point %d/%d (%s): %s", n, len(mine), names[i],
                 ", ".join(f"{k}={format_value(v)}" for k, v in points[i].items()))
        rows[i] = _run_point(config.base, points[i], config.output_dir / names[i])
        write_results(config.output_dir, stem, keys, metric, list(rows.values()), title)
        if rows[i]["status"] != "failed":
            log.info("point %d/%d %s: dev %s %s", n, len(mine), rows[i]["status"], metric, _cell(rows[i]["dev"]))
    failed = [r for r in rows.values() if r["status"] == "failed"]
    log.info("sweep finished: %d points, %d failed; results in %s", len(mine), len(failed), config.output_dir / f"{stem}.md")
    if ranks.distributed:  # every rank's rows to rank 0, which writes the one table of the whole grid
        everyone = distributed.gather(ranks, rows)
        if everyone is not None:
            merged = {i: row for part in everyone for i, row in part.items()}
            stem, title = "results", f"Sweep on {cache.task['name']}: {len(points)} points ({ranks.world_size} ranks)"
            write_results(config.output_dir, stem, keys, metric, [merged[i] for i in sorted(merged)], title)
            log.info("results of all %d ranks in %s", ranks.world_size, config.output_dir / f"{stem}.md")
    if failed:  # the command failed, whatever else trained: a script must not read a partial grid as a whole one
        which = "every point" if len(failed) == len(mine) else f"{len(failed)} of {len(mine)} points"
        raise LrcError(f"{which} of the sweep failed ({len(failed)} of {len(mine)}; {failed[0]['run']}: "
                       f"{failed[0]['message']}): fix that and rerun (finished points are reused); see "
                       f"{config.output_dir / f'{stem}.md'}")
    return config.output_dir / f"{stem}.csv"
