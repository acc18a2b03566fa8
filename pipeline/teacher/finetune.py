"""Optional stage zero: fine-tune a backbone on a task to make the teacher."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from pipeline.core import atomic, backbones, outdir, reuse
from pipeline.core.config import BUNDLED_BACKBONE, BUNDLED_MPNET
from pipeline.core.errors import LrcError
from pipeline.core.families import check_loading_report, require_classifier_family
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import (
    apply_update, autocast, check_finite_weights, check_max_length, check_vocabulary, encode, from_pretrained, pad_batch, pick_device,
    predict_logits, require_tokenizer, seed_everything,
)
from pipeline.core.task_data import load_examples
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import FinetuneConfig

log = logging.getLogger(__name__)

TEACHER_INFO = "teacher_info.json"


def resolve_backbone(backbone: str) -> str:
    """A bundled backbone's directory (see pipeline/core/backbones.py), or the user's path / hub name unchanged."""
    bundled = {BUNDLED_BACKBONE: backbones.minilm_dir, BUNDLED_MPNET: backbones.mpnet_dir}
    return str(bundled[backbone]()) if backbone in bundled else backbone


def finetune_teacher(config: FinetuneConfig) -> dict[str, Any]:
    """Backbone + task -> teacher dir (model, tokenizer, teacher_info.json); returns the info."""
    with outdir.lock(config.output_dir, "finetune-teacher"):
        return _finetune(config)


def _finetune(config: FinetuneConfig) -> dict[str, Any]:
    task = get_task(config.data.task)
    settings = _settings(config)
    out = config.output_dir
    held = outdir.check(out, "teacher", config.overwrite)  # refuses a dir that is not an lrc teacher
    local = Path(config.backbone)
    outdir.refuse_nested(out, {"backbone": local if local.exists() else None})
    decision, info = reuse.decide_whole(held, out / TEACHER_INFO, settings, overwrite=config.overwrite, what="a teacher")
    if decision == reuse.REUSE:
        log.info("teacher %s already fine-tuned with these settings (dev %s): reusing it", out, info["dev_metrics"])
        return info

    seed_everything(config.seed)
    backbone, tokenizer = _backbone_and_tokenizer(config)
    train, dev = load_examples(config.data, "train"), load_examples(config.data, "dev")
    model = _checked_model(backbone, tokenizer, task, config)
    device = pick_device(config.device)
    model.to(device)
    segments = "token_type_ids" in tokenizer.model_input_names
    pad_id = tokenizer.pad_token_id or 0
    train_ids, train_types = encode(tokenizer, train.text_a, train.text_b, config.max_length)
    dev_ids, dev_types = encode(tokenizer, dev.text_a, dev.text_b, config.max_length)

    started = time.perf_counter()
    best: dict[str, Any] | None = None
    epochs = math.ceil(config.epochs)
    total_steps = max(1, int(config.epochs * math.ceil(len(train) / config.batch_size)))
    optimizer, scheduler = _optimizer(model, config, total_steps)
    batches = _Batches(train_ids, train_types, list(train.labels), pad_id, segments, device)
    generator = np.random.default_rng(config.seed)
    step = 0
    # A diverged run, a full disk, Ctrl-C: no half-written teacher is left behind; the teacher dir appears only
    # once it is complete.
    with atomic.staging_dir(out) as tmp:
        for epoch in range(epochs):
            step = _train_epoch(model, batches, generator.permutation(len(train)), config, optimizer, scheduler,
                                step, total_steps, f"finetune epoch {epoch + 1}/{epochs}")
            logits = predict_logits(model, dev_ids, dev_types, config.eval_batch_size, device, config.precision, pad_id, segments)
            metrics = compute_metrics(task, logits, np.asarray(dev.labels))
            log.info("epoch %d: dev %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
            if best is None or metrics[task.main_metric] > best[task.main_metric]:
                best = {**metrics, "epoch": epoch + 1}
                check_finite_weights(model, "the fine-tuned teacher")  # never saved, so never used by a later stage
                _save(model, tokenizer, tmp)

        info = {
            "task": task.name,
            "backbone": backbone,
            "dev_metrics": best,
            "main_metric": task.main_metric,
            "train_examples": len(train),
            "dev_examples": len(dev),
            "train_seconds": round(time.perf_counter() - started, 1),
            "settings": settings,
        }
        (tmp / TEACHER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        outdir.mark(tmp, "teacher")
        # empty, or an lrc teacher that --overwrite replaces (outdir.check above)
        atomic.publish_dir(tmp, out, empty=lambda path: outdir.clear(path, "teacher"))
    log.info("teacher written to %s (best dev %s at epoch %d)", out, task.main_metric, best["epoch"])
    return info


def _backbone_and_tokenizer(config: FinetuneConfig) -> tuple[str, Any]:
    backbone = resolve_backbone(config.backbone)
    require_tokenizer(Path(backbone), "backbone")
    return backbone, from_pretrained(AutoTokenizer.from_pretrained, backbone, "backbone", config.trust_remote_code)


def _checked_model(backbone: str, tokenizer: Any, task: Any, config: FinetuneConfig) -> torch.nn.Module:
    """The backbone with a new head for the task, refused in one line where its weights, vocabulary or
    positions cannot serve the task at --max-length."""
    labels = list(task.labels) if task.labels else ["score"]
    model = _with_new_head(backbone, task.num_labels, labels, task.is_regression, config.trust_remote_code)
    check_finite_weights(model, f"backbone {backbone}")
    check_vocabulary(model, tokenizer, f"backbone {backbone}")
    check_max_length(model.config, config.max_length, f"backbone {backbone}")
    return model


def _settings(config: FinetuneConfig) -> dict[str, Any]:
    raw = asdict(config)
    raw.pop("overwrite")
    raw.pop("trust_remote_code")  # changes what may be loaded, not what is computed
    raw.pop("output_dir")
    return json.loads(json.dumps(raw, default=str))


@dataclass(frozen=True)
class _Batches:
    """The encoded train split and how to pad it."""

    ids: list[list[int]]
    types: list[list[int]]
    labels: list[Any]
    pad_id: int
    segments: bool
    device: torch.device


def _train_epoch(model: torch.nn.Module, data: _Batches, order: np.ndarray, config: FinetuneConfig, optimizer: Any,
                 scheduler: Any, step: int, total_steps: int, desc: str) -> int:
    """One pass over `order` in batches (stopping at total_steps); returns the step count after it."""
    model.train()
    params = list(model.parameters())
    bar = tqdm(range(0, len(order), config.batch_size), desc=desc, unit="batch")
    for b in bar:
        if step >= total_steps:
            break
        rows = order[b : b + config.batch_size]
        input_ids, token_types, mask = pad_batch(
            [data.ids[r] for r in rows], [data.types[r] for r in rows], data.pad_id, data.device
        )
        target = torch.tensor([data.labels[r] for r in rows], device=data.device)
        extra = {"token_type_ids": token_types} if data.segments else {}
        with autocast(data.device, config.precision):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=target, **extra).loss
        value = loss.item()
        if not math.isfinite(value):  # the labels were checked when loaded: this is the optimisation diverging
            raise LrcError(f"the fine-tuning loss is {value} at step {step} with --lr {config.learning_rate:g}: training "
                           "diverged and nothing was saved; lower --lr (or use --precision fp32)")
        loss.backward()
        apply_update(params, optimizer, scheduler, config.max_grad_norm)
        step += 1
        bar.set_postfix(loss=f"{value:.4f}")
    return step


def _with_new_head(backbone: str, num_labels: int, labels: list[str], regression: bool,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """The backbone with a freshly initialised classification head (said in one line, not transformers'
    load report, which lists the new head's weights as MISSING and reads like an error)."""
    require_classifier_family(AutoConfig.from_pretrained(backbone), "backbone")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = from_pretrained(
            AutoModelForSequenceClassification.from_pretrained, backbone, "backbone", trust_remote_code,
            num_labels=num_labels, id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type="regression" if regression else "single_label_classification", output_loading_info=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_loading_report(model, info, backbone, "backbone")  # a teacher whose encoder stayed random is no teacher
    log.info("new %s head with %d output(s) on %s", "regression" if regression else "classification", num_labels, backbone)
    return model


def _optimizer(model: torch.nn.Module, config: FinetuneConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW without weight decay on biases and LayerNorm weights; linear warmup then decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        fused=True,  # one kernel over all tensors: several times faster than the per-tensor loop on CPU
    )
    warmup = int(config.warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def _save(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
