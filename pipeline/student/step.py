"""One training step (docs/DESIGN.md §2): the student's forward pass, the loss terms by name, the gradient
perturbation of the embedding output, and the backward pass. No optimizer step: the loop owns that."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.errors import LrcError
from pipeline.core.families import embedding_output, model_inputs
from pipeline.core.runtime import all_finite, autocast
from pipeline.core.train_config import TrainConfig
from pipeline.student import losses
from pipeline.student.model import Projections
from pipeline.student.objective import Objective

# Three layer numberings meet here. A teacher layer j is 1-based (phi(i), `Run.layer_map`). The batch
# carries only the stored teacher layers the map uses, sorted: batch["teacher_hidden"][slot]. Student
# layer i is 1-based too: hidden_states[i], projected by W_i = projections.maps[i - 1].


@dataclass
class Model:
    """What the optimizer trains: the student and (for an intermediate loss) the projections W_i."""

    student: torch.nn.Module
    projections: Projections | None
    teacher_slots: list[int]  # per student layer i (in order): the slot of teacher layer phi(i) in teacher_hidden
    # Under torchrun: DistributedDataParallel over Trainable(student, projections), the same parameters. Only
    # a pass whose backward updates the parameters runs through it (see train_step); None in one process.
    synced: torch.nn.Module | None = None


def forward(student: torch.nn.Module, projections: Projections | None, inputs: dict[str, torch.Tensor],
            logits: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """The student's logits (None unless `logits`) and its projected layer outputs M x (B, L, d') (None without
    projections). A corpus batch has no labels: its logits are left out, so DDP (find_unused_parameters) sees
    the head as unused instead of waiting for gradients that never come."""
    output = student(**inputs, output_hidden_states=projections is not None)
    projected = projections(list(output.hidden_states[1:])) if projections is not None else None  # layers 1..M
    return output.logits if logits else None, projected


class Trainable(torch.nn.Module):
    """The student and its projections as one module, so that one DistributedDataParallel covers every
    trained parameter and all-reduces them in one backward."""

    def __init__(self, student: torch.nn.Module, projections: Projections | None) -> None:
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, inputs: dict[str, torch.Tensor], logits: bool = True
                ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        return forward(self.student, self.projections, inputs, logits)


def loss_terms(model: Model, batch: dict[str, torch.Tensor], config: TrainConfig, objective: Objective,
               embeddings: torch.Tensor | None = None, sync: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the student and compute each loss term by name. With `embeddings`, the student's embedding
    module does not run: the layers above it start from that tensor (the perturbed pass's e'). `sync`:
    run through `model.synced` (DistributedDataParallel) when there is one.

    Returns the terms and the embedding output e the pass used, so the caller can take dL/de.
    """
    inputs = model_inputs(model.student, batch)
    with embedding_output(model.student, embeddings) as captured:
        if sync and model.synced is not None:
            logits, projected = model.synced(inputs, objective.predicts)
        else:
            logits, projected = forward(model.student, model.projections, inputs, objective.predicts)
    terms: dict[str, torch.Tensor] = {}
    if projected is not None:
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
    if objective.predicts:
        logits = logits.float()
        terms["soft"] = losses.soft_loss(logits, batch["teacher_logits"], config.temperature, objective.regression)
        terms["hard"] = losses.hard_loss(logits, batch["labels"], objective.regression)
    return terms, captured["e"]


def _negatives(batch: dict[str, torch.Tensor], slot: int, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot's negatives (B, K, Ln, d') and their mask (B, K, Ln); with --k 0 the batch carries none, and
    K = 0 leaves COS-NCE its positive term alone."""
    if "negative_hidden" in batch:
        return batch["negative_hidden"][slot], batch["negative_mask"]
    b, length, width = target.shape
    return target.new_zeros(b, 0, length, width), batch["attention_mask"].new_zeros(b, 0, length)


def weighted_total(terms: dict[str, torch.Tensor], weights: tuple[float, float, float]) -> torch.Tensor:
    """alpha * L_intermediate + beta * L_soft + gamma * L_hard over the terms the objective computed (general
    distillation has no soft or hard term; --intermediate-loss none no intermediate one)."""
    alpha, beta, gamma = weights
    parts = [beta * terms["soft"], gamma * terms["hard"]] if "soft" in terms else []
    parts += [alpha * v for k, v in terms.items() if k not in ("soft", "hard")]
    return sum(parts[1:], parts[0])


def train_step(model: Model, batch: dict[str, torch.Tensor], weights: tuple[float, float, float],
               config: TrainConfig, objective: Objective, device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, optional gradient perturbation of the embedding output, backward. No optimizer step.

    Under DistributedDataParallel only the pass whose backward updates the parameters runs through the
    wrapper, so each step all-reduces the gradients exactly once. The perturbation's first pass runs on the
    unwrapped modules: it takes dL/de with autograd.grad, which accumulates into no parameter and fires none
    of DDP's gradient hooks, so no all-reduce starts. Had it gone through DDP's forward, the reducer would
    be armed for a backward that never comes (with find_unused_parameters, as a corpus run needs, it even
    marks unused parameters ready at once and starts their all-reduce); `no_sync()` would avoid arming it but
    still pay DDP's forward bookkeeping for nothing. The unwrapped call holds the same parameters, so the
    math is unchanged; each rank's gr is its own samples' (the normalisation is per sample, so it does not
    depend on how the batch is split).
    """
    perturb = config.perturb_eps > 0
    with autocast(device, config.precision):
        terms, embeddings = loss_terms(model, batch, config, objective, sync=not perturb)
        total = weighted_total(terms, weights)
        if perturb:
            # A non-finite term here would poison e' and every term of the second pass: name it now.
            _check_finite(terms)
            # gr = dL_total/de, no parameter update from this pass. Then only the layers above the embeddings
            # run again, on e' = e + eps * gr / ||gr||: the same e (one embedding dropout draw), so the
            # update's gradient still reaches the embedding parameters through e.
            (grad,) = torch.autograd.grad(total, embeddings)
            norm = grad.float().flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)  # (B, 1, 1) over l x d
            delta = (config.perturb_eps * grad.float() / norm).to(embeddings.dtype).detach()  # (B, L, d)
            terms, _ = loss_terms(model, batch, config, objective, embeddings + delta, sync=True)
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
        # Hidden-state padding holds stale values of earlier batches (gather.gather_hidden): only real tokens count.
        if key == "teacher_hidden":
            bad &= batch["attention_mask"].bool()[None, :, :, None]
            rows = batch["row_ids"][bad.flatten(2).any(2).any(0)]  # (N_layers, B, ...) -> (B,)
        elif key == "negative_hidden":
            bad &= batch["negative_mask"].bool()[None, :, :, :, None]
            rows = batch["negative_ids"][bad.flatten(3).any(3).any(0)]  # (N_layers, B, K, ...) -> (B, K)
        else:
            rows = batch["row_ids"][bad.reshape(len(bad), -1).any(1)]
        if rows.numel():
            found = sorted(set(rows.tolist()))
            raise LrcError(f"cache {cache_dir} holds non-finite {what} (NaN or inf) for train row(s) "
                           f"{', '.join(map(str, found[:5]))}: the cache is damaged (check it with `lrc inspect-cache "
                           "--verify`); re-extract it with `lrc extract-teacher --overwrite`")
