"""One training step (DESIGN §2): the student's forward pass, the loss terms by name, the gradient
perturbation of the embedding output, and the backward pass. No optimizer step: the loop owns that."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import losses
from pipeline.config import TrainConfig
from pipeline.errors import LrcError
from pipeline.families import embedding_output, model_inputs
from pipeline.runtime import all_finite, autocast
from pipeline.student import Projections

# Three layer numberings meet here. A teacher layer j is 1-based (phi(i), `Run.layer_map`). The batch
# carries only the stored teacher layers the map uses, sorted: batch["teacher_hidden"][slot]. Student
# layer i is 1-based too: hidden_states[i], projected by W_i = projections.maps[i - 1].


@dataclass
class Model:
    """What the optimizer trains: the student and (for an intermediate loss) the projections W_i."""

    student: torch.nn.Module
    projections: Projections | None
    teacher_slots: list[int]  # per student layer i (in order): the slot of teacher layer phi(i) in teacher_hidden


def loss_terms(model: Model, batch: dict[str, torch.Tensor], config: TrainConfig, regression: bool,
               embeddings: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the student and compute each loss term by name. With `embeddings`, the student's embedding
    module does not run: the layers above it start from that tensor (the perturbed pass's e').

    Returns the terms and the embedding output e the pass used, so the caller can take dL/de.
    """
    with embedding_output(model.student, embeddings) as captured:
        output = model.student(**model_inputs(model.student, batch), output_hidden_states=model.projections is not None)
    terms: dict[str, torch.Tensor] = {}
    if model.projections is not None:
        projected = model.projections(list(output.hidden_states[1:]))  # M x (B, L, d'), student layers 1..M
        mask = batch["attention_mask"]
        per_layer = []
        for z, slot in zip(projected, model.teacher_slots):
            target = batch["teacher_hidden"][slot]  # (B, L, d')
            if config.intermediate_loss == "cos_nce":
                negatives, negatives_mask = _negatives(batch, slot, target)
                per_layer.append(losses.cos_nce(z, target, mask, negatives, negatives_mask, config.granularity,
                                                batch.get("negative_pos")))  # in-batch negatives: positions
            else:
                per_layer.append(losses.hidden_mse(z, target, mask))
        terms[config.intermediate_loss] = torch.stack(per_layer).sum()
    if "labels" in batch:  # a corpus batch (general distillation) has no labels and no teacher logits
        logits = output.logits.float()
        terms["soft"] = losses.soft_loss(logits, batch["teacher_logits"], config.temperature, regression)
        terms["hard"] = losses.hard_loss(logits, batch["labels"], regression)
    return terms, captured["e"]


def _negatives(batch: dict[str, torch.Tensor], slot: int, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot's negatives (B, K, Ln, d') and their mask (B, K, Ln); with --k 0 the batch carries none, and
    K = 0 leaves COS-NCE its positive term alone."""
    if "negative_hidden" in batch:
        return batch["negative_hidden"][slot], batch["negative_mask"]
    b, length, width = target.shape
    return target.new_zeros(b, 0, length, width), batch["attention_mask"].new_zeros(b, 0, length)


def weighted_total(terms: dict[str, torch.Tensor], weights: tuple[float, float, float]) -> torch.Tensor:
    alpha, beta, gamma = weights
    intermediate = [v for k, v in terms.items() if k not in ("soft", "hard")]
    if "soft" not in terms:  # general distillation: the intermediate loss alone
        return alpha * intermediate[0]
    total = beta * terms["soft"] + gamma * terms["hard"]
    return total + alpha * intermediate[0] if intermediate else total


def train_step(model: Model, batch: dict[str, torch.Tensor], weights: tuple[float, float, float],
               config: TrainConfig, regression: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, optional gradient perturbation of the embedding output, backward. No optimizer step."""
    with autocast(device, config.precision):
        terms, embeddings = loss_terms(model, batch, config, regression)
        total = weighted_total(terms, weights)
        if config.perturb_eps > 0:
            # A non-finite term here would poison e' and every term of the second pass: name it now.
            _check_finite(terms)
            # gr = dL_total/de, no parameter update from this pass. Then only the layers above the embeddings
            # run again, on e' = e + eps * gr / ||gr||: the same e (one embedding dropout draw), so the
            # update's gradient still reaches the embedding parameters through e.
            (grad,) = torch.autograd.grad(total, embeddings)
            norm = grad.float().flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)  # (B, 1, 1) over l x d
            delta = (config.perturb_eps * grad.float() / norm).to(embeddings.dtype).detach()  # (B, L, d)
            terms, _ = loss_terms(model, batch, config, regression, embeddings + delta)
            total = weighted_total(terms, weights)
    _check_finite(terms)
    total.backward()
    return {**{k: v.detach() for k, v in terms.items()}, "loss": total.detach()}


def _check_finite(terms: dict[str, torch.Tensor]) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value):
            raise FloatingPointError(f"loss term {name} is {value.item()}")


_CACHED_VALUES = {"labels": "labels", "teacher_logits": "teacher logits", "teacher_hidden": "teacher hidden states",
                  "negative_hidden": "teacher hidden states"}


def check_batch_finite(batch: dict[str, torch.Tensor], cache_dir: Path) -> None:
    """A NaN or inf read from the cache is the cache's fault, not the learning rate's: refuse it by row.

    `all_finite` is the cheap test; the rows are looked for only when it fails."""
    for key, what in _CACHED_VALUES.items():
        value = batch.get(key)
        if value is None or not value.is_floating_point() or all_finite(value):
            continue
        bad = ~torch.isfinite(value)
        if key == "teacher_hidden":
            rows = batch["row_ids"][bad.flatten(2).any(2).any(0)]  # (N_layers, B, ...) -> (B,)
        elif key == "negative_hidden":
            rows = batch["negative_ids"][bad.flatten(3).any(3).any(0)]  # (N_layers, B, K, ...) -> (B, K)
        else:
            rows = batch["row_ids"][bad.reshape(len(bad), -1).any(1)]
        if rows.numel():
            found = sorted(set(rows.tolist()))
            raise LrcError(f"cache {cache_dir} holds non-finite {what} (NaN or inf) for train row(s) "
                           f"{', '.join(map(str, found[:5]))}: the cache is damaged (check it with `lrc inspect-cache "
                           "--verify`); re-extract it with `lrc extract-teacher --overwrite`")
