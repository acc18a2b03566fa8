"""Cut a teacher to a narrower, shallower student: which channels, heads, head dims and neurons to keep, and
the teacher's state dict reduced to them. Pure functions over arrays and state dicts; the model plumbing is
in pipeline/student/model.py.

One set of residual channels is kept everywhere the residual stream is read or written (embeddings, every
output projection, every LayerNorm, pooler, classifier input): the residual adds what each layer writes to
what came before, so two sets would add different features. Within a head the same dims are kept for Q
and K (a score is a sum of q_d * k_d) and for V and the output projection's columns (o reads v's dims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import LrcError


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    head_dim: int
    intermediate: int

    def __str__(self) -> str:
        return f"width {self.hidden}, {self.heads} heads of {self.head_dim}, FFN {self.intermediate}"


@dataclass(frozen=True)
class Selection:
    """Teacher indices the student keeps; per-layer entries are per student layer (teacher layer phi(i))."""

    channels: np.ndarray  # (d_s,) residual channels, ascending
    heads: list[np.ndarray]  # (H_s,) kept teacher heads
    qk: list[np.ndarray]  # (H_s * d_head_s,) flat teacher Q/K dims, head by head
    v: list[np.ndarray]  # (H_s * d_head_s,) flat teacher V dims (= output projection columns)
    ffn: list[np.ndarray]  # (I_s,) FFN neurons
    q_scale: float  # sqrt(d_head_s / d_head_t): the kept dims then give the teacher's scores


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k of range(n) spread evenly (all of them when k == n)."""
    return (np.arange(k) * n) // k


def top(score: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring indices, ascending (ties to the lower index)."""
    return np.sort(np.argsort(-score, kind="stable")[:k])


def _normalised(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its mean, so every layer weighs the same in a sum over layers."""
    return rows / np.maximum(rows.mean(axis=-1, keepdims=True), 1e-12)


def choose(scores: dict[str, np.ndarray] | None, teacher: Shape, student: Shape, layer_map: list[int],
           shared_heads: bool = False) -> Selection:
    """The indices to keep: the best by `scores` (pipeline/cache/importance.py), evenly spaced where None.

    Residual channels rank by their summed (per-layer normalised) score over the embeddings and the mapped
    teacher layers; heads by the sum of their context dims (one set for all layers when `shared_heads`);
    dims within a head and FFN neurons by their own score in the mapped layer. The student fits the teacher
    (pipeline/student/model.py `cut_refusal`)."""
    dt, ds = teacher.head_dim, student.head_dim

    def pick(n: int, k: int, score: np.ndarray | None) -> np.ndarray:
        return top(score, k) if score is not None else evenly_spaced(n, k)

    channels = pick(teacher.hidden, student.hidden, None if scores is None else
                    _normalised(scores["residual"][[0, *layer_map]]).sum(0))
    head_score = None if scores is None else scores["context"].reshape(-1, teacher.heads, dt).sum(-1)  # (N, H)
    shared = None if scores is None or not shared_heads else _normalised(head_score[[j - 1 for j in layer_map]]).sum(0)
    heads, qk, v, ffn = [], [], [], []
    for j in layer_map:
        kept = pick(teacher.heads, student.heads,
                    shared if shared_heads else None if head_score is None else head_score[j - 1])
        heads.append(kept)
        for out, name in ((qk, "qk"), (v, "v")):
            per_head = None if scores is None else scores[name][j - 1].reshape(teacher.heads, dt)
            out.append(np.concatenate([h * dt + pick(dt, ds, None if per_head is None else per_head[h]) for h in kept]))
        ffn.append(pick(teacher.intermediate, student.intermediate, None if scores is None else scores["ffn"][j - 1]))
    return Selection(channels, heads, qk, v, ffn, math.sqrt(ds / dt))


# --------------------------------------------------------------------------- the state dict


@dataclass(frozen=True)
class Layout:
    """Where the cut applies in a teacher's state dict (from the family table; see pipeline/core/families.py)."""

    layers: str  # prefix of the layer list, e.g. "bert.encoder.layer."
    query: tuple[str, ...]  # modules under a layer whose rows are Q dims (and take the Q rescale)
    key: tuple[str, ...]  # modules under a layer whose rows are K dims
    value: str
    output: str  # attention output projection: rows residual, columns V dims
    ffn_up: str
    ffn_down: str
    shared_heads: str | None  # full key of a (buckets, heads) table shared by all layers
    kinds: dict[str, str]  # module path -> Embedding | LayerNorm | Linear | Conv1d | other


def cut_state(state: dict[str, torch.Tensor], layout: Layout, selection: Selection, layer_map: list[int],
              hidden: int) -> dict[str, torch.Tensor]:
    """The student's state dict: teacher layer phi(i) cut into student layer i, everything else cut at
    the kept residual channels (every dim of size `hidden`, the teacher's width, that reads or writes the
    residual stream: an Embedding's columns, a LayerNorm, both sides of a Linear, a Conv1d's channels)."""
    channels = torch.as_tensor(selection.channels, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, _ = key.rpartition(".")
        if key.startswith(layout.layers):
            index, _, rest = key[len(layout.layers):].partition(".")
            for i, j in enumerate(layer_map):
                if int(index) == j - 1:
                    out[f"{layout.layers}{i}.{rest}"] = _cut_layer(rest, value, layout, selection, i, channels, hidden,
                                                                   layout.kinds.get(module, "other"))
        elif module == layout.shared_heads:
            out[key] = value[:, torch.as_tensor(selection.heads[0], dtype=torch.long)]  # (buckets, H_s)
        else:
            out[key] = _cut_residual(value, layout.kinds.get(module, "other"), channels, hidden)
    return out


def _cut_layer(rest: str, value: torch.Tensor, layout: Layout, selection: Selection, i: int,
               channels: torch.Tensor, hidden: int, kind: str) -> torch.Tensor:
    module, _, param = rest.rpartition(".")
    rows_cols = {  # module -> (row indices, column indices, scale)
        **{m: (selection.qk[i], channels, selection.q_scale) for m in layout.query},
        **{m: (selection.qk[i], channels, 1.0) for m in layout.key},
        layout.value: (selection.v[i], channels, 1.0),
        layout.output: (channels, selection.v[i], 1.0),
        layout.ffn_up: (selection.ffn[i], channels, 1.0),
        layout.ffn_down: (channels, selection.ffn[i], 1.0),
    }
    if module not in rows_cols:
        return _cut_residual(value, kind, channels, hidden)  # the layer's LayerNorms
    rows, cols, scale = rows_cols[module]
    rows = torch.as_tensor(rows, dtype=torch.long)
    cut = value[rows][:, torch.as_tensor(cols, dtype=torch.long)] if param == "weight" else value[rows]
    return cut * scale if scale != 1.0 else cut.clone()


def _cut_residual(value: torch.Tensor, kind: str, channels: torch.Tensor, hidden: int) -> torch.Tensor:
    dims = {"Embedding": (1,), "LayerNorm": (0,), "Linear": (0, 1), "Conv1d": (0, 1)}.get(kind, ())
    for dim in dims:
        if dim < value.dim() and value.shape[dim] == hidden:
            value = value.index_select(dim, channels)
    return value.clone()


def scatter(channels: np.ndarray, teacher_width: int) -> torch.Tensor:
    """(d', d) weight of a W_i that puts student channel k back at teacher channel channels[k], zeros elsewhere:
    the projection a cut student starts with, so z_S = h_S W_i is the teacher's basis from step one."""
    weight = torch.zeros(teacher_width, len(channels))
    weight[torch.as_tensor(channels, dtype=torch.long), torch.arange(len(channels))] = 1.0
    return weight
