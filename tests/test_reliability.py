"""Faults that cross the stages (docs/RELIABILITY.md): model dirs that are damaged, foreign or run code,
and a full or read-only disk, each refused in one line with nothing a later stage would trust left behind.

Stage-specific faults live beside their module's tests (test_cache, test_checkpoint, test_negatives,
test_tasks, test_train, test_sweep, test_finetune).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.apps.evaluate import evaluate
from pipeline.core.apps_config import EvaluateConfig
from pipeline.core.config import DataConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.teacher.extract import extract_teacher
from conftest import REPO, assert_refused, make_tiny_teacher, sst2_lines, write_tsv


@pytest.fixture()
def files(tmp_path: Path, glue_dir: Path) -> dict[str, Path]:
    return {"train": write_tsv(tmp_path / "train.tsv", sst2_lines(glue_dir, "train", 0, 12)),
            "dev": write_tsv(tmp_path / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 6))}


def _extract(teacher: Path, files: dict[str, Path], out: Path, task: str = "sst2", **kwargs) -> ExtractConfig:
    data = DataConfig(task=task, train_file=files["train"], dev_file=files["dev"])
    return ExtractConfig(teacher=teacher, data=data, output_dir=out, student_layers=2, shard_rows=8, device="cpu",
                         **kwargs)


def _evaluate(model: Path, files: dict[str, Path], task: str = "sst2", **kwargs) -> EvaluateConfig:
    return EvaluateConfig(model_dir=model, data=DataConfig(task=task, dev_file=files["dev"]), timing_batches=1,
                          batch_size=2, seq_length=8, device="cpu", **kwargs)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- model dirs


def test_teacher_without_tokenizer_files_is_refused(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    """transformers would build a tokenizer of 5 special tokens: every word [UNK], exit 0."""
    bare = _copy(tiny_teacher, tmp_path / "bare")
    for name in os.listdir(bare):
        if name not in ("config.json", "model.safetensors"):
            os.remove(bare / name)
    out = tmp_path / "out"
    assert_refused(lambda: extract_teacher(_extract(bare, files, out)), "no tokenizer files", "[UNK]", str(bare))
    assert not out.exists()
    assert_refused(lambda: evaluate(_evaluate(bare, files)), "no tokenizer files")


def test_teacher_of_another_task_is_refused_unless_allowed(tmp_path: Path, tiny_teacher: Path,
                                                           files: dict[str, Path], glue_dir: Path) -> None:
    teacher = _copy(tiny_teacher, tmp_path / "teacher")
    (teacher / "teacher_info.json").write_text(json.dumps({"task": "sst2"}))
    out = tmp_path / "out"
    config = _extract(teacher, files, out, task="cola")  # sentence + 0/1 label files read the same under cola
    assert_refused(lambda: extract_teacher(config), "trained on sst2", "not cola", "--allow-task-mismatch")
    assert not out.exists()
    from dataclasses import replace

    manifest = extract_teacher(replace(config, allow_task_mismatch=True))  # a deliberate transfer
    assert manifest["task"]["name"] == "cola"
    assert_refused(lambda: evaluate(_evaluate(teacher, files, task="mrpc")), "trained on sst2", "not mrpc")
    # mnli and mnli-mm are one task: its two dev sets
    (teacher / "teacher_info.json").write_text(json.dumps({"task": "mnli"}))
    from pipeline.core.runtime import check_recorded_task

    check_recorded_task(teacher, "mnli-mm", "teacher", allow=False)


def test_non_finite_weights_are_refused_where_loaded(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    broken = _copy(tiny_teacher, tmp_path / "nan")
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if k.endswith("intermediate.dense.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(lambda: extract_teacher(_extract(broken, files, out)), "non-finite weights", key, str(broken))
    assert not out.exists()
    assert_refused(lambda: evaluate(_evaluate(broken, files)), "non-finite weights", key)


def test_hidden_states_beyond_float16_are_refused_by_row(tmp_path: Path, tiny_teacher: Path,
                                                         files: dict[str, Path]) -> None:
    """Finite weights whose activations exceed float16's range: the stored states would be inf."""
    from safetensors.torch import load_file, save_file

    loud = _copy(tiny_teacher, tmp_path / "loud")
    weights = load_file(loud / "model.safetensors")
    weights["bert.encoder.layer.3.output.LayerNorm.weight"].fill_(1e6)  # layer 4 outputs ~1e6 > 65504
    save_file(weights, loud / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(lambda: extract_teacher(_extract(loud, files, out)), "non-finite hidden states at layer 4",
                   "train row(s) 0", "--hidden-dtype float32")
    assert not (out / "manifest.json").exists() and not list((out / "shards").glob("train-*"))
    manifest = extract_teacher(_extract(loud, files, tmp_path / "out32", hidden_dtype="float32"))
    assert manifest["hidden_dtype"] == "float32"


def _nan_on_banana(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny encoder whose float32 states are NaN in every row holding the word "banana" and finite elsewhere:
    with no position or segment embeddings and layer_norm_eps 0, banana's constant embedding has variance 0,
    its LayerNorm divides 0 by 0, and attention spreads the NaN over the row (and no further). [PAD]'s embedding
    (zeros: constant too) is made random, or the padding of every short row would be NaN as well."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, layer_norm_eps=0.0))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        words = model.embeddings.word_embeddings.weight
        words[tokenizer.convert_tokens_to_ids("banana")] = 1.0
        words[tokenizer.pad_token_id] = torch.randn(words.shape[1])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("hidden_dtype", ["int8", "float16"])
def test_non_finite_hidden_states_are_refused_by_row_and_layer(tmp_path: Path, minilm_dir: Path,
                                                               hidden_dtype: str) -> None:
    """A corpus cache (no logits, so the hidden states are what is checked) of a teacher that gives NaN on known rows.
    Catches: the int8 check reading the int8 values (always finite) instead of the scales, which then blames
    the pooled vectors and names no layer."""
    from pipeline.core.teacher_config import CorpusConfig

    teacher = _nan_on_banana(tmp_path / "teacher", minilm_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a gripping film\nbanana bread for everyone\nquiet and slow\nthe banana stand\n")
    out = tmp_path / "out"
    config = ExtractConfig(teacher=teacher, data=None, output_dir=out, student_layers=2, max_length=16, shard_rows=8,
                           device="cpu", hidden_dtype=hidden_dtype, corpus=CorpusConfig(str(corpus)))
    assert_refused(lambda: extract_teacher(config),
                   "non-finite hidden states at layer 2 for train row(s) 1, 3 (2 in all)", f"--hidden-dtype {hidden_dtype}")
    assert not list((out / "shards").glob("train-*"))


def test_truncated_weights_file_is_one_line(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    cut = _copy(tiny_teacher, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(lambda: extract_teacher(_extract(cut, files, tmp_path / "out")), str(cut), "could not be loaded",
                   "truncated")
    assert_refused(lambda: evaluate(_evaluate(cut, files)), "could not be loaded")


@pytest.mark.slow
def test_remote_code_never_runs_even_with_a_piped_yes(tmp_path: Path, tiny_teacher: Path,
                                                      files: dict[str, Path]) -> None:
    """A teacher dir whose config maps to its own Python: transformers asks on the terminal unless told."""
    evil = _copy(tiny_teacher, tmp_path / "evil")
    marker = tmp_path / "ran"
    config = json.loads((evil / "config.json").read_text())
    config |= {"model_type": "evilbert", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForSequenceClassification": "evil.EvilModel"}}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                  "from transformers import BertConfig\nclass EvilConfig(BertConfig):\n"
                                  "    model_type = 'evilbert'\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from cli import app; app()", "extract-teacher", "--teacher", str(evil), "--task",
           "sst2", "-o", str(out), "--train-file", str(files["train"]), "--dev-file", str(files["dev"]),
           "--device", "cpu"]
    result = subprocess.run(cmd, cwd=REPO, input="y\ny\n", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not marker.exists(), "the teacher dir's code ran"
    assert result.returncode == 1 and "--trust-remote-code" in result.stderr.splitlines()[-1], result.stderr[-800:]
    assert not out.exists()


# ---------------------------------------------------------------- evaluate


def test_evaluate_on_an_unfinished_run_and_a_directory_output(tmp_path: Path, tiny_teacher: Path,
                                                             files: dict[str, Path]) -> None:
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    assert_refused(lambda: evaluate(_evaluate(run, files)), "has not saved a student yet", "--resume")
    (tmp_path / "results").mkdir()
    assert_refused(lambda: evaluate(_evaluate(tiny_teacher, files, output=tmp_path / "results")), "is a directory")
    assert_refused(lambda: evaluate(_evaluate(tiny_teacher, files, output=tmp_path / "no" / "r.json")), "does not exist")
    evaluate(_evaluate(tiny_teacher, files, output=tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["task"] == "sst2"
    assert sorted(p.name for p in tmp_path.glob(".r.json*")) == []


# ---------------------------------------------------------------- a full or read-only disk


def _cli(args: list[str], preexec=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from cli import app; app()", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env, preexec_fn=preexec)


def _file_size_limit(limit: int):
    """A process whose writes stop at `limit` bytes per file (EFBIG, as a full disk gives ENOSPC)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_full_disk_mid_extraction_leaves_nothing_to_trust(tmp_path: Path, tiny_teacher: Path,
                                                          files: dict[str, Path], glue_dir: Path) -> None:
    files["train"] = write_tsv(tmp_path / "big.tsv", sst2_lines(glue_dir, "train", 0, 1500))
    out = tmp_path / "cache"
    args = ["extract-teacher", "--teacher", str(tiny_teacher), "--task", "sst2", "-o", str(out), "--train-file",
            str(files["train"]), "--dev-file", str(files["dev"]), "--device", "cpu", "--shard-rows", "1500",
            "--layers", "all", "--hidden-dtype", "float32"]
    # 100 kB: the teacher weights copied into the cache (4 MB) do not fit; 6 MB: they do, the 10 MB shard does not
    for limit in (100_000, 6_000_000):
        result = _cli(args, _file_size_limit(limit))
        assert result.returncode == 1, result.stderr[-1500:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot write") and "File too large" in last and "Traceback" not in result.stderr
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temp file or dir, no half-written shard
        assert not list(out.glob("shards/train-*.arrow"))
    resumed = _cli(args)  # space freed: the same command finishes the cache
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    from pipeline.cache.reader import open_cache

    open_cache(out, check="full")


def _lock(path: Path, locked: bool) -> bool:
    """Make a dir unwritable (chmod; for root, which ignores modes, the immutable attribute); False if impossible."""
    if os.getuid() != 0:
        path.chmod(0o555 if locked else 0o755)
        return True
    return subprocess.run(["chattr", "+i" if locked else "-i", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_read_only_output_is_one_line(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _lock(locked, True):
        pytest.skip("cannot make a dir read-only here (root without chattr)")
    try:
        args = ["extract-teacher", "--teacher", str(tiny_teacher), "--task", "sst2", "-o", str(locked / "cache"),
                "--train-file", str(files["train"]), "--dev-file", str(files["dev"]), "--device", "cpu"]
        result = _cli(args)
        assert list(locked.iterdir()) == []
    finally:
        _lock(locked, False)
    assert result.returncode == 1, result.stderr[-1500:]
    last = result.stderr.strip().splitlines()[-1]
    # The first write is the lock file beside the cache dir; the message names it and where the cache would go.
    assert last.startswith(f"error: cannot write {locked}/") and "Traceback" not in result.stderr, last
    assert "writable output location" in last, last


def test_nan_scores_never_reach_a_cache(tmp_path: Path, tiny_teacher: Path, files: dict[str, Path],
                                        minilm_dir: Path) -> None:
    """The loader refuses a NaN STS-B score, so no stage downstream ever sees one."""
    reg = make_tiny_teacher(tmp_path / "reg", minilm_dir, num_labels=1, layers=2)
    lines = ["a man is playing a guitar .\ta man plays guitar .\t4.2", "a dog runs .\tthe cat sleeps .\tnan"]
    train = write_tsv(tmp_path / "sts.tsv", lines, header="sentence1\tsentence2\tlabel")
    data = DataConfig(task="stsb", train_file=train, dev_file=train)
    out = tmp_path / "out"
    assert_refused(lambda: extract_teacher(ExtractConfig(teacher=reg, data=data, output_dir=out, student_layers=2, device="cpu")),
                   str(train), "row 1", "'nan'", "not a finite number")
    assert not out.exists()


def test_all_finite_reads_exponent_bits_right() -> None:
    import numpy as np

    from pipeline.core.runtime import all_finite

    for dtype in (np.float16, np.float32, np.float64):
        values = np.random.default_rng(0).standard_normal((6, 8)).astype(dtype)
        edge = np.array([np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny, 0.0, -0.0], dtype)
        assert all_finite(values) and all_finite(edge) and all_finite(values[:, ::3])
        for bad in (np.nan, np.inf, -np.inf):
            poisoned = values.copy()
            poisoned[4, 5] = bad
            assert not all_finite(poisoned) and not all_finite(torch.from_numpy(poisoned))
            assert not all_finite(poisoned[:, 1::2])  # a strided view holding it


def test_a_tokenizer_larger_than_the_embeddings_is_one_line(tmp_path: Path, minilm_dir: Path,
                                                            files: dict[str, Path]) -> None:
    """A model whose embeddings hold 1000 rows beside the 30522-token bert-base tokenizer: the first batch used to
    end in an IndexError traceback ("index out of range in self") mid-extraction."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.core.teacher_config import FinetuneConfig
    from pipeline.teacher.finetune import finetune_teacher

    small = tmp_path / "small-vocab"
    BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, num_labels=2)).save_pretrained(small)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(small)
    out = tmp_path / "out"
    for call in (lambda: extract_teacher(_extract(small, files, out)), lambda: evaluate(_evaluate(small, files)),
                 lambda: finetune_teacher(FinetuneConfig(data=DataConfig(task="sst2", train_file=files["train"],
                                                                         dev_file=files["dev"]),
                                                         output_dir=tmp_path / "teacher", backbone=str(small),
                                                         device="cpu"))):
        assert_refused(call, str(small), "30522 tokens", "embeddings hold 1000", "resize_token_embeddings")
    assert not out.exists() and not (tmp_path / "teacher").exists()


def test_a_max_length_beyond_the_models_positions_is_refused_before_work(tmp_path: Path, tiny_teacher: Path,
                                                                         files: dict[str, Path]) -> None:
    """The tiny teacher has 128 positions: --max-length 256 only failed once an example longer than 128 tokens came
    (a size-mismatch traceback mid-extraction), and --seq-length 256 in the timing batches of evaluate."""
    out = tmp_path / "out"
    assert_refused(lambda: extract_teacher(_extract(tiny_teacher, files, out, max_length=256)),
                   "--max-length 256 is longer than the teacher reads (128 positions)")
    assert not out.exists()
    assert_refused(lambda: evaluate(_evaluate(tiny_teacher, files, max_length=256)), "--max-length 256", "128 positions")
    from dataclasses import replace

    assert_refused(lambda: evaluate(replace(_evaluate(tiny_teacher, files), seq_length=256)), "--seq-length 256",
                   "128 positions")
