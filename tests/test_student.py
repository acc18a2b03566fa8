"""The student: config shape and labels, the three initialisations, and the COS-NCE projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import assert_refused
from pipeline.core.errors import LrcError
from pipeline.student.model import Projections, build_student, init_shape, student_config

# What a cache manifest holds about its teacher and task (the fields student_config reads).
TEACHER = {"vocab_size": 30522, "max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": 0}
SST2 = {"name": "sst2", "labels": ["negative", "positive"], "num_labels": 2, "is_regression": False}
STSB = {"name": "stsb", "labels": None, "num_labels": 1, "is_regression": True}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- student_config


def test_student_config_shape_and_labels() -> None:
    config = student_config(TEACHER, layers=4, hidden=312, heads=12, intermediate=1200, task=SST2)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        4, 312, 12, 1200)
    # vocabulary, positions and segments come from the teacher, so the cached input ids fit
    assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size) == (30522, 128, 2)
    assert config.num_labels == 2
    assert config.id2label == {0: "negative", 1: "positive"}
    assert config.label2id == {"negative": 0, "positive": 1}
    assert config.problem_type == "single_label_classification"
    model = BertForSequenceClassification(config)
    assert model.classifier.out_features == 2
    assert model.bert.embeddings.word_embeddings.weight.shape == (30522, 312)
    assert len(model.bert.encoder.layer) == 4
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (1200, 312)


def test_student_config_regression() -> None:
    config = student_config(TEACHER, layers=2, hidden=64, heads=4, intermediate=128, task=STSB)
    assert config.num_labels == 1
    assert config.id2label == {0: "score"}
    assert config.problem_type == "regression"


def test_student_config_defaults_for_missing_teacher_fields() -> None:
    config = student_config({"vocab_size": 100}, layers=1, hidden=8, heads=2, intermediate=16, task=SST2)
    assert (config.max_position_embeddings, config.type_vocab_size, config.pad_token_id) == (512, 2, 0)


def test_student_config_hidden_not_divisible_by_heads() -> None:
    with pytest.raises(LrcError) as err:
        student_config(TEACHER, layers=4, hidden=310, heads=12, intermediate=1200, task=SST2)
    message = str(err.value)
    assert "\n" not in message and "310" in message and "12" in message and "divisible" in message


# --------------------------------------------------------------------------- build_student


def test_build_student_random() -> None:
    config = student_config(TEACHER, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    torch.manual_seed(0)
    a = build_student(config, "random", None, [2, 4])
    torch.manual_seed(0)
    b = build_student(config, "random", None, [2, 4])
    _same_state(a, b)  # seeded: reproducible
    assert isinstance(a, BertForSequenceClassification)
    assert len(a.bert.encoder.layer) == 2 and a.config.hidden_size == 16
    assert a.config.id2label == {0: "negative", 1: "positive"}


def test_build_student_from_teacher(tiny_teacher: Path) -> None:
    teacher = BertForSequenceClassification.from_pretrained(tiny_teacher)  # 4 layers x 32, 4 heads, FFN 64
    # the teacher's width, heads and FFN: every channel kept (narrower students: tests/test_select.py)
    config = student_config(TEACHER, layers=2, hidden=32, heads=4, intermediate=64, task=SST2)
    student = build_student(config, "teacher", tiny_teacher, [2, 4])
    assert student.config.num_attention_heads == 4 and student.config.intermediate_size == 64
    assert student.config.num_hidden_layers == 2
    assert student.config.id2label == {0: "negative", 1: "positive"}
    _same_state(student.bert.embeddings, teacher.bert.embeddings)
    _same_state(student.bert.encoder.layer[0], teacher.bert.encoder.layer[1])  # student layer 1 <- teacher 2
    _same_state(student.bert.encoder.layer[1], teacher.bert.encoder.layer[3])  # student layer 2 <- teacher 4
    _same_state(student.bert.pooler, teacher.bert.pooler)
    _same_state(student.classifier, teacher.classifier)
    # and it computes what a teacher cut down to those layers computes
    teacher.bert.encoder.layer = torch.nn.ModuleList([teacher.bert.encoder.layer[1], teacher.bert.encoder.layer[3]])
    teacher.eval(), student.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-6)


def test_build_student_from_teacher_wider_than_it(tiny_teacher: Path) -> None:
    config = student_config(TEACHER, layers=2, hidden=48, heads=4, intermediate=32, task=SST2)
    with pytest.raises(LrcError) as err:
        build_student(config, "teacher", tiny_teacher, [2, 4])
    message = str(err.value)
    assert "\n" not in message and "--hidden gives 48" in message and "at most 32" in message


def test_build_student_from_teacher_without_weights(tmp_path: Path) -> None:
    config = student_config(TEACHER, layers=2, hidden=32, heads=4, intermediate=64, task=SST2)
    for weights in (None, tmp_path / "missing"):
        with pytest.raises(LrcError, match="teacher weights"):
            build_student(config, "teacher", weights, [2, 4])


def test_build_student_from_model_dir(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = student_config(TEACHER, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    saved = BertForSequenceClassification(config)
    saved.save_pretrained(tmp_path / "same")
    student = build_student(config, str(tmp_path / "same"), None, [2, 4])
    _same_state(student, saved)

    # a model with another head (3 labels): the body is kept, the head is rebuilt for the task's labels
    other = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 3,
                                                        "id2label": {0: "a", 1: "b", 2: "c"},
                                                        "label2id": {"a": 0, "b": 1, "c": 2}}))
    other.save_pretrained(tmp_path / "three")
    student = build_student(config, str(tmp_path / "three"), None, [2, 4])
    _same_state(student.bert, other.bert)
    assert student.classifier.out_features == 2
    assert student.config.id2label == {0: "negative", 1: "positive"}


def test_model_dir_decides_the_students_depth_and_width(tmp_path: Path) -> None:
    # the layer map and the projections follow the checkpoint, not --layers/--hidden
    deeper = student_config(TEACHER, layers=3, hidden=24, heads=2, intermediate=32, task=SST2)
    BertForSequenceClassification(deeper).save_pretrained(tmp_path / "deeper")
    assert init_shape(str(tmp_path / "deeper"), 2, 16) == (3, 24)
    assert init_shape("random", 2, 16) == init_shape("teacher", 2, 16) == (2, 16)
    config = student_config(TEACHER, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    student = build_student(config, str(tmp_path / "deeper"), None, [1, 2, 4])
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 24
    assert_refused(lambda: init_shape(str(tmp_path / "deeper"), 2, 16, family="roberta"),
                   "is a bert model", "--student-family is roberta")


def test_build_student_from_model_dir_with_other_vocabulary(tmp_path: Path) -> None:
    config = student_config(TEACHER, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    small = student_config({**TEACHER, "vocab_size": 1000}, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    BertForSequenceClassification(small).save_pretrained(tmp_path / "small")
    with pytest.raises(LrcError, match="vocabulary of 1000"):
        build_student(config, str(tmp_path / "small"), None, [2, 4])


def test_build_student_bad_init(tmp_path: Path) -> None:
    config = student_config(TEACHER, layers=2, hidden=16, heads=2, intermediate=32, task=SST2)
    with pytest.raises(LrcError, match="neither random, teacher nor a model dir"):
        build_student(config, str(tmp_path / "nowhere"), None, [2, 4])


# --------------------------------------------------------------------------- projections


def test_projections_shapes_and_math() -> None:
    torch.manual_seed(0)
    proj = Projections(student_width=16, teacher_width=32, count=3)
    assert len(proj.maps) == 3
    for w in proj.maps:
        assert w.weight.shape == (32, 16) and w.bias is None
    hidden = [torch.randn(2, 5, 16) for _ in range(3)]
    out = proj(hidden)
    assert [tuple(z.shape) for z in out] == [(2, 5, 32)] * 3
    for z, h, w in zip(out, hidden, proj.maps):
        assert torch.allclose(z, h @ w.weight.T)  # z_S = h_S W_i, one W_i per mapped layer
    assert not torch.equal(proj.maps[0].weight, proj.maps[1].weight)  # independent matrices
    assert sum(p.numel() for p in proj.parameters()) == 3 * 16 * 32


def test_identity_projections_start_as_the_identity_map() -> None:
    proj = Projections(student_width=8, teacher_width=8, count=2, identity=True)
    hidden = [torch.randn(2, 5, 8) for _ in range(2)]
    for z, h in zip(proj(hidden), hidden):
        assert torch.equal(z, h)
    assert all(w.weight.requires_grad for w in proj.maps)  # a start, not a frozen map
