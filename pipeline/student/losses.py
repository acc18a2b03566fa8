"""LRC-BERT losses as pure functions (docs/DESIGN.md §2). Projections live in the student; math in float32.

Shapes: B batch, L anchor length, K negatives, Ln negative length, D teacher width, C classes.
Masks are right-padded: 1 for the real tokens first, then 0 for padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.errors import LrcError
from pipeline.core.train_config import GRANULARITIES

EPS = 1e-8  # smallest norm a cosine divides by: a zero vector gets cosine 0, not NaN


def _cosine(dot: Tensor, x_sq: Tensor, y_sq: Tensor) -> Tensor:
    """cos = <x, y> / (max(|x|, eps) * max(|y|, eps)), clamped to [-1, 1] against rounding."""
    # Clamp the squared norms before the sqrt: sqrt'(0) is infinite and would poison the gradient.
    denom = (x_sq.clamp_min(EPS**2) * y_sq.clamp_min(EPS**2)).sqrt()
    return (dot / denom).clamp(-1.0, 1.0)


def _masked_cosine(dot: Tensor, x_sq: Tensor, y_sq: Tensor, mask: Tensor, granularity: str) -> Tensor:
    """cos(x, y) per sequence from per-position parts <x_p, y_p>, |x_p|^2, |y_p|^2 (shape (..., P))."""
    if granularity == "cls":
        # cls is token granularity restricted to position 0 (whose mask is 1 in any real sequence).
        dot, x_sq, y_sq, mask = dot[..., :1], x_sq[..., :1], y_sq[..., :1], mask[..., :1]
    if granularity == "flat":
        # Flattening the real (P x D) block: the dot and squared norms are sums over positions.
        return _cosine((dot * mask).sum(-1), (x_sq * mask).sum(-1), (y_sq * mask).sum(-1))  # (...)
    per_token = _cosine(dot, x_sq, y_sq) * mask  # (..., P)
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)  # (...)


def cos_nce(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    negatives: Tensor,
    negatives_mask: Tensor,
    granularity: str = "flat",
    negative_pos: Tensor | None = None,
) -> Tensor:
    """L = g(z_T, z_S) + 1/(2K) * sum_k [2 - (g(n_k, z_S) - g(z_T, z_S))], averaged over the batch.

    `student` is already projected to the teacher width. A negative is compared with the anchor over
    the positions both have (the first min(len_anchor, len_neg) tokens); with K = 0 only the positive
    term g(z_T, z_S) remains. In-batch negatives: `negative_pos` (B, K) names, per anchor, the other
    anchors of the batch whose teacher outputs are its negatives (then `negatives` is ignored and may be
    empty): the same loss, computed without building the (B, K, L, D) block.
    """
    if granularity not in GRANULARITIES:
        raise LrcError(f"unknown COS-NCE granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    _check_shapes(student, teacher, mask, negatives, negatives_mask)
    z_s, z_t = _zero_padding(student, mask), _zero_padding(teacher, mask)  # (B, L, D)
    m = mask.float()  # (B, L)

    # Positive: teacher and student share the anchor's padding.
    s_sq = z_s.pow(2).sum(-1)  # (B, L)
    pos_dot = (z_s * z_t).sum(-1)  # (B, L)
    g_pos = 1.0 - _masked_cosine(pos_dot, s_sq, z_t.pow(2).sum(-1), m, granularity)  # (B,)

    if negative_pos is None:
        # Negatives: keep the P = min(L, Ln) leading positions; the product of the two masks then
        # keeps exactly the first min(len_anchor, len_neg) tokens, so missing positions never count.
        neg = _zero_padding(negatives, negatives_mask)  # (B, K, Ln, D)
        p = min(z_s.shape[1], neg.shape[2])
        neg, shared = neg[:, :, :p], m[:, None, :p] * negatives_mask[:, :, :p].float()  # (B, K, P, D), (B, K, P)
        neg_dot = torch.einsum("bpd,bkpd->bkp", z_s[:, :p], neg)  # (B, K, P)
        neg_sq = neg.pow(2).sum(-1)  # (B, K, P)
        s_sq_shared = s_sq[:, None, :p].expand_as(neg_dot)  # (B, K, P)
    else:
        # In-batch: every anchor's student against every anchor's teacher, (B, B, L) dots (B^2 L D flops,
        # small next to the step), then each anchor's K columns. Both share the batch's padding width L.
        pick = negative_pos[:, :, None].expand(-1, -1, z_s.shape[1])  # (B, K, L)
        neg_dot = torch.einsum("bpd,cpd->bcp", z_s, z_t).gather(1, pick)  # (B, K, L)
        neg_sq = z_t.pow(2).sum(-1)[negative_pos]  # (B, K, L)
        shared = m[:, None, :] * m[negative_pos]  # (B, K, L)
        s_sq_shared = s_sq[:, None, :].expand_as(neg_dot)  # (B, K, L)
    g_neg = 1.0 - _masked_cosine(neg_dot, s_sq_shared, neg_sq, shared, granularity)  # (B, K)

    k = neg_dot.shape[1]
    brackets = 2.0 - (g_neg - g_pos[:, None])  # (B, K), each in [0, 4]
    contrast = brackets.sum(1) / (2 * k) if k > 0 else torch.zeros_like(g_pos)  # (B,)
    return (g_pos + contrast).mean()  # ()


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x in float32 with padded positions set to 0: where, not multiply, so inf/NaN garbage cannot leak."""
    return torch.where(mask.bool().unsqueeze(-1), x.float(), 0.0)


def _check_shapes(
    student: Tensor, teacher: Tensor, mask: Tensor, negatives: Tensor, negatives_mask: Tensor
) -> None:
    # Shape slips here are caller bugs, not user errors: a plain ValueError with the shapes.
    b, l, d = student.shape
    ok = (
        teacher.shape == student.shape
        and mask.shape == (b, l)
        and negatives.dim() == 4
        and negatives.shape[0] == b
        and negatives.shape[3] == d
        and negatives_mask.shape == negatives.shape[:3]
    )
    if not ok:
        raise ValueError(
            f"cos_nce shapes: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
            f"mask {tuple(mask.shape)}, negatives {tuple(negatives.shape)}, "
            f"negatives_mask {tuple(negatives_mask.shape)}; "
            "want (B,L,D), (B,L,D), (B,L), (B,K,Ln,D), (B,K,Ln)"
        )


def soft_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, regression: bool = False
) -> Tensor:
    """KL(softmax(y_T/t) || softmax(y_S/t)) * t^2, batch mean; regression: MSE(y_S, y_T)."""
    y_s, y_t = student_logits.float(), teacher_logits.float()  # (B, C)
    if regression:
        return F.mse_loss(y_s.reshape(-1), y_t.reshape(-1))  # ()
    log_q = F.log_softmax(y_s / temperature, dim=-1)  # (B, C) student
    log_p = F.log_softmax(y_t / temperature, dim=-1)  # (B, C) teacher
    # t^2 keeps the gradient scale independent of t (Hinton et al.), as the paper's formula has it.
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2  # ()


def hard_loss(student_logits: Tensor, labels: Tensor, regression: bool = False) -> Tensor:
    """CE(y_S, label), batch mean; regression: MSE(y_S, label)."""
    y_s = student_logits.float()  # (B, C) or (B, 1) / (B,) for regression
    if regression:
        return F.mse_loss(y_s.reshape(-1), labels.float().reshape(-1))  # ()
    return F.cross_entropy(y_s, labels.long().reshape(-1))  # ()


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """sum over real tokens of (h_S - h_T)^2 / (real tokens * D): TinyBERT's baseline, padding excluded."""
    diff_sq = (_zero_padding(student, mask) - _zero_padding(teacher, mask)).pow(2)  # (B, L, D)
    n_elements = (mask.float().sum() * student.shape[-1]).clamp_min(1.0)  # ()
    return diff_sq.sum() / n_elements  # ()
