"""pipeline/student/checkpoint.py, on its run_dir.py and state_file.py: the training state round-trips exactly, and
loading it can never run code."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.student import checkpoint, run_dir, state_file
from pipeline.student.checkpoint import TrainState
from pipeline.student.run_dir import RunDir
from conftest import assert_refused


def _parts(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_state_round_trips_exactly_with_rng_streams(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    model, optimizer, scheduler = _parts()
    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    state = TrainState(step=7, epoch=1, batch_in_epoch=2, best={"accuracy": 0.5, "step": 6})
    checkpoint.save(run, state, model, None, optimizer, scheduler)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other, other_opt, other_sched = _parts(seed=1)
    loaded = checkpoint.load(run, other, None, other_opt, other_sched)
    assert loaded == state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert str(optimizer.state_dict()) == str(other_opt.state_dict())
    assert scheduler.state_dict() == other_sched.state_dict()
    got = (torch.rand(3), np.random.rand(3), random.random())  # every RNG continues where it was saved
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert [p.name for p in run.checkpoint_dir.iterdir()] == [run_dir.STATE_FILE]


class _Planted:
    """What a malicious pickle carries: unpickling it runs `marker.write_text`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_planted_pickle_never_runs(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.checkpoint_dir.mkdir(parents=True)
    marker = tmp_path / "ran"
    payload = pickle.dumps({"state": _Planted(marker)})
    model, optimizer, scheduler = _parts()
    # as the state file itself, and as the old pickle checkpoint (state.pt) a --resume used to torch.load
    (run.checkpoint_dir / run_dir.STATE_FILE).write_bytes(payload)
    assert_refused(lambda: checkpoint.load(run, model, None, optimizer, scheduler), "unreadable", "--overwrite")
    (run.checkpoint_dir / run_dir.STATE_FILE).unlink()
    torch.save({"state": _Planted(marker)}, run.checkpoint_dir / run_dir.LEGACY_STATE_FILE)
    from pipeline.core.train_config import TrainConfig

    config = TrainConfig(cache_dir=tmp_path / "cache", output_dir=run.output_dir, resume=True)
    assert_refused(lambda: run_dir.check_run_dir(config), "pickle", "never loaded", "--overwrite")
    assert not marker.exists()


def test_a_truncated_state_file_is_one_line_and_killed_writes_leave_no_temp_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    model, optimizer, scheduler = _parts()
    checkpoint.save(run, TrainState(step=3), model, None, optimizer, scheduler)
    path = run.checkpoint_dir / run_dir.STATE_FILE
    whole = path.read_bytes()
    for cut in (len(whole) // 2, 7):
        path.write_bytes(whole[:cut])
        assert_refused(lambda: checkpoint.load(run, model, None, optimizer, scheduler), str(path), "unreadable")
    stale = run.checkpoint_dir / f".{run_dir.STATE_FILE}.tmp-999999"  # what a write killed mid-way leaves
    stale.write_bytes(whole[:100])
    checkpoint.save(run, TrainState(step=4), model, None, optimizer, scheduler)
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [run_dir.STATE_FILE]
    assert checkpoint.load(run, model, None, optimizer, scheduler).step == 4


def test_only_plain_data_and_tensors_are_stored(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="object"):
        state_file.write_state(tmp_path / "s.safetensors", {"x": object()})
    tree = {"a": (1, 2.5, None, "s", [True]), 3: {"t": torch.arange(3), "n": np.arange(4, dtype=np.uint32)}}
    state_file.write_state(tmp_path / "s.safetensors", tree)
    back = state_file.read_state(tmp_path / "s.safetensors")
    assert back["a"] == (1, 2.5, None, "s", [True]) and list(back) == ["a", 3]
    assert torch.equal(back[3]["t"], torch.arange(3)) and back[3]["n"].dtype == np.uint32
