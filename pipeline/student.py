"""The student: its config, construction and initialisation, and the COS-NCE projections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, BertConfig, BertForSequenceClassification

from pipeline.errors import LrcError
from pipeline.runtime import from_pretrained

log = logging.getLogger(__name__)


def student_config(
    teacher: dict[str, Any], layers: int, hidden: int, heads: int, intermediate: int, task: dict[str, Any]
) -> BertConfig:
    """A BERT config of the given shape with the teacher's vocabulary, positions and segments."""
    if hidden % heads:
        raise LrcError(f"--hidden {hidden} is not divisible by --heads {heads}: pick sizes where hidden % heads == 0")
    labels = task["labels"] or ["score"]
    return BertConfig(
        vocab_size=teacher["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=teacher.get("max_position_embeddings", 512),
        type_vocab_size=max(teacher.get("type_vocab_size", 2), 1),
        pad_token_id=teacher.get("pad_token_id", 0) or 0,
        num_labels=task["num_labels"],
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if task["is_regression"] else "single_label_classification",
    )


def build_student(
    config: BertConfig, init: str, teacher_weights: Path | None, layer_map: list[int]
) -> BertForSequenceClassification:
    """`random`, `teacher` (embeddings + mapped layers copied, DistilBERT-style) or a model dir."""
    if init == "random":
        return BertForSequenceClassification(config)
    if init == "teacher":
        return _from_teacher(config, teacher_weights, layer_map)
    path = Path(init)
    if not path.is_dir():
        raise LrcError(f"--init {init!r} is neither random, teacher nor a model dir: pass one of those")
    other = from_pretrained(AutoConfig.from_pretrained, path, "--init", trust_remote_code=False)  # never runs its code
    if other.vocab_size != config.vocab_size:
        raise LrcError(
            f"--init {path} has a vocabulary of {other.vocab_size}, the cache's teacher {config.vocab_size}: "
            "initialise from a model with the teacher's tokenizer"
        )
    if other.num_hidden_layers != config.num_hidden_layers:
        # The layer map and the projections are built for --layers: another depth would silently misalign them.
        raise LrcError(
            f"--init {path} has {other.num_hidden_layers} layers but --layers is {config.num_hidden_layers}: "
            f"pass --layers {other.num_hidden_layers}"
        )
    if other.hidden_size != config.hidden_size:
        # The projections W_i are built for --hidden: another width would fail on the first step.
        raise LrcError(f"--init {path} is {other.hidden_size} wide but --hidden is {config.hidden_size}: "
                       f"pass --hidden {other.hidden_size}")
    # A bare encoder dir (a general student, any BertModel) loads under the `bert.` prefix with a fresh head.
    model, info = BertForSequenceClassification.from_pretrained(
        path, num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
        problem_type=config.problem_type, ignore_mismatched_sizes=True, output_loading_info=True,
    )
    fresh = {k for k in info["missing_keys"] | {m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]}
             if not k.startswith(("classifier.", "bert.pooler."))}
    if fresh:
        # Otherwise those weights would start random while the run claims to start from the dir.
        raise LrcError(f"--init {path}: {len(fresh)} encoder weights are missing or mis-shaped there (e.g. "
                       f"{sorted(fresh)[0]}): pass a BERT model dir saved with save_pretrained (a student or a general student)")
    log.info("student initialised from %s (%d layers x %d)", path, model.config.num_hidden_layers, model.config.hidden_size)
    return model


def _from_teacher(config: BertConfig, weights: Path | None, layer_map: list[int]) -> BertForSequenceClassification:
    if weights is None or not weights.is_dir():
        raise LrcError("--init teacher needs the teacher weights stored in the cache: re-extract it with this lrc version")
    teacher = BertForSequenceClassification.from_pretrained(weights)
    if teacher.config.hidden_size != config.hidden_size:
        raise LrcError(
            f"--init teacher needs --hidden equal to the teacher's width {teacher.config.hidden_size} "
            f"(got {config.hidden_size}): pass --hidden {teacher.config.hidden_size} or use --init random"
        )
    config = BertConfig(**{**config.to_dict(), "intermediate_size": teacher.config.intermediate_size,
                           "num_attention_heads": teacher.config.num_attention_heads})
    student = BertForSequenceClassification(config)
    student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    for i, j in enumerate(layer_map):
        student.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[j - 1].state_dict())
    if teacher.bert.pooler is not None and student.bert.pooler is not None:
        student.bert.pooler.load_state_dict(teacher.bert.pooler.state_dict())
    student.classifier.load_state_dict(teacher.classifier.state_dict())
    log.info("student initialised from the teacher: embeddings, layers %s, pooler and classifier", layer_map)
    return student


class Projections(nn.Module):
    """One W_i (student width -> teacher width, no bias) per mapped layer: z_S = h_i^S W_i."""

    def __init__(self, student_width: int, teacher_width: int, count: int, identity: bool = False) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(count))
        if identity:
            # Widths match: a student initialised from the teacher already speaks the teacher's basis, and a
            # random W_i would make the first COS-NCE gradients rewrite the copied layers to fit that map.
            with torch.no_grad():
                for w in self.maps:
                    nn.init.eye_(w.weight)

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [w(h) for w, h in zip(self.maps, hidden)]  # each (B, L, d')
