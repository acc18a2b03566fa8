"""`extract-teacher`: resume after a kill, bad inputs, and what an existing output dir gets (docs/DESIGN.md §3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_refused, make_tiny_teacher, sst2_lines, write_tsv
from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.teacher_config import ExtractConfig
from pipeline.teacher.extract import extract_teacher


def shard_state(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every shard: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache_dir / "shards").glob("*.arrow")}


def shard_list(manifest: dict) -> dict[str, list[tuple]]:
    return {s: [(x["file"], x["start"], x["stop"], x["bytes"], x["sha256"]) for x in v["shards"]]
            for s, v in manifest["splits"].items()}


@pytest.fixture()
def files(tmp_path: Path, glue_dir: Path) -> dict[str, Path]:
    return {"train": write_tsv(tmp_path / "train.tsv", sst2_lines(glue_dir, "train", 0, 30)),
            "dev": write_tsv(tmp_path / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 10))}


def _config(teacher: Path, files: dict[str, Path], out: Path, task: str = "sst2", **kwargs) -> ExtractConfig:
    data = DataConfig(task=task, train_file=files["train"], dev_file=files["dev"])
    return ExtractConfig(teacher=teacher, data=data, output_dir=out, shard_rows=8, device="cpu", **kwargs)


# ---------------------------------------------------------------- resume after SIGKILL


def _lrc(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli import app; app()", *args]


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_bytes(tmp_path: Path, tiny_teacher: Path, glue_dir: Path) -> None:
    train = write_tsv(tmp_path / "train.tsv", sst2_lines(glue_dir, "train", 2000, 600))
    dev = write_tsv(tmp_path / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 300))
    killed, full = tmp_path / "killed", tmp_path / "full"
    # Batches of 4 make the teacher pass long (hundreds of forward calls) next to the moment we kill it.
    cli_args = ["extract-teacher", "--teacher", str(tiny_teacher), "--task", "sst2", "--output-dir", str(killed),
                "--train-file", str(train), "--dev-file", str(dev), "--shard-rows", "64", "--batch-size", "4",
                "--device", "cpu", "--student-layers", "2"]
    # One thread: the fastest on a shared 2-core box, and the same numerics as the in-process reference below.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(_lrc(*cli_args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if list((killed / "shards").glob("train-*.arrow")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"extraction ended before it could be killed: {stderr.decode()[-500:]}"
    assert not (killed / "manifest.json").exists() and (killed / "settings.json").is_file()
    survivors = shard_state(killed)
    assert any(name.startswith("train-") for name in survivors)
    with pytest.raises(LrcError, match="incomplete"):
        open_cache(killed)

    resumed = subprocess.run(_lrc(*cli_args), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already present" in resumed.stderr
    after = shard_state(killed)
    assert {k: after[k] for k in survivors} == survivors  # complete shards were kept, not redone
    assert not list((killed / "shards").glob(".*"))  # the killed writer's temp file is gone

    # The uninterrupted run, in this process (no second start-up cost), on one thread like the CLI runs above.
    assert torch.get_num_threads() == 1
    data = DataConfig(task="sst2", train_file=train, dev_file=dev)
    b = extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=full, student_layers=2,
                                      shard_rows=64, batch_size=4, device="cpu"))
    a = json.loads((killed / "manifest.json").read_text())
    assert shard_list(a) == shard_list(b)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["splits"]["train"]["rows"] == 600 and a["splits"]["dev"]["rows"] == 300
    assert len(a["splits"]["train"]["shards"]) == 10  # 9 x 64 + 24
    open_cache(killed, check="full")


# ---------------------------------------------------------------- bad inputs: one line, nothing written


def _refused(config: ExtractConfig, *needles: str) -> str:
    message = assert_refused(lambda: extract_teacher(config), *needles)
    assert not (config.output_dir / "manifest.json").exists()
    assert not config.output_dir.exists()  # every check runs before the output dir is touched
    return message


def test_unknown_task(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    _refused(_config(tiny_teacher, files, tmp_path / "out", task="sst3"), "unknown task 'sst3'", "sst2")


def test_data_root_without_the_task(tmp_path: Path, tiny_teacher: Path) -> None:
    (tmp_path / "glue").mkdir()
    data = DataConfig(task="sst2", data_dir=tmp_path / "glue")
    config = ExtractConfig(teacher=tiny_teacher, data=data, output_dir=tmp_path / "out", device="cpu")
    _refused(config, "data file not found", str(tmp_path / "glue" / "SST-2" / "train.tsv"))


def test_label_outside_the_label_set(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path], glue_dir: Path) -> None:
    lines = sst2_lines(glue_dir, "train", 0, 5)
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t7"
    files["train"] = write_tsv(tmp_path / "bad.tsv", lines)
    _refused(_config(tiny_teacher, files, tmp_path / "out"), "label '7'", "label set", "row 3")


def test_empty_split(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    files["train"] = write_tsv(tmp_path / "empty.tsv", [])
    _refused(_config(tiny_teacher, files, tmp_path / "out"), "empty", "train")
    files["dev"] = files["train"]
    files["train"] = write_tsv(tmp_path / "one.tsv", ["a fine film . \t1"])
    _refused(_config(tiny_teacher, files, tmp_path / "out"), "empty", "dev")


def test_teacher_without_classification_head(tmp_path: Path, files: dict[str, Path], minilm_dir: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    plain = tmp_path / "plain"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(plain)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(plain)
    _refused(_config(plain, files, tmp_path / "out"), "no classification head", "finetune-teacher")
    _refused(_config(tmp_path / "nowhere", files, tmp_path / "out"), "does not exist")


def test_teacher_label_count_not_matching_the_task(tmp_path: Path, files: dict[str, Path], minilm_dir: Path,
                                                   tiny_teacher: Path) -> None:
    three = make_tiny_teacher(tmp_path / "three", minilm_dir, num_labels=3, layers=2)
    _refused(_config(three, files, tmp_path / "out"), "predicts 3 labels", "sst2 has 2")
    _refused(_config(tiny_teacher, files, tmp_path / "out", task="stsb"), "predicts 2 labels", "stsb has 1")


def test_layers_outside_the_teacher(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    _refused(_config(tiny_teacher, files, tmp_path / "out", layers=(2, 5)), "[5]", "1..4")
    _refused(_config(tiny_teacher, files, tmp_path / "out", student_layers=6), "--student-layers 6", "4 layers")
    with pytest.raises(LrcError, match="1-based"):
        _config(tiny_teacher, files, tmp_path / "out", layers=(0, 2))


def test_non_cache_output_dir_is_refused(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LrcError, match="holds no lrc cache"):
        extract_teacher(_config(tiny_teacher, files, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- an output dir that already holds a cache


def test_existing_cache_rerun_refuse_overwrite(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path],
                                               minilm_dir: Path) -> None:
    out = tmp_path / "out"
    first = extract_teacher(_config(tiny_teacher, files, out, student_layers=2))
    state = shard_state(out)
    manifest_text = (out / "manifest.json").read_text()

    # Identical settings: a no-op that returns the manifest on disk.
    again = extract_teacher(_config(tiny_teacher, files, out, student_layers=2))
    assert again == first == json.loads(manifest_text)
    assert shard_state(out) == state and (out / "manifest.json").read_text() == manifest_text

    other_teacher = make_tiny_teacher(tmp_path / "other", minilm_dir, seed=1)
    refusals = [
        (_config(other_teacher, files, out, student_layers=2), "teacher"),
        (_config(tiny_teacher, files, out, task="cola", student_layers=2), "task"),
        (_config(tiny_teacher, files, out, student_layers=4), "layers"),
        (_config(tiny_teacher, files, out, student_layers=2, max_length=64), "max_length"),
        (_config(tiny_teacher, files, out, student_layers=2, hidden_dtype="float32"), "hidden_dtype"),
        (_config(tiny_teacher, {**files, "dev": files["train"]}, out, student_layers=2), "data"),
    ]
    for config, changed in refusals:
        with pytest.raises(LrcError, match="other settings") as err:
            extract_teacher(config)
        assert changed in str(err.value).split("differs in:")[1] and "--overwrite" in str(err.value)
        assert shard_state(out) == state and (out / "manifest.json").read_text() == manifest_text
    open_cache(out, check="full")

    replaced = extract_teacher(_config(tiny_teacher, files, out, student_layers=4, overwrite=True))
    assert replaced["layers"] == [1, 2, 3, 4] and first["layers"] == [2, 4]
    assert json.loads((out / "manifest.json").read_text()) == replaced
    assert set(open_cache(out, check="full").split("train").reader().example(0)["hidden"]) == {1, 2, 3, 4}


def test_unfinished_cache_with_other_settings_is_refused(tmp_path: Path, tiny_teacher: Path,
                                                         files: dict[str, Path]) -> None:
    out = tmp_path / "out"
    extract_teacher(_config(tiny_teacher, files, out))
    (out / "manifest.json").unlink()  # as if killed before the manifest
    with pytest.raises(LrcError, match="other settings"):
        extract_teacher(_config(tiny_teacher, files, out, max_length=32))
    assert not (out / "manifest.json").exists()
    # The same settings finish it without redoing a shard.
    state = shard_state(out)
    extract_teacher(_config(tiny_teacher, files, out))
    assert shard_state(out) == state
    open_cache(out, check="full")


def test_resume_re_extracts_a_corrupted_shard_instead_of_blessing_it(tmp_path: Path, tiny_teacher: Path,
                                                                   files: dict[str, Path]) -> None:
    """A killed run's shards are checked against the sidecar written with each before they are trusted."""
    out = tmp_path / "out"
    clean = extract_teacher(_config(tiny_teacher, files, out))
    (out / "manifest.json").unlink()  # as if killed before the end
    shard = out / clean["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (out / "shards" / "dev-000000000-000000008.sha256.json").unlink()  # a shard without its record: not trusted
    resumed = extract_teacher(_config(tiny_teacher, files, out))
    assert shard_list(resumed) == shard_list(clean)  # both extracted again, to the same bytes
    open_cache(out, check="full")
