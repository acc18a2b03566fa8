"""What a training run saves as it goes: the resumable checkpoint (a state file, pipeline/student/state_file.py,
with the inputs the run trained on), the best student, the training summary and the metrics log."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import atomic, reuse
from pipeline.core.errors import LrcError
from pipeline.core.train_config import TrainConfig
from pipeline.student.run_dir import (
    METRICS_LOG, RUN_CONFIG, STATE_FILE, SUMMARY, RunDir, comparable_settings, read_json,
)
from pipeline.student.state_file import read_entry, read_state, write_state

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, float] | None = None


def run_inputs(cache_fingerprint: str, negatives_sha256: str | None) -> dict[str, str | None]:
    """What a run trains from, by content: recorded in every checkpoint and compared on resume."""
    return {"cache_fingerprint": cache_fingerprint, "negatives_sha256": negatives_sha256}


def recorded_inputs(path: Path) -> dict[str, Any] | None:
    """The inputs a checkpoint file records, read from its JSON header alone (no tensor is loaded); None for a
    checkpoint written before they were recorded."""
    return read_entry(path, "inputs")


def check_inputs(run: RunDir, config: TrainConfig, inputs: dict[str, str | None]) -> None:
    """--resume continues only on the inputs the checkpoint was trained on: the same cache fingerprint and the
    same negatives content, wherever they now live. A checkpoint from before inputs were recorded falls back to
    the rule it was written under: the same paths."""
    path = run.checkpoint_dir / STATE_FILE
    recorded = recorded_inputs(path)
    fix = "resume with the inputs it was trained on, or start over with --overwrite"
    if recorded is None:
        saved = read_json(config.output_dir / RUN_CONFIG, "start over with --overwrite")
        current = comparable_settings(config)
        paths = ("cache_dir", "negatives")
        moved = [c.key for c in reuse.diff({k: saved.get(k) for k in paths}, {k: current.get(k) for k in paths})]
        if moved:
            raise LrcError(f"--resume: the checkpoint in {config.output_dir} records no input fingerprints (an older "
                           f"lrc) and {', '.join(moved)} differ(s) from the recorded path(s): {fix}")
        return
    what = {"cache_fingerprint": ("the cache", f"--cache {config.cache_dir}", "re-extracted or another cache"),
            "negatives_sha256": ("the negatives file", f"{config.negatives_path}", "rebuilt or another file")}
    for change in reuse.diff({k: recorded.get(k) for k in what}, {k: inputs.get(k) for k in what}):
        name, now, why = what[change.key]
        raise LrcError(f"--resume: the checkpoint in {config.output_dir} was trained on {name} with "
                       f"{change.key.split('_')[-1]} {str(change.recorded)[:12]}, but {now} has "
                       f"{str(change.requested)[:12]} ({why} since): {fix}")


def _remove_stale_temp_files(run: RunDir) -> None:
    """Temp files of a checkpoint write that was killed (a SIGKILL runs no cleanup): never trusted."""
    if run.checkpoint_dir.is_dir():
        for tmp in run.checkpoint_dir.glob(f".{STATE_FILE}.tmp-*"):
            tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, numpy, Python, CUDA)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(run: RunDir, state: TrainState, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, rng_by_rank: list[dict[str, Any]] | None = None,
         inputs: dict[str, str | None] | None = None) -> None:
    """Everything a resumed run needs to continue as if never stopped, written atomically, with the `inputs`
    (`run_inputs`) it trained on. Under torchrun rank 0 writes it with every rank's RNG state (`rng_by_rank`,
    in rank order)."""
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "state": asdict(state),
        "student": student.state_dict(),
        "projections": projections.state_dict() if projections is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    if inputs is not None:
        payload["inputs"] = inputs
    if rng_by_rank is not None and len(rng_by_rank) > 1:
        payload["rng_by_rank"] = rng_by_rank
    _remove_stale_temp_files(run)
    write_state(run.checkpoint_dir / STATE_FILE, payload)


def load(run: RunDir, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, world_size: int = 1) -> TrainState:
    """Restore a checkpoint into the run's objects; each rank takes its own RNG state. Resumed with another
    number of processes, weights, optimizer and data order carry over (--batch-size is the global batch)
    but dropout draws do not: every rank then starts from rank 0's generators, offset by its rank."""
    _remove_stale_temp_files(run)
    path = run.checkpoint_dir / STATE_FILE
    payload = read_state(path)
    try:
        student.load_state_dict(payload["student"])
        if projections is not None:
            projections.load_state_dict(payload["projections"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise LrcError(f"checkpoint {path} does not fit this run ({reason}): start the run over with --overwrite") from None
    by_rank = payload.get("rng_by_rank") or [payload["rng"]]
    if len(by_rank) == world_size:
        _set_rng_state(by_rank[rank])
    else:
        log.warning("the checkpoint was written by %d process(es), this run has %d: dropout draws differ from an "
                    "uninterrupted run", len(by_rank), world_size)
        _set_rng_state(payload["rng"])
        if rank > 0:
            torch.manual_seed(int(torch.randint(2**31, ())) + rank)
    return TrainState(**payload["state"])


def save_student(run: RunDir, student: torch.nn.Module, tokenizer: Any) -> None:
    """The student in Hugging Face format at the top of the run dir (config, weights, tokenizer).

    Written to a temp dir, then moved file by file: each move is atomic and only the weights
    change between saves, so a reader never sees a half-written model.
    """
    with atomic.staging_dir(run.output_dir / "student") as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.move_files(tmp, run.output_dir, last=lambda path: path.suffix == ".safetensors")


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    atomic.write_json(run.output_dir / SUMMARY, summary)


class MetricsLog:
    """Every logged step and evaluation as one JSON line (and to TensorBoard when it is installed)."""

    def __init__(self, run: RunDir, keep_until: int | None) -> None:
        """`keep_until`: resuming from that step, drop records a killed run wrote after its checkpoint."""
        self.path = run.output_dir / METRICS_LOG
        if keep_until is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= keep_until]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run.output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            values = record.get("eval", record)
            prefix = "eval/" if "eval" in record else "train/"
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(prefix + key, value, record["step"])
            self._tensorboard.flush()


def _step_of(line: str) -> float:
    """The step of a log line; a line cut short by a kill or a full disk counts as after any checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
