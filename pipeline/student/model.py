"""The student: its config, construction and initialisation, and the COS-NCE projections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from pipeline.core.errors import LrcError
from pipeline.core.families import (
    FAMILIES, Family, check_loading_report, family_of, layer_prefix, reads_segments, usable_positions,
)
from pipeline.core.runtime import from_pretrained
from pipeline.student import select

log = logging.getLogger(__name__)

# Fields of the teacher's config that describe the teacher's checkpoint or its task, not its architecture.
_NOT_INHERITED = ("architectures", "_name_or_path", "transformers_version", "id2label", "label2id", "num_labels",
                  "problem_type", "dtype", "torch_dtype", "finetuning_task")


def student_config(
    teacher: dict[str, Any], layers: int, hidden: int, heads: int, intermediate: int, task: dict[str, Any],
    family: str | None = None,
) -> PretrainedConfig:
    """The teacher's config reshaped to the student's size, or (with `family`) a config of another family
    that reads the teacher's token ids: same vocabulary, pad id, usable positions and segments."""
    if hidden % heads:
        raise LrcError(f"--hidden {hidden} is not divisible by --heads {heads}: pick sizes where hidden % heads == 0")
    own = teacher.get("model_type", "bert")
    name = family or own
    row = family_of(name)
    cls = CONFIG_MAPPING[name]
    if name == own:
        # Everything the tokenizer and the position scheme depend on (offsets, relative positions) stays the teacher's.
        base = {k: v for k, v in teacher.items() if k not in _NOT_INHERITED}
    else:
        base = _reads_teacher_ids(teacher, name)
    shape = {"num_hidden_layers": layers, "num_attention_heads": heads, row.intermediate: intermediate}
    shape |= {field: hidden for field in row.widths}
    shape = {cls.attribute_map.get(k, k): v for k, v in shape.items()}  # DistilBERT: hidden_size is `dim`, ...
    return cls.from_dict({**base, **shape, **_task_fields(task)})


def _task_fields(task: dict[str, Any]) -> dict[str, Any]:
    labels = task["labels"] or ["score"]
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "regression" if task["is_regression"] else "single_label_classification"}


def _reads_teacher_ids(teacher: dict[str, Any], name: str) -> dict[str, Any]:
    """Config fields for a student of family `name` that reads the teacher's cached token ids."""
    row, own = FAMILIES[name], teacher.get("model_type")
    segments = reads_segments(teacher)
    if segments and not row.segments:
        raise LrcError(f"--student-family {name} has no segment embeddings but the {own} teacher reads segment ids "
                       f"(type_vocab_size {teacher['type_vocab_size']}): pick a family that takes token_type_ids "
                       f"({', '.join(k for k, r in FAMILIES.items() if r.segments)}) or the teacher's ({own})")
    pad = teacher.get("pad_token_id") or 0
    # As many tokens as the teacher, counted after this family's own position offset.
    positions = usable_positions(teacher) + (pad + 1 if row.positions_after_pad else 0)
    fields = {"vocab_size": teacher["vocab_size"], "pad_token_id": pad, "max_position_embeddings": positions}
    if row.segments:  # one segment row when the teacher reads none: the student then never reads them either
        fields["type_vocab_size"] = teacher["type_vocab_size"] if segments else 1
    return fields


def resolve_auto_init(teacher: dict[str, Any], weights: Path | None, student: PretrainedConfig,
                      family: str | None) -> tuple[str, str]:
    """What `--init auto` means for this cache and student: ("teacher", why) when the teacher can be cut to
    the student (its weights are in the cache; same family; no deeper, wider, with no more heads, no larger
    head dim and no larger FFN), else ("random", why not)."""
    own = teacher.get("model_type", "bert")
    if weights is None or not weights.is_dir():
        return "random", "the cache holds no teacher weights"
    if family is not None and family != own:
        return "random", f"--student-family {family} differs from the {own} teacher's"
    row = FAMILIES[own]
    t_config = CONFIG_MAPPING[own].from_dict({k: v for k, v in teacher.items() if k not in _NOT_INHERITED})
    why_not = cut_refusal(t_config, student, row)
    if why_not:
        return "random", why_not
    t, s = _shape(t_config, row), _shape(student, row)
    return "teacher", f"the {own} teacher cut from {t.hidden} to {s.hidden} wide" if t != s else f"the {own} teacher"


def cut_refusal(teacher: PretrainedConfig, student: PretrainedConfig, row: Family) -> str | None:
    """Why the teacher cannot be cut to the student, ending in the fix, or None when it can: the one rule behind
    both --init auto's choice and --init teacher's refusal. Every size must be at most the teacher's, and a
    grouped convolution (which mixes channels in groups) cannot lose channels."""
    t, s = _shape(teacher, row), _shape(student, row)
    for what, flag, have, most in (("deeper", "--layers", student.num_hidden_layers, teacher.num_hidden_layers),
                                   ("wider", "--hidden", s.hidden, t.hidden),
                                   ("with more heads", "--heads", s.heads, t.heads),
                                   ("with a larger head dim", "--hidden / --heads", s.head_dim, t.head_dim),
                                   ("with a larger FFN", "--intermediate", s.intermediate, t.intermediate)):
        if have > most:
            return f"the student is {what} than the teacher ({flag} gives {have}, the teacher has {most}): pass " \
                   f"{flag} at most {most}"
    if t != s and (getattr(teacher, "conv_kernel_size", 0) or 0) > 0 and getattr(teacher, "conv_groups", 1) != 1:
        return f"the teacher's grouped convolution (conv_groups {teacher.conv_groups}) mixes channels in groups: " \
               f"pass --hidden {t.hidden}"
    return None


def init_shape(init: str, layers: int, hidden: int, family: str | None = None) -> tuple[int, int]:
    """(depth, width) of the student: --layers/--hidden, or those of the checkpoint --init names (its
    layer map and projections follow it)."""
    if init in ("auto", "random", "teacher"):
        return layers, hidden
    path = Path(init)
    if not (path / "config.json").is_file():
        raise LrcError(f"--init {init!r} is neither random, teacher nor a model dir: pass one of those")
    other = from_pretrained(AutoConfig.from_pretrained, path, "--init", False)
    if family is not None and other.model_type != family:
        raise LrcError(f"--init {path} is a {other.model_type} model but --student-family is {family}: "
                       f"drop --student-family (the checkpoint decides the family) or pass a {family} checkpoint")
    return other.num_hidden_layers, other.hidden_size


def build_student(
    config: PretrainedConfig, init: str, teacher_weights: Path | None, layer_map: list[int],
    max_length: int | None = None,
) -> PreTrainedModel:
    """`random`, `teacher` (embeddings + mapped layers copied, DistilBERT-style) or a model dir whose
    vocabulary is the teacher's and whose positions hold `max_length` tokens (default: as many as `config`)."""
    if init == "random":
        return AutoModelForSequenceClassification.from_config(config)
    if init == "teacher":
        return _from_teacher(config, teacher_weights, layer_map)
    path = Path(init)
    if not (path / "config.json").is_file():
        raise LrcError(f"--init {init!r} is neither random, teacher nor a model dir: pass one of those")
    return _from_dir(config, path, max_length if max_length is not None else usable_positions(config))


def _load_checked(path: Path, role: str, **kwargs: Any) -> PreTrainedModel:
    """AutoModelForSequenceClassification.from_pretrained, refused unless every encoder weight loaded."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report reads like an error; check_loading_report decides
    try:
        model, info = from_pretrained(AutoModelForSequenceClassification.from_pretrained, path, role, False,
                                      output_loading_info=True, **kwargs)  # never runs code shipped in the dir
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_loading_report(model, info, path, role)
    return model


def _from_dir(config: PretrainedConfig, path: Path, max_length: int) -> PreTrainedModel:
    other = from_pretrained(AutoConfig.from_pretrained, path, "--init", False)
    family_of(other.model_type, f"--init {path}")
    if other.vocab_size != config.vocab_size or (other.pad_token_id or 0) != (config.pad_token_id or 0):
        raise LrcError(
            f"--init {path} has a vocabulary of {other.vocab_size} (pad id {other.pad_token_id}), the cache's teacher "
            f"{config.vocab_size} (pad id {config.pad_token_id}): initialise from a model with the teacher's tokenizer"
        )
    if reads_segments(config) and not reads_segments(other):
        raise LrcError(f"--init {path} ({other.model_type}) has no embedding for the segment ids the teacher reads: "
                       "initialise from a model that embeds token_type_ids")
    if usable_positions(other) < max_length:
        raise LrcError(f"--init {path} holds {usable_positions(other)} positions but the cache's sequences reach "
                       f"{max_length} tokens: re-extract with --max-length {usable_positions(other)} or pick another model")
    model = _load_checked(path, "--init", id2label=config.id2label, label2id=config.label2id,
                          problem_type=config.problem_type, ignore_mismatched_sizes=True)
    log.info("student initialised from %s (%s, %d layers x %d)", path, other.model_type, model.config.num_hidden_layers,
             model.config.hidden_size)
    return model


def _from_teacher(config: PretrainedConfig, weights: Path | None, layer_map: list[int]) -> PreTrainedModel:
    return init_from_teacher(config, weights, layer_map)[0]


def init_from_teacher(
    config: PretrainedConfig, weights: Path | None, layer_map: list[int], scores: dict[str, np.ndarray] | None = None,
    selection: str = "activation",
) -> tuple[PreTrainedModel, np.ndarray]:
    """The teacher cut to `config`'s depth, width, heads and FFN (pipeline/student/select.py): layer i from teacher
    layer layer_map[i], the best channels, heads, head dims and neurons by `scores` with `selection`
    activation, evenly spaced ones with uniform or without scores. Returns the student and the kept
    residual channels (all of them at the teacher's width), where the COS-NCE projections start."""
    if weights is None or not weights.is_dir():
        raise LrcError("--init teacher needs the teacher weights stored in the cache: re-extract it with this lrc version")
    # With the student's labels: a general (encoder) teacher's head is new either way, and a task teacher's fits.
    teacher = _load_checked(weights, "the teacher weights in the cache", ignore_mismatched_sizes=True,
                            **_labels_of(config))
    own = teacher.config.model_type
    if config.model_type != own:
        raise LrcError(f"--init teacher copies the {own} teacher's modules into the student, which is {config.model_type}: "
                       "drop --student-family or use --init random")
    depth = teacher.config.num_hidden_layers
    if any(not 1 <= j <= depth for j in layer_map):
        raise LrcError(f"--layer-map {layer_map} names layers outside the teacher's 1..{depth}")
    row = FAMILIES[own]
    why_not = cut_refusal(teacher.config, config, row)
    if why_not:
        raise LrcError(f"--init teacher cuts the {own} teacher down to the student, and {why_not} or use --init random")
    t_shape, s_shape = _shape(teacher.config, row), _shape(config, row)
    narrower = t_shape != s_shape
    if selection == "activation" and scores is None and narrower:
        log.info("the cache has no importance scores (extracted by an older lrc): the student keeps evenly spaced "
                 "channels, heads and neurons of the teacher")
    chosen = select.choose(scores if selection == "activation" else None, t_shape, s_shape, layer_map,
                           shared_heads=row.shared_heads is not None)
    student = AutoModelForSequenceClassification.from_config(
        type(teacher.config).from_dict(_cut_config(teacher.config, config, row, s_shape, len(layer_map))))
    state = select.cut_state(teacher.state_dict(), _layout(teacher, row), chosen, layer_map, t_shape.hidden)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise LrcError(f"--init teacher cannot cut the {own} teacher to this student ({first}): pass the teacher's "
                       "--hidden/--heads/--intermediate or use --init random") from None
    copied = [name for name in row.head
              if getattr(student, name, None) is not None or getattr(student.base_model, name, None) is not None]
    log.info("student initialised from the %s teacher: embeddings, layers %s, %s; %s", own, layer_map,
             " and ".join(copied) or "no head",
             f"cut from {t_shape} to {s_shape} ({selection if scores is not None else 'uniform'} selection)"
             if narrower else "every channel kept")
    return student, chosen.channels


def _shape(config: PretrainedConfig, row: Family) -> select.Shape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "attention_head_size", None) or config.hidden_size // heads
    return select.Shape(config.hidden_size, heads, head_dim, getattr(config, row.intermediate))


def _cut_config(teacher: PretrainedConfig, student: PretrainedConfig, row: Family, shape: select.Shape,
                depth: int) -> dict[str, Any]:
    """The teacher's config at the student's sizes. A width field the teacher keeps apart from its width
    (ELECTRA's smaller embedding_size) stays the teacher's: those modules are not on the residual stream."""
    cls = type(teacher)
    fields = teacher.to_dict()
    sizes = {"num_hidden_layers": depth, "num_attention_heads": shape.heads, row.intermediate: shape.intermediate}
    sizes = {cls.attribute_map.get(k, k): v for k, v in sizes.items()}
    for field in row.widths:
        name = cls.attribute_map.get(field, field)
        if fields.get(name) in (None, teacher.hidden_size):
            sizes[name] = shape.hidden
    if fields.get("attention_head_size") is not None:
        sizes["attention_head_size"] = shape.head_dim
    return {**fields, **sizes, **_labels_of(student)}


def _layout(teacher: PreTrainedModel, row: Family) -> select.Layout:
    q, k, v, o = row.attention
    # Position projections the model lacks (shared keys, no relative attention) simply match no key.
    queries, keys = ((q, row.positions[0]), (k, row.positions[1])) if row.positions else ((q,), (k,))
    types = (nn.Embedding, nn.LayerNorm, nn.Linear, nn.Conv1d)
    kinds = {name: next((t.__name__ for t in types if isinstance(module, t)), "other")
             for name, module in teacher.named_modules()}
    shared = f"{teacher.base_model_prefix}.{row.shared_heads}" if row.shared_heads else None
    return select.Layout(layer_prefix(teacher), queries, keys, v, o, row.ffn[0], row.ffn[1], shared, kinds)


def _labels_of(config: PretrainedConfig) -> dict[str, Any]:
    return {"id2label": config.id2label, "label2id": config.label2id, "problem_type": config.problem_type}


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

    def scatter(self, channels: np.ndarray) -> None:
        """Start every W_i as the scatter of student channel k back to teacher channel channels[k]: a student
        cut from the teacher then projects onto the very channels it was cut from."""
        with torch.no_grad():
            for w in self.maps:
                w.weight.copy_(select.scatter(channels, w.weight.shape[0]))
        log.info("W_i start as the scatter of the %d kept channels back to the teacher's %d", len(channels),
                 self.maps[0].weight.shape[0] if len(self.maps) else 0)

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [w(h) for w, h in zip(self.maps, hidden)]  # each (B, L, d')

