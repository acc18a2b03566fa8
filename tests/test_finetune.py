"""`finetune-teacher`: a loadable teacher with its dev metric; reuse, refusal; and the real MiniLM path."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.teacher_config import ExtractConfig, FinetuneConfig
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.finetune import TEACHER_INFO, finetune_teacher
from conftest import assert_refused


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def glue_rows(path: Path, columns: list[str], count: int) -> list[list[str]]:
    """The first `count` rows of a real GLUE TSV, projected onto `columns` (quoting off, as GLUE needs)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = next(reader)
        return [[row[names.index(c)] for c in columns] for _, row in zip(range(count), reader)]


@torch.no_grad()
def predict_one_by_one(teacher: Path, texts: list[tuple[str, ...]], max_length: int) -> np.ndarray:
    """The saved teacher, loaded the standard way, run unpadded on each example: (N, C) logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    out = [model(**tokenizer(*t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0].numpy()
           for t in texts]
    return np.stack(out)


@pytest.fixture(scope="module")
def plain_backbone(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A small random BertModel without any head (what a user brings as --backbone)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sst2_dev(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    rows = glue_rows(glue_dir / "SST-2" / "dev.tsv", ["sentence", "label"], 64)
    return write_rows(tmp_path_factory.mktemp("dev") / "dev.tsv", ["sentence", "label"], rows)


def _sst2_config(backbone: Path, glue_dir: Path, dev: Path, out: Path, **kwargs) -> FinetuneConfig:
    data = DataConfig(task="sst2", data_dir=glue_dir, dev_file=dev, max_train_examples=128)
    return FinetuneConfig(data=data, output_dir=out, backbone=str(backbone), max_length=64, epochs=1.0,
                          batch_size=16, learning_rate=1e-3, device="cpu", **kwargs)


def test_sst2_teacher_is_loadable_and_records_its_dev_metric(tmp_path: Path, plain_backbone: Path, glue_dir: Path,
                                                             sst2_dev: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = tmp_path / "teacher"
    info = finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out))
    assert not (tmp_path / ".teacher.tmp").exists()

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 2 and config.problem_type == "single_label_classification"
    assert {int(k): v for k, v in config.id2label.items()} == {0: "0", 1: "1"}
    assert any(a.endswith("ForSequenceClassification") for a in config.architectures)

    saved = json.loads((out / TEACHER_INFO).read_text())
    assert saved == info
    assert info["task"] == "sst2" and info["main_metric"] == "accuracy"
    assert info["train_examples"] == 128 and info["dev_examples"] == 64 and info["dev_metrics"]["epoch"] == 1

    # The recorded accuracy is the saved model's accuracy on the dev rows, recomputed here independently.
    rows = glue_rows(sst2_dev, ["sentence", "label"], 64)
    logits = predict_one_by_one(out, [(s,) for s, _ in rows], max_length=64)
    labels = np.array([int(y) for _, y in rows])
    mine = float(np.mean(logits.argmax(1) == labels))
    assert abs(info["dev_metrics"]["accuracy"] - mine) <= 1 / 64 + 1e-9

    # Training really moved the encoder away from the backbone.
    before, after = load_file(plain_backbone / "model.safetensors"), load_file(out / "model.safetensors")
    key = next(k for k in before if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.equal(before[key], after["bert." + key if not key.startswith("bert.") else key])


def test_training_learns_and_keeps_the_best_epoch(tmp_path: Path, plain_backbone: Path, glue_dir: Path) -> None:
    """Dev = train: a working loop (inputs aligned with their labels) memorises 128 real rows."""
    rows = glue_rows(glue_dir / "SST-2" / "train.tsv", ["sentence", "label"], 128)
    train = write_rows(tmp_path / "train.tsv", ["sentence", "label"], rows)
    out = tmp_path / "teacher"
    info = finetune_teacher(FinetuneConfig(
        data=DataConfig(task="sst2", train_file=train, dev_file=train), output_dir=out, backbone=str(plain_backbone),
        max_length=64, epochs=10.0, batch_size=16, learning_rate=2e-3, device="cpu",
    ))
    assert info["dev_metrics"]["accuracy"] >= 0.95 and 1 <= info["dev_metrics"]["epoch"] <= 10
    logits = predict_one_by_one(out, [(s,) for s, _ in rows], max_length=64)
    mine = float(np.mean(logits.argmax(1) == np.array([int(y) for _, y in rows])))
    assert abs(info["dev_metrics"]["accuracy"] - mine) <= 1 / 128 + 1e-9  # the saved model is the best epoch's


def test_rerun_reuses_other_settings_refuse_overwrite_replaces(tmp_path: Path, plain_backbone: Path, glue_dir: Path,
                                                              sst2_dev: Path) -> None:
    out = tmp_path / "teacher"
    first = finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out))
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    assert finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out)) == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(LrcError, match="other settings") as err:
        finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out, seed=7))
    assert "\n" not in str(err.value) and "seed (was" in str(err.value) and "--overwrite" in str(err.value)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    replaced = finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out, seed=7, overwrite=True))
    assert replaced["settings"]["seed"] == 7
    assert json.loads((out / TEACHER_INFO).read_text())["settings"]["seed"] == 7


def test_refuses_a_foreign_output_dir_and_bad_inputs(tmp_path: Path, plain_backbone: Path, glue_dir: Path,
                                                     sst2_dev: Path) -> None:
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LrcError, match="holds no lrc teacher"):
        finetune_teacher(_sst2_config(plain_backbone, glue_dir, sst2_dev, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(LrcError, match="unknown task"):
        finetune_teacher(FinetuneConfig(data=DataConfig(task="nope"), output_dir=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_stsb_teacher_is_a_regression_head(tmp_path: Path, plain_backbone: Path, glue_dir: Path) -> None:
    from transformers import AutoConfig

    pairs = glue_rows(glue_dir / "STS-B" / "dev.tsv", ["sentence1", "sentence2", "score"], 48)
    dev = write_rows(tmp_path / "dev.tsv", ["sentence1", "sentence2", "label"], pairs)
    data = DataConfig(task="stsb", data_dir=glue_dir, dev_file=dev, max_train_examples=96)
    out = tmp_path / "teacher"
    info = finetune_teacher(FinetuneConfig(data=data, output_dir=out, backbone=str(plain_backbone), max_length=64,
                                           epochs=1.0, batch_size=16, learning_rate=1e-3, device="cpu"))
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.problem_type == "regression"
    assert info["main_metric"] == "pearson" and set(info["dev_metrics"]) >= {"pearson", "spearman"}

    scores = predict_one_by_one(out, [(a, b) for a, b, _ in pairs], max_length=64)
    assert scores.shape == (48, 1)
    labels = np.array([float(y) for _, _, y in pairs])
    assert info["dev_metrics"]["pearson"] == pytest.approx(np.corrcoef(scores[:, 0], labels)[0, 1], abs=1e-4)

    # extract-teacher takes it: float labels and one regression output per row.
    cache_dir = tmp_path / "cache"
    extract_teacher(ExtractConfig(teacher=out, data=DataConfig(task="stsb", data_dir=glue_dir, dev_file=dev,
                                                               max_train_examples=16),
                                  output_dir=cache_dir, student_layers=1, device="cpu", max_length=64))
    dev_split = open_cache(cache_dir).split("dev")
    np.testing.assert_allclose(dev_split.logits(), scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dev_split.labels(), labels.astype(np.float32))


# ---------------------------------------------------------------- the real backbone


@pytest.mark.slow
@pytest.mark.integration
def test_minilm_teacher_then_cache_size_rule(tmp_path: Path, minilm_dir: Path, glue_dir: Path) -> None:
    rows = glue_rows(glue_dir / "SST-2" / "dev.tsv", ["sentence", "label"], 128)
    dev = write_rows(tmp_path / "dev.tsv", ["sentence", "label"], rows)
    teacher = tmp_path / "teacher"
    info = finetune_teacher(FinetuneConfig(
        data=DataConfig(task="sst2", data_dir=glue_dir, dev_file=dev, max_train_examples=256),
        output_dir=teacher, backbone=str(minilm_dir), max_length=64, epochs=1.0, batch_size=32, device="cpu",
    ))
    accuracy = info["dev_metrics"]["accuracy"]
    assert info["dev_examples"] == 128 and info["train_examples"] == 256 and 0.0 <= accuracy <= 1.0

    out = tmp_path / "cache"
    manifest = extract_teacher(ExtractConfig(
        teacher=teacher, data=DataConfig(task="sst2", data_dir=glue_dir, dev_file=dev, max_train_examples=128),
        output_dir=out, student_layers=4, max_length=64, device="cpu",
    ))
    assert manifest["layers"] == [2, 3, 5, 6] and manifest["hidden_size"] == 384
    assert manifest["teacher"]["num_layers"] == 6

    c = open_cache(out, check="full")
    # The teacher's recorded dev accuracy is what its cached dev logits give.
    dev_split = c.split("dev")
    cached = float(np.mean(dev_split.logits().argmax(1) == dev_split.labels()))
    # (8 steps do not lift MiniLM above chance: its [CLS] barely differs between sentences, docs/DESIGN.md §3.)
    assert abs(cached - accuracy) <= 1 / 128 + 1e-9

    # Size rule: bytes per example <= 1.05 x tokens x stored layers x d' x 2 (no padding, fp16).
    train = manifest["splits"]["train"]
    tokens = sum(len(c.split("train").reader().example(i)["input_ids"]) for i in range(train["rows"]))
    on_disk = sum((out / s["file"]).stat().st_size for s in train["shards"])
    assert on_disk == train["bytes"]
    ideal = tokens * 4 * 384 * 2
    assert on_disk <= 1.05 * ideal, (on_disk, ideal)
    assert on_disk >= ideal  # the hidden states really are all there


def test_a_diverging_fine_tuning_saves_nothing(tmp_path: Path, plain_backbone: Path, glue_dir: Path) -> None:
    """An absurd --lr used to write an all-NaN teacher with exit 0 (which evaluate then scored)."""
    out = tmp_path / "teacher"
    config = FinetuneConfig(data=DataConfig(task="stsb", data_dir=glue_dir, max_train_examples=32), output_dir=out,
                            backbone=str(plain_backbone), epochs=1, batch_size=8, learning_rate=1e30, device="cpu",
                            max_length=32)
    assert_refused(lambda: finetune_teacher(config), "loss is nan", "--lr 1e+30", "nothing was saved")
    assert not out.exists() and not list(tmp_path.glob(".teacher*"))


def test_a_backbone_without_tokenizer_files_is_refused(tmp_path: Path, plain_backbone: Path, glue_dir: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(plain_backbone, bare)
    for path in bare.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    config = FinetuneConfig(data=DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=16),
                            output_dir=tmp_path / "t", backbone=str(bare), device="cpu")
    assert_refused(lambda: finetune_teacher(config), "backbone", "no tokenizer files")
