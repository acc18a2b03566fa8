"""Output dirs lrc owns (pipeline/core/outdir.py): markers, the one replace rule, nested outputs, and the lock, with
real stage calls where the stage decides and real processes for the lock. Each test names the loss it prevents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_refused
from pipeline.core import outdir
from pipeline.core.apps_config import EvaluateConfig
from pipeline.core.config import DataConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import SweepConfig, TrainConfig


def user_folder(path: Path, signature: str) -> Path:
    """A user's project folder that happens to hold an lrc signature file (an editor's settings.json...)."""
    path.mkdir(parents=True)
    (path / signature).write_text("{}")
    (path / "main.py").write_text("print('my sources')\n")
    (path / ".git").mkdir()
    return path


def test_overwrite_never_empties_a_users_folder_holding_a_signature_file(tiny_teacher: Path, glue_dir: Path,
                                                                         tmp_path: Path) -> None:
    """The reported loss: `extract-teacher -o DIR --overwrite` deleted any folder holding a settings.json."""
    from pipeline.teacher.extract import extract_teacher

    folder = user_folder(tmp_path / "project", "settings.json")
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=8)
    assert_refused(lambda: extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=folder,
                                                         overwrite=True, device="cpu")),
                   str(folder), "holds no lrc cache")
    assert (folder / "main.py").is_file() and (folder / ".git").is_dir()


def test_overwrite_of_a_run_dir_holding_other_files_names_them(neg_cache: Path, tmp_path: Path) -> None:
    """train-student --overwrite on a real run dir into which a user put notes: refused, the notes named, kept."""
    from pipeline.student.train import train_student

    out = tmp_path / "run"
    config = TrainConfig(cache_dir=neg_cache, output_dir=out, layers=2, hidden=16, heads=2, intermediate=32, k=2,
                         max_steps=2, num_workers=0, device="cpu")
    train_student(config)
    assert json.loads((out / outdir.MARKER).read_text())["kind"] == "run"
    (out / "my-notes.txt").write_text("results I care about")
    from dataclasses import replace

    assert_refused(lambda: train_student(replace(config, overwrite=True)), "--overwrite refused", "my-notes.txt")
    assert (out / "my-notes.txt").is_file() and (out / "model.safetensors").is_file()


def test_a_cache_inside_the_run_dir_is_refused_before_anything_is_written(neg_cache: Path, tmp_path: Path) -> None:
    """With the cache inside the run dir, --overwrite used to delete the cache."""
    import shutil

    from pipeline.student.train import train_student

    run = tmp_path / "run"
    shutil.copytree(neg_cache, run / "cache")
    config = TrainConfig(cache_dir=run / "cache", output_dir=run, overwrite=True, device="cpu", num_workers=0)
    assert_refused(lambda: train_student(config), "overlap")
    assert (run / "cache" / "manifest.json").is_file()


def test_evaluate_output_never_replaces_a_file_lrc_evaluate_did_not_write(tiny_teacher: Path, glue_dir: Path,
                                                                         tmp_path: Path) -> None:
    """`lrc evaluate --output` overwrote any file: a student's config.json, a cache's manifest.json."""
    from pipeline.apps.evaluate import evaluate

    data = DataConfig(task="sst2", data_dir=glue_dir)
    config = lambda output: EvaluateConfig(model_dir=tiny_teacher, data=data, output=output, device="cpu",  # noqa: E731
                                           timing_batches=1, batch_size=2, seq_length=8)
    before = (tiny_teacher / "config.json").read_bytes()
    assert_refused(lambda: evaluate(config(tiny_teacher / "config.json")), "inside the model dir")
    assert (tiny_teacher / "config.json").read_bytes() == before
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    assert_refused(lambda: evaluate(config(mine)), "not written by lrc evaluate")
    assert json.loads(mine.read_text()) == {"mine": True}
    ours = tmp_path / "eval.json"
    evaluate(config(ours))
    evaluate(config(ours))  # its own results file: replaced
    assert json.loads(ours.read_text())["written_by"] == "lrc evaluate"


def test_a_sweep_never_writes_into_a_cache(neg_cache: Path) -> None:
    """`lrc sweep -o CACHE` wrote its run folders and tables into the cache."""
    from pipeline.student.sweep import run_sweep

    base = TrainConfig(cache_dir=neg_cache, output_dir=neg_cache, device="cpu", num_workers=0)
    before = sorted(p.name for p in neg_cache.iterdir())
    assert_refused(lambda: run_sweep(SweepConfig(base=base, output_dir=neg_cache, grid=(("learning_rate", (1e-4,)),))),
                   "overlap")
    assert sorted(p.name for p in neg_cache.iterdir()) == before


def test_kinds_markers_and_older_artifacts(tmp_path: Path) -> None:
    """A marker decides the kind; an unmarked dir counts as an older lrc's artifact only if it holds nothing but
    that kind's names; another kind is refused; clear() removes only a kind's own names."""
    cache = tmp_path / "old-cache"
    (cache / "shards").mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    assert outdir.kind_of(cache) == "cache" and outdir.check(cache, "cache", overwrite=True)
    assert_refused(lambda: outdir.check(cache, "run", overwrite=False), "holds an lrc cache, not a training run")
    (cache / "thesis.tex").write_text("mine")
    assert outdir.kind_of(cache) is None  # no longer provably lrc's
    assert_refused(lambda: outdir.clear(cache, "cache"), "thesis.tex")
    assert (cache / "manifest.json").is_file()
    outdir.mark(cache, "cache")
    assert_refused(lambda: outdir.check(cache, "cache", overwrite=True), "--overwrite refused", "thesis.tex")
    assert outdir.check(cache, "cache", overwrite=False)  # reuse or resume touches nothing of the user's
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert_refused(lambda: outdir.check(afile, "run", overwrite=False), "is a file")


# --------------------------------------------------------------------------- one writer

HOLD = """
import sys, time
from pathlib import Path
from pipeline.core import outdir
with outdir.lock(Path(sys.argv[1]), "train-student"):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Two train-student processes into one -o both exited 0 with a mixed run dir. Real processes: the holder
    runs while a second one asks; after SIGKILL (no cleanup runs) its lock is recognised as stale."""
    out = tmp_path / "run"
    proc = holder(out)
    try:
        message = assert_refused(lambda: outdir.lock(out, "train-student").__enter__(), "being written by another",
                                 f"pid {proc.pid}", "train-student")
        assert str(outdir.lock_path(out)) in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert outdir.lock_path(out).is_file()  # SIGKILL left it behind
    with caplog.at_level("WARNING"), outdir.lock(out, "train-student"):
        assert json.loads(outdir.lock_path(out).read_text())["pid"] == os.getpid()
    assert "no longer running" in caplog.text
    assert not outdir.lock_path(out).exists()  # released


def test_training_into_a_dir_another_process_writes_is_refused(neg_cache: Path, tmp_path: Path) -> None:
    from pipeline.student.train import train_student

    out = tmp_path / "run"
    proc = holder(out)
    try:
        assert_refused(lambda: train_student(TrainConfig(cache_dir=neg_cache, output_dir=out, device="cpu",
                                                         num_workers=0)), "being written by another")
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # nothing written by the refused process


def test_a_lock_of_a_reused_pid_is_not_mistaken_for_a_live_holder(tmp_path: Path) -> None:
    """A stale lock whose pid now belongs to another process (here: this one, with another start time)."""
    out = tmp_path / "run"
    import socket

    outdir.lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    outdir.lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                                 "command": "extract-teacher", "proc_start": "1"}))
    if outdir._start_time(os.getpid()) is None:
        pytest.skip("no /proc: pid reuse cannot be told apart here")
    with outdir.lock(out, "train-student"):
        pass
