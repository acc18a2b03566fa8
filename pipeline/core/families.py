"""What lrc needs to know about each encoder family, in one table, and the few helpers that read it.

Everything that touches a student's internals (the embedding module the perturbation replaces, the
layer list teacher-initialisation copies, which inputs the model reads) goes through `FAMILIES`, so a
new family is one row here, not a branch in the stages.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from transformers import PretrainedConfig, PreTrainedModel

from pipeline.core.errors import LrcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts (paths under the base model, e.g. `model.bert`) and how it reads ids."""

    embeddings: str  # the module whose output is e (docs/DESIGN.md §2); ELECTRA may project it up to the width after
    layers: str  # the ModuleList of transformer layers
    head: tuple[str, ...]  # pooler and classifier modules: new on a fresh task, never part of the encoder
    segments: bool  # the forward takes token_type_ids
    positions_after_pad: bool  # position ids start at pad_token_id + 1 (RoBERTa-style), not at 0
    intermediate: str  # config field of the FFN width
    widths: tuple[str, ...]  # config fields that follow the model width (--hidden)
    # Inside one layer (paths under it): the attention's query, key, value and output projections and the FFN's
    # up- and down-projections. Stage one hooks them to score heads, head dims and neurons; a narrow
    # `--init teacher` cuts them (pipeline/student/select.py). Every other weight of a layer is a LayerNorm.
    attention: tuple[str, str, str, str] = ("attention.self.query", "attention.self.key", "attention.self.value",
                                            "attention.output.dense")
    ffn: tuple[str, str] = ("intermediate.dense", "output.dense")
    # Projections of relative positions that meet Q or K in a score (DeBERTa's c2p/p2c, unless share_att_key):
    # (query-like, key-like); they keep the Q/K dims and the query-like one takes the Q rescale too.
    positions: tuple[str, str] | None = None
    # A per-head table outside the layers, shared by all of them (MPNet's relative attention bias): a narrow
    # student of such a family keeps one head set in every layer, or the table would not fit every layer.
    shared_heads: str | None = None
    onnx: bool = True  # `lrc export` gives a graph whose logits match PyTorch's (tests/test_export.py)


FAMILIES: dict[str, Family] = {
    "bert": Family("embeddings", "encoder.layer", ("pooler", "classifier"), True, False, "intermediate_size",
                   ("hidden_size",)),
    "roberta": Family("embeddings", "encoder.layer", ("pooler", "classifier"), True, True, "intermediate_size",
                      ("hidden_size",)),
    "deberta-v2": Family("embeddings", "encoder.layer", ("pooler", "classifier"), True, False, "intermediate_size",
                         ("hidden_size", "pooler_hidden_size", "embedding_size"),
                         ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                          "attention.output.dense"),
                         positions=("attention.self.pos_query_proj", "attention.self.pos_key_proj")),
    "electra": Family("embeddings", "encoder.layer", ("classifier",), True, False, "intermediate_size",
                      ("hidden_size", "embedding_size")),
    "mpnet": Family("embeddings", "encoder.layer", ("pooler", "classifier"), False, True, "intermediate_size",
                    ("hidden_size",), ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"),
                    shared_heads="encoder.relative_attention_bias"),
    "distilbert": Family("embeddings", "transformer.layer", ("pre_classifier", "classifier"), False, False,
                         "hidden_dim", ("dim",), ("attention.q_lin", "attention.k_lin", "attention.v_lin",
                                                  "attention.out_lin"), ("ffn.lin1", "ffn.lin2")),
}


def family_of(model_type: str, role: str = "student") -> Family:
    """The table row of a family, or a one-line error listing the supported ones."""
    if model_type not in FAMILIES:
        raise LrcError(f"the {role} family {model_type!r} is not supported as a student (supported: "
                       f"{', '.join(FAMILIES)}): pass --student-family with one of them")
    return FAMILIES[model_type]


def get_module(module: torch.nn.Module, path: str) -> Any:
    """The submodule at a dotted path, e.g. `attention.self.query`."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def layer_prefix(model: PreTrainedModel) -> str:
    """State-dict prefix of the layer list, e.g. `bert.encoder.layer.`."""
    return f"{model.base_model_prefix}.{family_of(model.config.model_type).layers}."


def reads_segments(config: PretrainedConfig | Mapping[str, Any]) -> bool:
    """Whether segment ids carry information for this model: it takes them and embeds more than one."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    row = FAMILIES.get(get("model_type"))
    return (row is None or row.segments) and (get("type_vocab_size", 0) or 0) > 1


def usable_positions(config: PretrainedConfig | Mapping[str, Any]) -> int:
    """How many tokens a sequence may have: position rows minus those below a RoBERTa-style offset."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    row = FAMILIES.get(get("model_type"))
    offset = (get("pad_token_id") or 0) + 1 if row is not None and row.positions_after_pad else 0
    return get("max_position_embeddings", 512) - offset


def model_inputs(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, plus token_type_ids where the model reads them."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if reads_segments(model.config):
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


class _Given(torch.nn.Module):
    """Stands in for an embedding module: returns the tensor it holds, whatever the inputs."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


@contextlib.contextmanager
def embedding_output(model: PreTrainedModel, given: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: the model's forward records its embedding output e in the yielded dict under "e"; with
    `given`, the embedding module does not run at all and the layers above it start from `given`."""
    row = family_of(model.config.model_type)
    parent_path, _, name = row.embeddings.rpartition(".")
    parent = get_module(model.base_model, parent_path) if parent_path else model.base_model
    original = getattr(parent, name)
    captured: dict[str, torch.Tensor] = {}
    if given is not None:
        captured["e"] = given
        setattr(parent, name, _Given(given))
        try:
            yield captured
        finally:
            setattr(parent, name, original)
        return

    def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        captured["e"] = output

    hook = original.register_forward_hook(keep)
    try:
        yield captured
    finally:
        hook.remove()


# --------------------------------------------------------------------------- checks on a teacher

_HEAD_NAMES = tuple(sorted({name for row in FAMILIES.values() for name in row.head}))


def require_classifier_family(config: PretrainedConfig, role: str) -> None:
    """A family transformers has no sequence-classification head for cannot be a teacher or student."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise LrcError(f"the {role} family {config.model_type!r} has no sequence-classification head in transformers: "
                       f"use an encoder such as {', '.join(FAMILIES)}")


@torch.inference_mode()
def require_layer_outputs(model: PreTrainedModel, input_ids: list[int], role: str = "teacher") -> None:
    """One hidden state (B, L, d) per layer plus the embeddings, or COS-NCE has nothing to learn from."""
    ids = torch.tensor([input_ids], device=model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # a shape probe: no graph to keep
        states = model(**inputs, output_hidden_states=True).hidden_states
    depth, width = model.config.num_hidden_layers, model.config.hidden_size
    shapes = None if states is None else [tuple(h.shape) for h in states]
    if shapes != [(1, len(input_ids), width)] * (depth + 1):
        got = "none" if shapes is None else f"{len(shapes)} of shapes {sorted(set(shapes))}"
        raise LrcError(f"the {role} family {model.config.model_type!r} does not return one hidden state (batch, tokens, "
                       f"{width}) per layer for its {depth} layers (got {got}): use an encoder such as "
                       f"{', '.join(FAMILIES)}")


def check_loading_report(model: PreTrainedModel, info: Mapping[str, Any], path: Any, role: str) -> None:
    """Refuse a checkpoint whose encoder weights did not all load into this class: a class that does not
    match its checkpoint reports them missing and builds random weights. Only the task head (and a pooler)
    may be new or resized; weights the class has no place for (a pre-training head such as BERT's `cls.*`
    or RoBERTa's `lm_head.*`) are left out, as transformers does."""
    row = FAMILIES.get(model.config.model_type)
    head = row.head if row is not None else _HEAD_NAMES  # a backbone of a family outside the table
    prefix = f"{model.base_model_prefix}."

    def outside_head(key: str) -> bool:
        key = key[len(prefix):] if key.startswith(prefix) else key
        return key.split(".")[0] not in head

    keys = list(info.get("missing_keys", ()))
    keys += [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", ())]
    bad = sorted(k for k in keys if outside_head(k))
    if bad or info.get("error_msgs"):
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise LrcError(f"{role} {path} does not load as {type(model).__name__}: encoder weights missing or of another "
                       f"shape ({shown or info.get('error_msgs')}): pass a checkpoint of the "
                       f"{model.config.model_type} family saved by transformers")
    if info.get("unexpected_keys"):
        log.debug("%s %s: left out %d weights the class has no place for", role, path, len(info["unexpected_keys"]))
