"""The training run's directory: its layout, the settings it records (train_config.json), and whether a command
may start, resume or reuse a run there (pipeline/core/reuse.py decides from what differs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.negatives_file import recorded_sha256
from pipeline.core import atomic, options, outdir, reuse
from pipeline.core.errors import LrcError
from pipeline.core.train_config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a pickle, written by older lrc versions: never loaded
RUN_CONFIG = "train_config.json"
METRICS_LOG = "train_log.jsonl"
SUMMARY = "training_summary.json"
# Where the run dir, the cache and the negatives file live: never compared, so a run dir copied in from another
# machine is recognised; the inputs are compared by content instead (the cache's fingerprint, the negatives
# file's sha256).
_LOCATIONS = ("output_dir", "cache_dir", "negatives")
# How a refusal names an input that changed under a finished run (its recorded hash says nothing to a user).
_INPUT_LABELS = {"cache_fingerprint": "the cache (re-extracted since)",
                 "negatives_sha256": "the negatives file (rebuilt since)"}


@dataclass(frozen=True)
class RunDir:
    output_dir: Path
    checkpoint_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_dir", self.output_dir / CHECKPOINT_DIR)


def comparable_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings recorded in train_config.json and compared on reuse and resume, as the config's fields say
    (pipeline/core/options.py): run-only settings (how a run is watched or where it runs) are left out, and so is a
    setting added after runs were recorded while it holds the value that reproduces the behaviour before it, so
    a run saved before the setting existed still compares equal (and is reused or resumed)."""
    run_only, added_at = options.run_only(type(config)), options.added_at(type(config))
    raw = {k: v for k, v in asdict(config).items()
           if k not in run_only and not (k in added_at and v == added_at[k])}
    return json.loads(json.dumps(raw, default=str))


def read_json(path: Path, fix: str) -> Any:
    """A JSON file of the run dir; an unreadable one is a one-line LrcError ending in `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise LrcError(f"{path} is unreadable ({type(err).__name__}: {err}): {fix}") from None


def check_run_dir(config: TrainConfig) -> RunDir:
    """Resume or refuse, writing nothing: a run dir is only reused by `--resume` with the same settings.

    Called before any other check, so that a refused command leaves no run dir behind; the dir is
    created (or replaced, with --overwrite) by `start_run_dir` once everything else is in order.
    """
    run = RunDir(config.output_dir)
    out, saved = config.output_dir, config.output_dir / RUN_CONFIG
    init = Path(config.init) if config.init not in ("random", "teacher") else None
    outdir.refuse_nested(out, {"cache": config.cache_dir, "negatives file": config.negatives, "--init model": init})
    if config.resume:
        if not (run.checkpoint_dir / STATE_FILE).is_file():
            legacy = (run.checkpoint_dir / LEGACY_STATE_FILE).is_file()
            raise LrcError(f"--resume: the checkpoint in {out} is a pickle (state.pt) from an older lrc, which is never "
                           "loaded (unpickling can run code): start over with --overwrite" if legacy else
                           f"--resume: no checkpoint in {out}; start the run without --resume (add --overwrite to replace the dir)")
        # The inputs themselves are compared by content once they are open (`checkpoint.check_inputs`).
        changes = settings_changes(read_json(saved, "start over with --overwrite"), config)
        reuse.decide(reuse.RESUMABLE, changes, overwrite=False, where=out, what="a checkpoint", resume=True)
        return run
    held = reuse.FINISHED if outdir.check(out, "run", config.overwrite) else reuse.EMPTY
    reuse.decide(held, [], overwrite=config.overwrite, where=out, what="a training run", resume=False)
    return run


def start_run_dir(config: TrainConfig) -> None:
    """Create (or, with --overwrite, replace) the run dir checked by `check_run_dir`; a resume keeps it."""
    out = config.output_dir
    if config.resume:
        return
    if out.exists() and any(out.iterdir()):
        outdir.clear(out, "run")  # only what a run writes: check_run_dir refused anything else
    outdir.mark(out, "run")
    atomic.write_json(out / RUN_CONFIG, comparable_settings(config), sort_keys=True)


def settings_changes(saved: dict[str, Any], config: TrainConfig) -> list[reuse.Change]:
    """How `config` differs from a run dir's recorded train_config.json: the one comparison behind resuming
    (`check_run_dir`) and reusing (`previous_run`)."""
    return reuse.diff(saved, comparable_settings(config), run_only=(*options.run_only(type(config)), *_LOCATIONS))


@dataclass(frozen=True)
class PreviousRun:
    """What a run dir already holds, as far as starting `config` there is concerned."""

    state: str  # empty | foreign (not an lrc run) | unfinished | finished
    changed: list[reuse.Change]  # settings (and, for a finished run, inputs) that differ from `config`
    summary: dict[str, Any] | None  # the finished run's training summary
    resumable: bool  # an unfinished run with a checkpoint


def previous_run(config: TrainConfig, fingerprint: str) -> PreviousRun:
    """Inspect config.output_dir for a run of the same settings on the cache with this fingerprint and on the
    negatives file it names (by content). `config.init` is concrete (run.resolve_init): runs record what
    `--init auto` resolved to. An unfinished run's inputs are compared when it resumes."""
    out = config.output_dir
    if not out.is_dir() or not any(out.iterdir()):
        return PreviousRun("empty", [], None, False)
    if not (out / RUN_CONFIG).is_file():
        return PreviousRun("foreign", [], None, False)
    changed = settings_changes(read_json(out / RUN_CONFIG, "remove the dir or pass --overwrite"), config)
    if not (out / SUMMARY).is_file():
        return PreviousRun("unfinished", changed, None, (out / CHECKPOINT_DIR / STATE_FILE).is_file())
    summary = read_json(out / SUMMARY, "remove the dir or pass --overwrite")
    negatives = recorded_sha256(config.negatives_path) if config.uses_negatives and config.negatives_source == "file" \
        else None
    # summaries written before the negatives hash was recorded have none: their runs compare by cache alone
    recorded = {"cache_fingerprint": summary["cache_fingerprint"],
                "negatives_sha256": summary.get("negatives_sha256", negatives)}
    changed += reuse.diff(recorded, {"cache_fingerprint": fingerprint, "negatives_sha256": negatives})
    return PreviousRun("finished", changed, summary, False)


def decide(config: TrainConfig, previous: PreviousRun) -> str:
    """reuse.decide for a run dir found by `previous_run` (sweep, demo and the benchmarks go through here)."""
    held = {"finished": reuse.FINISHED, "unfinished": reuse.RESUMABLE if previous.resumable else reuse.UNFINISHED}
    return reuse.decide(held.get(previous.state, reuse.EMPTY), previous.changed, overwrite=config.overwrite,
                        where=config.output_dir, what=f"a {previous.state} run", labels=_INPUT_LABELS)
