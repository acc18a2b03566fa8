"""Every numeric option is checked for finiteness and range when its config is built (pipeline/core/*config.py),
so a bad value is refused in one line before any stage starts work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import assert_refused
from pipeline.core.apps_config import DemoConfig, EvaluateConfig
from pipeline.core.config import DataConfig
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig, FinetuneConfig
from pipeline.core.train_config import SweepConfig, TrainConfig

NAN, INF = math.nan, math.inf
C, O = Path("cache"), Path("out")
DATA = DataConfig(task="sst2", data_dir=None)


# (flag the message names, a config built with one bad value); each was accepted before this check existed
# (inf or NaN went into the optimizer or the loss, a negative seed or a zero interval crashed mid-run).
BAD = [
    ("--lr", lambda: TrainConfig(cache_dir=C, output_dir=O, learning_rate=INF)),
    ("--lr", lambda: TrainConfig(cache_dir=C, output_dir=O, learning_rate=NAN)),
    ("--weight-decay", lambda: TrainConfig(cache_dir=C, output_dir=O, weight_decay=-0.1)),
    ("--weight-decay", lambda: TrainConfig(cache_dir=C, output_dir=O, weight_decay=NAN)),
    ("--temperature", lambda: TrainConfig(cache_dir=C, output_dir=O, temperature=INF)),
    ("--perturb-eps", lambda: TrainConfig(cache_dir=C, output_dir=O, perturb_eps=INF)),
    ("--stage1-weights", lambda: TrainConfig(cache_dir=C, output_dir=O, stage1_weights=(1.0, NAN, 0.0))),
    ("--stage2-weights", lambda: TrainConfig(cache_dir=C, output_dir=O, stage2_weights=(1.0, -1.0, 3.0))),
    ("--stage2-weights", lambda: TrainConfig(cache_dir=C, output_dir=O, stage2_weights=(0.0, 0.0, 0.0))),
    ("--epochs", lambda: TrainConfig(cache_dir=C, output_dir=O, epochs=INF)),
    ("--max-grad-norm", lambda: TrainConfig(cache_dir=C, output_dir=O, max_grad_norm=INF)),
    ("--log-every", lambda: TrainConfig(cache_dir=C, output_dir=O, log_every=0)),
    ("--eval-every", lambda: TrainConfig(cache_dir=C, output_dir=O, eval_every=-5)),
    ("--eval-batch-size", lambda: TrainConfig(cache_dir=C, output_dir=O, eval_batch_size=0)),
    ("--seed", lambda: TrainConfig(cache_dir=C, output_dir=O, seed=-1)),
    ("--seed", lambda: TrainConfig(cache_dir=C, output_dir=O, seed=2**32)),
    ("--k", lambda: TrainConfig(cache_dir=C, output_dir=O, k=-1)),
    ("--layer-map", lambda: TrainConfig(cache_dir=C, output_dir=O, layers=2, layer_map=(0, 2))),
    ("--weight-decay", lambda: FinetuneConfig(data=DATA, output_dir=O, weight_decay=INF)),
    ("--seed", lambda: FinetuneConfig(data=DATA, output_dir=O, seed=-3)),
    ("--lr", lambda: FinetuneConfig(data=DATA, output_dir=O, learning_rate=INF)),
    ("--eval-batch-size", lambda: FinetuneConfig(data=DATA, output_dir=O, eval_batch_size=0)),
    ("--subsample-seed", lambda: DataConfig(task="sst2", subsample_seed=-1)),
    ("--max-passages", lambda: CorpusConfig("c.txt", max_passages=-2)),
    ("--max-length", lambda: ExtractConfig(teacher=C, data=DATA, output_dir=O, max_length=4)),
    ("--seed", lambda: NegativesConfig(cache_dir=C, seed=-1)),
    ("--regression-margin", lambda: NegativesConfig(cache_dir=C, regression_margin=INF)),
    ("--hard-pool", lambda: NegativesConfig(cache_dir=C, hard_pool=0)),
    ("--max-length", lambda: EvaluateConfig(model_dir=C, data=DATA, max_length=0)),
    ("--eval-batch-size", lambda: EvaluateConfig(model_dir=C, data=DATA, eval_batch_size=0)),
    ("--student-lr", lambda: DemoConfig(student_lr=INF)),
    ("--teacher-lr", lambda: DemoConfig(teacher_lr=NAN)),
    ("--k", lambda: DemoConfig(k=-1)),
    ("--seed", lambda: DemoConfig(seed=-1)),
    ("--max-length", lambda: DemoConfig(max_length=2)),
]


@pytest.mark.parametrize("flag,build", BAD, ids=[f"{i}:{flag}" for i, (flag, _) in enumerate(BAD)])
def test_bad_numbers_are_refused_when_the_config_is_built(flag: str, build) -> None:
    assert_refused(build, flag)


def test_good_edges_are_accepted() -> None:
    TrainConfig(cache_dir=C, output_dir=O, k=0, perturb_eps=0.0, weight_decay=0.0, max_grad_norm=0.0,
                stage1_fraction=0.0, seed=0, stage1_weights=(1.0, 0.0, 0.0))
    TrainConfig(cache_dir=C, output_dir=O, seed=2**32 - 1)
    DemoConfig(k=0)


def test_a_sweep_grid_is_checked_point_by_point_before_anything_runs(tmp_path: Path) -> None:
    base = TrainConfig(cache_dir=C, output_dir=O)
    grid = (("learning_rate", (1e-4, INF)), ("seed", (1, 2)))
    message = assert_refused(lambda: SweepConfig(base=base, grid=grid, output_dir=tmp_path / "sweep"),
                             "learning_rate=inf", "--lr")
    assert "seed=1" in message
    assert_refused(lambda: SweepConfig(base=base, grid=(("heads", (12, 5)),), output_dir=tmp_path / "sweep"),
                   "heads=5", "not divisible")
    # the grid is checked whole, not only this machine's shard of it
    assert_refused(lambda: SweepConfig(base=base, grid=(("k", (2, -1)),), output_dir=tmp_path / "sweep",
                                       shard_index=0, shard_count=2), "k=-1")
    assert not (tmp_path / "sweep").exists()
