"""What a run learns, decided once from the cache's kind (docs/DESIGN.md §2, §4).

A task cache (labels, teacher logits) trains the full LRC-BERT objective: the intermediate loss, the soft and
hard prediction losses, weighted by the two-stage schedule; the best (or last) student on the cached dev split
is kept. A corpus cache (unlabeled text, pipeline/student/general.py) trains the intermediate loss alone: the
student's head never enters the loss, there is no dev split and the last student is kept. Everything that
differs between the two reads this object; nothing else asks which kind of cache it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.tasks import TaskSpec, get_task
from pipeline.core.train_config import TrainConfig
from pipeline.student import general


def steps_in(fraction: float, total_steps: int) -> int:
    """floor(fraction * total_steps), immune to float error (0.7 * 90 is 62.99999999999999, not 63)."""
    return math.floor(fraction * total_steps + 1e-9)


def stage_at(step: int, total_steps: int, config: TrainConfig) -> int:
    """1 for the first `stage1_fraction` of optimizer steps, 2 after (always 2 in one-stage training)."""
    if config.one_stage or config.intermediate_loss == "none":
        return 2
    return 1 if step < steps_in(config.stage1_fraction, total_steps) else 2


def loss_weights(step: int, total_steps: int, config: TrainConfig) -> tuple[float, float, float]:
    """(alpha, beta, gamma) for L_total = alpha * L_intermediate + beta * L_soft + gamma * L_hard."""
    return config.stage1_weights if stage_at(step, total_steps, config) == 1 else config.stage2_weights


@dataclass(frozen=True)
class Objective:
    """The loss, head and keep rule of one run. `task` is None for general distillation; `head` is the
    student's classification head (the cache's task entry, or general distillation's unused one-output head)."""

    task: TaskSpec | None
    head: dict[str, Any]

    @property
    def general(self) -> bool:
        return self.task is None

    @property
    def kind(self) -> str:
        """As the run's summary records it."""
        return "general" if self.general else "task"

    @property
    def name(self) -> str:
        return "corpus" if self.task is None else self.task.name

    @property
    def predicts(self) -> bool:
        """The loss reads the student's logits (soft and hard terms, against the teacher's logits and the labels)."""
        return not self.general

    @property
    def regression(self) -> bool:
        return self.task is not None and self.task.is_regression

    @property
    def metric(self) -> str | None:
        """The dev metric that picks the kept student; None where there is no dev split to pick by."""
        return None if self.task is None else self.task.main_metric

    @property
    def find_unused(self) -> bool:
        """Whether DDP must look for parameters without a gradient (a graph walk per step): only when the head
        stays out of the loss."""
        return self.general

    def keep(self, config: TrainConfig) -> str:
        return "last" if self.general else config.keep

    def weights(self, step: int, total_steps: int, config: TrainConfig) -> tuple[float, float, float]:
        """(alpha, beta, gamma) of this step."""
        return general.WEIGHTS if self.general else loss_weights(step, total_steps, config)

    def stage(self, step: int, total_steps: int, config: TrainConfig) -> int:
        """The training stage this step belongs to (general distillation is all stage one)."""
        return 1 if self.general else stage_at(step, total_steps, config)

    def check(self, config: TrainConfig, cache_dir: Path) -> None:
        """Refuse a config this objective cannot train (one line)."""
        if self.general:
            general.check_config(config, cache_dir)


def objective_for(manifest: dict[str, Any]) -> Objective:
    """The objective a cache's manifest calls for: general distillation on a corpus cache, else its task."""
    if manifest.get("kind") == "corpus":
        return Objective(None, general.HEAD)
    return Objective(get_task(manifest["task"]["name"]), manifest["task"])
