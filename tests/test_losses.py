"""Losses against naive per-sample loops and hand-computed values (docs/DESIGN.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import LrcError
from pipeline.core.options import default_of
from pipeline.core.train_config import GRANULARITIES, TrainConfig
from pipeline.student.losses import cos_nce, hard_loss, hidden_mse, soft_loss

# ---------------------------------------------------------------- helpers


def _g_naive(x: torch.Tensor, y: torch.Tensor, granularity: str) -> float:
    """g = 1 - cos on (l, D) slices of real tokens, in float64, via F.cosine_similarity."""
    x, y = x.double(), y.double()
    if granularity == "flat":
        return 1.0 - F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
    if granularity == "token":
        return 1.0 - F.cosine_similarity(x, y, dim=-1).mean().item()
    return 1.0 - F.cosine_similarity(x[0], y[0], dim=0).item()


def cos_nce_naive(student, teacher, mask, negatives, negatives_mask, granularity) -> float:
    """Plain loops over b and k with explicit slicing of the real (and shared) tokens."""
    batch, k = negatives.shape[0], negatives.shape[1]
    total = 0.0
    for b in range(batch):
        la = int(mask[b].sum())
        z_s, z_t = student[b, :la], teacher[b, :la]
        g_pos = _g_naive(z_t, z_s, granularity)
        brackets = 0.0
        for j in range(k):
            shared = min(la, int(negatives_mask[b, j].sum()))
            g_neg = _g_naive(negatives[b, j, :shared], z_s[:shared], granularity)
            brackets += 2.0 - (g_neg - g_pos)
        total += g_pos + (brackets / (2 * k) if k else 0.0)
    return total / batch


def _prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width) < lengths.unsqueeze(-1)).long()  # (..., width)


def _batch(seed: int, b=4, k=3, l=9, ln=12, d=8, min_len=1, garbage=3.0):
    """Random anchors/negatives with random right-padded lengths; padding filled with garbage."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, l + 1, (b,), generator=gen)
    nlens = torch.randint(1, ln + 1, (b, k), generator=gen)
    mask, nmask = _prefix_mask(lens, l), _prefix_mask(nlens, ln)
    student = torch.randn(b, l, d, generator=gen)
    teacher = torch.randn(b, l, d, generator=gen) + 0.5 * student  # correlated, like a real target
    negatives = torch.randn(b, k, ln, d, generator=gen)
    # Padding is garbage, not zeros: a loss that lets it in cannot match the naive loop.
    student = torch.where(mask.bool().unsqueeze(-1), student, garbage * torch.randn(b, l, d, generator=gen))
    teacher = torch.where(mask.bool().unsqueeze(-1), teacher, garbage * torch.randn(b, l, d, generator=gen))
    junk = garbage * torch.randn(b, k, ln, d, generator=gen)
    negatives = torch.where(nmask.bool().unsqueeze(-1), negatives, junk)
    return student, teacher, mask, negatives, nmask


def _full(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One anchor-like tensor (B, L, D) -> (tensor, all-ones mask)."""
    return x, torch.ones(x.shape[:-1], dtype=torch.long)


# ---------------------------------------------------------------- cos_nce vs naive loop


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("l", "ln"), [(9, 12), (12, 5), (7, 7)])
def test_cos_nce_matches_naive_loop(granularity, l, ln):
    torch.manual_seed(0)
    student, teacher, mask, negatives, nmask = _batch(seed=l * 100 + ln, b=5, k=4, l=l, ln=ln)
    alens, nlens = mask.sum(1, keepdim=True), nmask.sum(2)
    if l != ln:  # the case under test must really have both longer and shorter negatives
        assert (nlens > alens).any() and (nlens < alens).any()
    got = cos_nce(student, teacher, mask, negatives, nmask, granularity)
    want = cos_nce_naive(student, teacher, mask, negatives, nmask, granularity)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, abs=1e-5)


def test_granularities_differ_on_multi_token_input():
    # Guards against one granularity silently aliasing another.
    student, teacher, mask, negatives, nmask = _batch(seed=7)
    values = {g: cos_nce(student, teacher, mask, negatives, nmask, g).item() for g in GRANULARITIES}
    assert len({round(v, 4) for v in values.values()}) == 3, values


# ---------------------------------------------------------------- hand values


def _orthogonal_pair(seed: int, b=2, l=5, k=3, d=6):
    """Anchor in span(e0..e2), negatives in span(e3..e5): orthogonal token by token and flattened."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.zeros(b, l, d)
    anchor[..., :3] = torch.randn(b, l, 3, generator=gen)
    negatives = torch.zeros(b, k, l + 2, d)
    negatives[..., 3:] = torch.randn(b, k, l + 2, 3, generator=gen)
    return anchor, negatives


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_hand_value_identical_target_orthogonal_negatives(granularity):
    anchor, negatives = _orthogonal_pair(seed=1)
    z, mask = _full(anchor)
    nmask = torch.ones(negatives.shape[:-1], dtype=torch.long)
    nmask[0, 0, 2:] = 0  # one negative shorter than the anchor
    # g(z_T, z_S) = 0, g(n, z_S) = 1 -> each bracket 2 - 1 = 1 -> L = 1/(2K) * K = 0.5
    loss = cos_nce(z, z.clone(), mask, negatives, nmask, granularity)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_hand_value_negatives_opposite_student(granularity):
    torch.manual_seed(2)
    z = torch.randn(3, 6, 4)
    mask = _prefix_mask(torch.tensor([6, 4, 2]), 6)
    k = 2
    # Negative j of row b is -z_S over its own length (3 = shorter, 8 = longer than some anchors).
    negatives = torch.zeros(3, k, 8, 4)
    negatives[:, :, :6] = -z.unsqueeze(1)
    negatives[:, :, 6:] = 50.0  # positions no anchor has: must not count
    nmask = _prefix_mask(torch.tensor([[3, 8], [8, 3], [1, 8]]), 8)
    # g(z_T, z_S) = 0, g(n, z_S) = 2 -> bracket 2 - 2 = 0 -> L = 0
    loss = cos_nce(z, z.clone(), mask, negatives, nmask, granularity)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_hand_value_negatives_equal_student_orthogonal_target(granularity):
    z_s, z_t = _orthogonal_pair(seed=3, k=1)
    z_t = z_t[:, 0, :5]  # (B, L, D), orthogonal to z_S token by token
    z_s, mask = _full(z_s)
    k = 4
    negatives = z_s.unsqueeze(1).repeat(1, k, 1, 1)
    nmask = torch.ones(negatives.shape[:-1], dtype=torch.long)
    # g(z_T, z_S) = 1, g(n, z_S) = 0 -> bracket 2 - (0 - 1) = 3 -> L = 1 + 1/(2K) * 3K = 2.5
    loss = cos_nce(z_s, z_t, mask, negatives, nmask, granularity)
    assert loss.item() == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_hand_value_maximum_is_four(granularity):
    torch.manual_seed(4)
    z, mask = _full(torch.randn(2, 3, 5))
    negatives = z.unsqueeze(1).repeat(1, 2, 1, 1)
    nmask = torch.ones(negatives.shape[:-1], dtype=torch.long)
    # z_T = -z_S: g_pos = 2; n = z_S: g_neg = 0 -> L = 2 + 1/(2K) * K * (2 - (0 - 2)) = 4
    loss = cos_nce(z, -z, mask, negatives, nmask, granularity)
    assert loss.item() == pytest.approx(4.0, abs=1e-6)


def test_hand_value_single_token_45_degrees():
    z_s = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    z_t = torch.tensor([[[1.0, 1.0]]])  # 45 degrees: g_pos = 1 - 1/sqrt(2)
    neg = torch.tensor([[[[0.0, 3.0]]]])  # (1, 1, 1, 2), 90 degrees: g_neg = 1
    g = 1 - 1 / math.sqrt(2)
    want = g + 0.5 * (2 - (1 - g))  # = 2 - 1.5 / sqrt(2)
    for granularity in GRANULARITIES:
        loss = cos_nce(z_s, z_t, torch.ones(1, 1), neg, torch.ones(1, 1, 1), granularity)
        assert loss.item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(2 - 1.5 / math.sqrt(2))


def test_hand_values_per_granularity_without_negatives():
    # Two tokens: student (1,0), (0,1); teacher (10,0), (1,0).  K = 0 leaves L = g(z_T, z_S).
    z_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    z_t = torch.tensor([[[10.0, 0.0], [1.0, 0.0]]])
    mask = torch.ones(1, 2)
    neg, nmask = torch.zeros(1, 0, 2, 2), torch.zeros(1, 0, 2)
    want = {
        "flat": 1 - 10 / (math.sqrt(2) * math.sqrt(101)),  # one 4-vector
        "token": 1 - (1 + 0) / 2,  # mean of per-token cosines 1 and 0
        "cls": 0.0,  # first tokens are parallel
    }
    for granularity, value in want.items():
        loss = cos_nce(z_s, z_t, mask, neg, nmask, granularity)
        assert loss.item() == pytest.approx(value, abs=1e-6), granularity


@pytest.mark.parametrize("seed", range(5))
def test_loss_within_zero_and_four(seed):
    student, teacher, mask, negatives, nmask = _batch(seed=seed, d=3)
    for granularity in GRANULARITIES:
        loss = cos_nce(student, teacher, mask, negatives, nmask, granularity).item()
        assert 0.0 <= loss <= 4.0


def test_cos_nce_without_negatives_is_the_angular_distance_by_hand():
    """With K = 0 COS-NCE is g(z_T, z_S) = 1 - cos alone: same direction 0, orthogonal 1, opposite 2, zero vector 1."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]])
    none, one = torch.zeros(1, 0, 1, 2), torch.ones(1, 1)
    got = [cos_nce(s.view(1, 1, 2), t.view(1, 1, 2), one, none, torch.zeros(1, 0, 1)).item() for s, t in zip(x, y)]
    assert got == pytest.approx([0.0, 1.0, 2.0, 1.0], abs=1e-6)


# ---------------------------------------------------------------- single tokens and padding


@pytest.mark.parametrize("padded", [False, True])
def test_granularities_agree_on_one_token_sequences(padded):
    gen = torch.Generator().manual_seed(5)
    b, k, d = 3, 2, 6
    l, ln = (4, 3) if padded else (1, 1)
    student, teacher = torch.randn(b, l, d, generator=gen), torch.randn(b, l, d, generator=gen)
    negatives = torch.randn(b, k, ln, d, generator=gen)
    mask = _prefix_mask(torch.ones(b, dtype=torch.long), l)
    nmask = _prefix_mask(torch.randint(1, ln + 1, (b, k), generator=gen), ln)
    values = [cos_nce(student, teacher, mask, negatives, nmask, g).item() for g in GRANULARITIES]
    assert values[0] == pytest.approx(values[1], abs=1e-6) and values[0] == pytest.approx(values[2], abs=1e-6)


def _pad(x: torch.Tensor, mask: torch.Tensor, extra: int, dim: int, gen, scale: float):
    """Append `extra` positions of huge garbage (mask 0) along the sequence dim."""
    shape = list(x.shape)
    shape[dim] = extra
    junk = scale * torch.randn(shape, generator=gen)
    mshape = list(mask.shape)
    mshape[dim] = extra
    return torch.cat([x, junk], dim), torch.cat([mask, torch.zeros(mshape, dtype=mask.dtype)], dim)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("where", ["anchor", "negatives", "both"])
def test_padding_never_changes_loss_or_gradient(granularity, where):
    gen = torch.Generator().manual_seed(6)
    student, teacher, mask, negatives, nmask = _batch(seed=8, garbage=0.0)
    l = student.shape[1]

    base_s = student.clone().requires_grad_(True)
    base = cos_nce(base_s, teacher, mask, negatives, nmask, granularity)
    (base_grad,) = torch.autograd.grad(base, base_s)

    s, t, m, n, nm = student, teacher, mask, negatives, nmask
    if where in ("anchor", "both"):
        s, m2 = _pad(s, m, 5, 1, gen, 1e4)
        t, m = _pad(t, m, 5, 1, gen, 1e4)
        assert torch.equal(m, m2)
    if where in ("negatives", "both"):
        n, nm = _pad(n, nm, 6, 2, gen, 1e4)
    padded_s = s.clone().requires_grad_(True)
    padded = cos_nce(padded_s, t, m, n, nm, granularity)
    (padded_grad,) = torch.autograd.grad(padded, padded_s)

    assert padded.item() == pytest.approx(base.item(), abs=1e-6)
    assert torch.allclose(padded_grad[:, :l], base_grad, atol=1e-6)
    real = mask.bool().unsqueeze(-1).expand_as(base_grad)
    assert base_grad[real].abs().sum() > 0  # the comparison above is not between two zero tensors
    assert torch.all(padded_grad[:, :l][~real] == 0) and torch.all(padded_grad[:, l:] == 0)


def test_inf_and_nan_in_padding_do_not_leak():
    student, teacher, mask, negatives, nmask = _batch(seed=9)
    base = cos_nce(student, teacher, mask, negatives, nmask, "flat")
    student = torch.where(mask.bool().unsqueeze(-1), student, float("inf"))
    negatives = torch.where(nmask.bool().unsqueeze(-1), negatives, float("nan"))
    leaked = cos_nce(student, teacher, mask, negatives, nmask, "flat")
    assert leaked.item() == pytest.approx(base.item(), abs=1e-6)


# ---------------------------------------------------------------- gradients and dtypes


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradient_flows_to_student_only_and_is_finite(granularity):
    student, teacher, mask, negatives, nmask = _batch(seed=10)
    student = student.requires_grad_(True)
    loss = cos_nce(student, teacher, mask, negatives, nmask, granularity)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # Against finite differences on a small problem (the loss computes in float32: loose tolerance).
    s, t, m, n, nm = _batch(seed=11, b=2, k=2, l=3, ln=4, d=3)
    s = s.double().requires_grad_(True)
    loss_of = lambda x: cos_nce(x, t, m, n, nm, granularity).double()  # noqa: E731
    assert torch.autograd.gradcheck(loss_of, (s,), eps=1e-3, atol=1e-3)


def test_zero_vectors_give_finite_loss_and_gradient():
    student, teacher, mask, negatives, nmask = _batch(seed=12)
    student = torch.zeros_like(student, requires_grad=True)
    negatives = negatives.clone()
    negatives[0] = 0.0
    for granularity in GRANULARITIES:
        loss = cos_nce(student, teacher, mask, negatives, nmask, granularity)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_teacher_targets(dtype):
    student, teacher, mask, negatives, nmask = _batch(seed=13)
    teacher_h, negatives_h = teacher.to(dtype), negatives.to(dtype)
    student = student.requires_grad_(True)
    for granularity in GRANULARITIES:
        loss = cos_nce(student, teacher_h, mask, negatives_h, nmask, granularity)
        want = cos_nce_naive(
            student.detach(), teacher_h.float(), mask, negatives_h.float(), nmask, granularity
        )
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(want, abs=1e-5)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()


def test_bad_granularity_and_shapes_are_rejected():
    student, teacher, mask, negatives, nmask = _batch(seed=14)
    with pytest.raises(LrcError, match="granularity"):
        cos_nce(student, teacher, mask, negatives, nmask, "mean")
    with pytest.raises(ValueError, match="shapes"):
        cos_nce(student, teacher[:, :-1], mask, negatives, nmask)
    with pytest.raises(ValueError, match="shapes"):
        cos_nce(student, teacher, mask, negatives[..., :-1], nmask)


# ---------------------------------------------------------------- prediction-layer losses


def _soft_naive(y_s: torch.Tensor, y_t: torch.Tensor, t: float) -> float:
    total = 0.0
    for row_s, row_t in zip(y_s.double().tolist(), y_t.double().tolist()):
        zs = [math.exp(v / t) for v in row_s]
        zt = [math.exp(v / t) for v in row_t]
        q = [v / sum(zs) for v in zs]
        p = [v / sum(zt) for v in zt]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(y_s) * t * t


@pytest.mark.parametrize("temperature", [1.1, 1.0, 4.0])
def test_soft_loss_matches_naive_kl(temperature):
    gen = torch.Generator().manual_seed(20)
    y_s, y_t = 2 * torch.randn(6, 3, generator=gen), 2 * torch.randn(6, 3, generator=gen)
    got = soft_loss(y_s, y_t, temperature=temperature)
    assert got.item() == pytest.approx(_soft_naive(y_s, y_t, temperature), rel=1e-5)
    assert soft_loss(y_s, y_t.half(), temperature).item() == pytest.approx(
        _soft_naive(y_s, y_t.half().float(), temperature), rel=1e-4
    )


def test_soft_loss_at_the_papers_temperature_and_zero_for_identical_logits():
    t = default_of(TrainConfig, "temperature")
    assert t == 1.1  # the paper's t, the one default train-student uses
    gen = torch.Generator().manual_seed(21)
    y = torch.randn(5, 4, generator=gen)
    assert soft_loss(y, y.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(5, 4, generator=gen)
    assert soft_loss(y, other, t).item() == pytest.approx(_soft_naive(y, other, 1.1), rel=1e-5)


def test_soft_loss_regression_is_mse():
    y_s = torch.tensor([[1.0], [2.0], [0.5]])
    y_t = torch.tensor([1.5, 2.0, -0.5])
    want = (0.5**2 + 0.0 + 1.0**2) / 3
    assert soft_loss(y_s, y_t, 1.1, regression=True).item() == pytest.approx(want)


def test_hard_loss_matches_naive_cross_entropy():
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(7, 3, generator=gen)
    labels = torch.randint(0, 3, (7,), generator=gen)
    naive = 0.0
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        naive += -math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
    assert hard_loss(logits, labels).item() == pytest.approx(naive / 7, rel=1e-5)
    assert hard_loss(logits.bfloat16(), labels).dtype == torch.float32


@pytest.mark.parametrize("shape", [(3, 1), (3,)])
def test_hard_loss_regression_is_mse_to_float_label(shape):
    logits = torch.tensor([3.0, 0.0, 1.0]).reshape(shape)
    labels = torch.tensor([2.5, 1.0, 1.0], dtype=torch.float64)
    want = (0.25 + 1.0 + 0.0) / 3
    assert hard_loss(logits, labels, regression=True).item() == pytest.approx(want)


def test_hidden_mse_ignores_padding():
    gen = torch.Generator().manual_seed(23)
    b, l, d = 3, 6, 4
    lens = torch.tensor([6, 2, 4])
    mask = _prefix_mask(lens, l)
    student, teacher = torch.randn(b, l, d, generator=gen), torch.randn(b, l, d, generator=gen)
    naive_sum, count = 0.0, 0
    for i in range(b):
        diff = (student[i, : lens[i]] - teacher[i, : lens[i]]).double()
        naive_sum += (diff**2).sum().item()
        count += int(lens[i]) * d
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(naive_sum / count, rel=1e-5)
    # Garbage in the padding changes nothing; a float16 teacher is cast up.
    clean = hidden_mse(student, teacher.half().float(), mask)
    garbage = torch.where(mask.bool().unsqueeze(-1), student, 1e4 * torch.randn(b, l, d, generator=gen))
    assert hidden_mse(garbage, teacher.half(), mask).item() == pytest.approx(clean.item(), rel=1e-5)
