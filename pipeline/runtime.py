"""Small helpers every stage needs: device choice, seeding, autocast, logging setup."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.errors import LrcError


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrcError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> ContextManager[None]:
    """bf16 autocast (faster on CPUs and GPUs with bf16 units; docs/PERFORMANCE.md) or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers and datasets are chatty at INFO; their warnings still show.
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "filelock", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def pad_batch(
    ids: list[list[int]], types: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch of unpadded sequences: (input_ids, token_type_ids, attention_mask), each (B, L)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    token_types = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    for i, (a, t) in enumerate(zip(ids, types)):
        input_ids[i, : len(a)] = torch.tensor(a)
        token_types[i, : len(t)] = torch.tensor(t)
        mask[i, : len(a)] = 1
    return input_ids.to(device), token_types.to(device), mask.to(device)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    ids: list[list[int]],
    types: list[list[int]],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    pad_id: int = 0,
    segments: bool = True,
) -> np.ndarray:
    """(N, C) float32 logits in input order; batches are length-sorted to cut padding.

    Runs in eval mode (no dropout) and leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.empty((len(ids), model.config.num_labels), np.float32)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        input_ids, token_types, mask = pad_batch([ids[r] for r in rows], [types[r] for r in rows], pad_id, device)
        extra = {"token_type_ids": token_types} if segments else {}
        with autocast(device, precision):
            out[rows] = model(input_ids=input_ids, attention_mask=mask, **extra).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def encode(tokenizer: Any, text_a: list[str], text_b: list[str] | None, max_length: int) -> tuple[list, list]:
    """Unpadded input ids and segment ids (zeros for models without segments), truncated to max_length."""
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    types = enc["token_type_ids"] if "token_type_ids" in enc else [[0] * len(x) for x in ids]
    return ids, types


def load_classifier(model_dir: Path, num_labels: int, task_name: str, role: str, fixes: dict[str, str]) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer, checked before any work: the dir exists, has a
    classification head, and predicts the task's label count. `fixes` holds the hint each check's
    one-line error ends with (keys: missing, head, labels), worded for the calling command."""
    if not Path(model_dir).is_dir():
        raise LrcError(f"{role} {model_dir} does not exist: {fixes['missing']}")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LrcError(f"{role} {model_dir} has no classification head (architectures: {architectures or 'none'}): "
                       f"{fixes['head']}")
    if config.num_labels != num_labels:
        raise LrcError(f"{role} {model_dir} predicts {config.num_labels} labels but task {task_name} has "
                       f"{num_labels}: {fixes['labels']}")
    return AutoModelForSequenceClassification.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def apply_update(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                 max_grad_norm: float) -> float:
    """Clip the global gradient norm to `max_grad_norm` (0 = no clipping), step, advance the schedule and
    zero the gradients in place (the buffers, 30522 x d for the word embeddings, are reused rather than
    reallocated). Returns the gradient norm before clipping."""
    if max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=False)
    return norm
