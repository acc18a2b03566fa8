"""pipeline/core/atomic.py: a file or model dir is the old one or the whole new one, and a failed write leaves no temp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core import atomic, outdir


class Boom(Exception):
    pass


def test_write_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic.write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic.replacing(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".state.bin.tmp-")
            tmp.write_bytes(b"half of the new")
            raise Boom
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    # the same for the text writer when the text cannot be encoded half way through
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "fine so far \ud800")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_block_that_writes_nothing_fails_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic.replacing(path):
            pass
    assert path.read_text() == "old"


class Saveable:
    """Stands for a model or tokenizer: `save_pretrained` writes its files, or fails after the first."""

    def __init__(self, files: dict[str, str], fail_after: int | None = None) -> None:
        self.files, self.fail_after = files, fail_after

    def save_pretrained(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        for i, (name, text) in enumerate(self.files.items()):
            if self.fail_after is not None and i >= self.fail_after:
                raise Boom("disk full")
            (Path(path) / name).write_text(text)


def test_a_model_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "teacher_weights"
    with pytest.raises(Boom):
        atomic.save_pretrained(final, Saveable({"config.json": "{}", "model.safetensors": "w"}, fail_after=1))
    assert list(tmp_path.iterdir()) == []  # neither the dir nor its staging dir
    atomic.save_pretrained(final, Saveable({"config.json": "{}", "model.safetensors": "w"}),
                           Saveable({"tokenizer.json": "t"}))
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_weights"]


def test_a_staging_dir_left_by_a_killed_run_is_never_published(tmp_path: Path) -> None:
    final = tmp_path / "out"
    stale = atomic.staging_name(final)
    stale.mkdir()
    (stale / "half.bin").write_text("from a run that was killed")
    atomic.save_pretrained(final, Saveable({"config.json": "{}"}))
    assert sorted(p.name for p in final.iterdir()) == ["config.json"] and not stale.exists()


def test_publish_replaces_only_what_the_caller_empties(tmp_path: Path) -> None:
    final = tmp_path / "export"
    outdir.mark(final, "export")
    (final / "model.onnx").write_text("old")
    with atomic.staging_dir(final) as tmp, pytest.raises(OSError):
        (tmp / "model.onnx").write_text("new")
        atomic.publish_dir(tmp, final)  # not empty, and nothing said how to empty it
    assert (final / "model.onnx").read_text() == "old"
    with atomic.staging_dir(final) as tmp:
        (tmp / "model.onnx").write_text("new")
        atomic.publish_dir(tmp, final, empty=lambda path: outdir.clear(path, "export"))
    assert (final / "model.onnx").read_text() == "new" and not atomic.staging_name(final).exists()


def test_move_files_puts_the_picked_ones_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ready, dest = tmp_path / "ready", tmp_path / "run"
    ready.mkdir()
    dest.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (ready / name).write_text(name)
    moved: list[str] = []
    real = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: moved.append(Path(a).name) or real(a, b))
    atomic.move_files(ready, dest, last=lambda path: path.suffix == ".safetensors")
    assert moved[-1] == "model.safetensors" and sorted(moved) == sorted(p.name for p in dest.iterdir())
    assert list(ready.iterdir()) == []


def test_outdir_counts_the_temp_names_as_its_own(tmp_path: Path) -> None:
    """`--overwrite` may remove what a killed write left, and nothing else."""
    run = tmp_path / "run"
    outdir.mark(run, "run")
    (run / "train_config.json").write_text("{}")
    atomic.temp_file(run / "train_config.json").write_text("half")
    atomic.staging_name(run / "student").mkdir()
    assert outdir.foreign_entries(run, "run") == []
    (run / "notes.txt").write_text("mine")
    assert outdir.foreign_entries(run, "run") == ["notes.txt"]
