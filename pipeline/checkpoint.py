"""The training run's directory: resumable checkpoints, the best student, the metrics log."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.errors import LrcError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
RUN_CONFIG = "train_config.json"
METRICS_LOG = "train_log.jsonl"
SUMMARY = "training_summary.json"
# Settings that change how a run is watched or where it runs, not what it computes: a resume may change them.
_RUN_ONLY = ("resume", "overwrite", "num_workers", "device", "log_every", "eval_every", "eval_batch_size",
             "checkpoint_every")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, float] | None = None


@dataclass(frozen=True)
class RunDir:
    output_dir: Path
    checkpoint_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_dir", self.output_dir / CHECKPOINT_DIR)


# Settings added after runs were recorded, with the default that reproduces the behaviour before them: left out
# at that default, so a run saved before the setting existed still compares equal (and is reused or resumed).
_ADDED_AT_DEFAULT = {"keep": "best"}


def comparable_settings(config: TrainConfig) -> dict[str, Any]:
    raw = {k: v for k, v in asdict(config).items()
           if k not in _RUN_ONLY and not (k in _ADDED_AT_DEFAULT and v == _ADDED_AT_DEFAULT[k])}
    return json.loads(json.dumps(raw, default=str))


def prepare_run_dir(config: TrainConfig) -> RunDir:
    """Start, resume or refuse: a run dir is only reused by `--resume` with the same settings."""
    run = RunDir(config.output_dir)
    out, saved = config.output_dir, config.output_dir / RUN_CONFIG
    has_state = (run.checkpoint_dir / STATE_FILE).is_file()
    if config.resume:
        if not has_state:
            raise LrcError(f"--resume: no checkpoint in {out}; start the run without --resume (add --overwrite to replace the dir)")
        previous = json.loads(saved.read_text())
        current = comparable_settings(config)
        changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
        if changed:
            raise LrcError(f"--resume: the checkpoint in {out} was made with other settings (differs in: "
                           f"{', '.join(changed)}): resume with the same settings, or start over with --overwrite")
        return run
    if out.exists() and any(out.iterdir()):
        if not saved.is_file():
            raise LrcError(f"output dir {out} is not empty and holds no lrc training run: choose a new --output-dir")
        if not config.overwrite:
            raise LrcError(f"output dir {out} holds a training run: pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(comparable_settings(config), indent=2, sort_keys=True) + "\n")
    return run


def save(run: RunDir, state: TrainState, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Everything a resumed run needs to continue as if never stopped, written atomically."""
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "state": asdict(state),
        "student": student.state_dict(),
        "projections": projections.state_dict() if projections is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    final = run.checkpoint_dir / STATE_FILE
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, final)


def load(run: RunDir, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    payload = torch.load(run.checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=False)
    student.load_state_dict(payload["student"])
    if projections is not None:
        projections.load_state_dict(payload["projections"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**payload["state"])


def save_student(run: RunDir, student: torch.nn.Module, tokenizer: Any) -> None:
    """The student in Hugging Face format at the top of the run dir (config, weights, tokenizer).

    Written to a temp dir, then moved file by file: each move is atomic and only the weights
    change between saves, so a reader never sees a half-written model.
    """
    tmp = run.output_dir / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for path in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):  # weights last
        os.replace(path, run.output_dir / path.name)
    tmp.rmdir()


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    (run.output_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


class MetricsLog:
    """Every logged step and evaluation as one JSON line (and to TensorBoard when it is installed)."""

    def __init__(self, run: RunDir, keep_until: int | None) -> None:
        """`keep_until`: resuming from that step, drop records a killed run wrote after its checkpoint."""
        self.path = run.output_dir / METRICS_LOG
        if keep_until is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= keep_until]
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


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a finished run in config.output_dir made with the same settings, else None."""
    saved, summary = config.output_dir / RUN_CONFIG, config.output_dir / SUMMARY
    if saved.is_file() and summary.is_file() and json.loads(saved.read_text()) == comparable_settings(config):
        return json.loads(summary.read_text())
    return None
