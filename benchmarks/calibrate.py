"""Unit costs of each stage on this device, measured on a task's real token lengths before any stage runs
(used by paper_table.py to predict, and to size, a run).

Each cost is the median of a few timed calls after warm-up calls, with the device synchronised:
- teacher_step: one fine-tuning step (forward, backward, AdamW) of --teacher-batch-size real rows;
- teacher_eval: one forward of 128 dev rows (fine-tuning evaluates every epoch);
- teacher_forward: one extraction batch (64 rows, every hidden state returned and copied to the host);
- step:<method>: one student step of the library's `train_step` + `apply_update` on a batch of 16 real rows
  whose teacher targets (and K negatives) are random tensors of the cache's shapes, moved to the device as
  the data path moves them;
- student_eval: one forward of the student over 128 rows.
What it leaves out: model loading, the Arrow writes of extraction, the DataLoader's reading (hidden behind
workers on a GPU), checkpoint writes. The comparison with measured times is in paper_table.md.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from pipeline.core.config import BUNDLED_BACKBONE, layer_map
from pipeline.core.runtime import apply_update, autocast, encode, pad_batch, pick_device, predict_logits
from pipeline.core.tasks import get_task
from pipeline.core.train_config import TrainConfig
from pipeline.student.batches import to_device
from pipeline.student.model import Projections, build_student, student_config
from pipeline.student.objective import Objective
from pipeline.student.step import Model, train_step
from pipeline.teacher.finetune import resolve_backbone

log = logging.getLogger("calibrate")


def timed(call: Callable[[int], Any], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `call(i)` over `repeats` calls after `warmup` untimed ones."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_backbone(path: Path) -> Path:
    """A random 2 x 32 BERT with the bundled backbone's real tokenizer (the smoke mode's teacher)."""
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128)
        BertModel(config).save_pretrained(path)  # an encoder without a head, as a pre-trained backbone
        AutoTokenizer.from_pretrained(resolve_backbone(BUNDLED_BACKBONE)).save_pretrained(path)
    return path


def calibrate_task(plan: dict[str, Any], args: Any, shape: dict[str, int], methods: tuple[str, ...]) -> dict[str, float]:
    from glue_results import METHODS, PAPER_EPS

    device = pick_device(args.device)
    task = get_task(plan["task"])
    backbone = resolve_backbone(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    train = plan["train"]
    rng = np.random.default_rng(0)
    rows = rng.choice(len(train), size=min(len(train), 512), replace=len(train) < 512)
    text_b = [train.text_b[r] for r in rows] if train.text_b is not None else None
    ids, types = encode(tokenizer, [train.text_a[r] for r in rows], text_b, args.max_length)
    pad = tokenizer.pad_token_id or 0
    labels = 1 if task.is_regression else len(task.labels)
    # timing only: a backbone that already has a head of another size gets a fresh one
    teacher = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=labels,
                                                                 ignore_mismatched_sizes=True).to(device)
    segments = "token_type_ids" in tokenizer.model_input_names

    def batch(i: int, size: int) -> tuple[torch.Tensor, ...]:
        pick = [(i * size + j) % len(ids) for j in range(size)]
        return pad_batch([ids[j] for j in pick], [types[j] for j in pick], pad, device)

    def inputs(i: int, size: int) -> dict[str, torch.Tensor]:
        input_ids, token_types, mask = batch(i, size)
        return {"input_ids": input_ids, "attention_mask": mask, **({"token_type_ids": token_types} if segments else {})}

    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-7)

    def teacher_step(i: int) -> None:
        x = inputs(i, args.teacher_batch_size)
        target = torch.zeros(x["input_ids"].shape[0], dtype=torch.float if task.is_regression else torch.long,
                             device=device)
        with autocast(device, args.precision):
            loss = teacher(**x, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def forward(i: int, size: int, hidden: bool) -> None:
        with autocast(device, args.precision):
            out = teacher(**inputs(i, size), output_hidden_states=hidden)
        if hidden:  # extraction copies every stored layer off the device
            [h.to("cpu", torch.float16) for h in out.hidden_states]

    costs = {"teacher_step": timed(teacher_step, device)}
    teacher.eval()
    costs["teacher_eval"] = timed(lambda i: forward(i, 128, False), device, 1, 3)
    costs["teacher_forward"] = timed(lambda i: forward(i, 64, True), device, 1, 3)
    width, depth = teacher.config.hidden_size, teacher.config.num_hidden_layers
    task_info = {"labels": list(task.labels) if task.labels else None, "is_regression": task.is_regression}
    teacher_config = teacher.config.to_dict()
    del teacher, optimizer
    mapping = layer_map(depth, shape["layers"])
    for method in methods:
        config = replace(TrainConfig(cache_dir=Path("."), output_dir=Path("."), device=device.type,
                                     precision=args.precision, k=args.k, batch_size=args.batch_size,
                                     perturb_eps=PAPER_EPS),
                         **METHODS[method])
        costs[f"step:{method}"] = _student_step(config, teacher_config, Objective(task, task_info), mapping, shape, ids, types, width,
                                                labels, device)
    student = build_student(student_config(teacher_config, **_shape_args(shape), task=task_info), "random", None,
                            mapping).to(device)
    costs["student_eval"] = timed(lambda i: predict_logits(student, ids[:128], types[:128], 128, device,
                                                           args.precision, pad, segments), device, 1, 3)
    log.info("calibrated %s on %s: %s", plan["task"], device, {k: f"{v * 1e3:.1f} ms" for k, v in costs.items()})
    return costs


def _shape_args(shape: dict[str, int]) -> dict[str, int]:
    return {k: shape[k] for k in ("layers", "hidden", "heads", "intermediate")}


def _student_step(config: TrainConfig, teacher_config: dict, objective: Objective, mapping: list[int],
                  shape: dict[str, int], ids: list, types: list, width: int, labels: int,
                  device: torch.device) -> float:
    torch.manual_seed(0)
    student = build_student(student_config(teacher_config, **_shape_args(shape), task=objective.head), "random",
                            None, mapping).to(device)
    intermediate = config.intermediate_loss != "none"
    stored = sorted(set(mapping))
    projections = Projections(shape["hidden"], width, len(mapping)).to(device) if intermediate else None
    model = Model(student, projections, [stored.index(j) for j in mapping] if intermediate else [])
    params = list(student.parameters()) + (list(projections.parameters()) if projections is not None else [])
    optimizer = torch.optim.AdamW(params, lr=1e-7, fused=True)  # as train-student
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    b, k = config.batch_size, config.k if intermediate else 0

    def host_batch(i: int) -> dict[str, torch.Tensor]:
        pick = [(i * b + j) % len(ids) for j in range(b)]
        input_ids, token_types, mask = pad_batch([ids[j] for j in pick], [types[j] for j in pick], 0,
                                                 torch.device("cpu"))
        length = input_ids.shape[1]
        out = {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask,
               "teacher_logits": torch.randn(b, labels),
               "labels": torch.rand(b) * 5 if labels == 1 else torch.randint(0, labels, (b,))}
        if intermediate:
            out["teacher_hidden"] = torch.randn(len(stored), b, length, width).half()
            if config.intermediate_loss == "cos_nce" and k:
                out["negative_hidden"] = torch.randn(len(stored), b, k, length, width).half()
                out["negative_mask"] = mask[:, None, :].expand(b, k, length).contiguous()
        return out

    batches = [host_batch(i) for i in range(8)]

    def step(i: int) -> None:
        moved = to_device(batches[i % len(batches)], device)
        train_step(model, moved, (1.0, 1.0, 3.0), config, objective, device)
        apply_update(params, optimizer, scheduler, config.max_grad_norm)

    return timed(step, device, 3, 10)
