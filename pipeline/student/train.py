"""Stage two: train the student from the cache (docs/DESIGN.md §2). The teacher is never loaded or run."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.cache.manifest import read_manifest
from pipeline.core import distributed, outdir, reuse
from pipeline.core.errors import LrcError
from pipeline.core.families import reads_segments
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import apply_update, describe_device, predict_logits
from pipeline.core.train_config import TrainConfig
from pipeline.student import checkpoint, general, run_dir
from pipeline.student.batches import make_loader, to_device
from pipeline.student.report import write_report
from pipeline.student.run import DevSet, Run, resolve_init, setup_run
from pipeline.student.step import check_batch_finite, train_step

log = logging.getLogger(__name__)


def _diverged(run: Run, err: FloatingPointError) -> str:
    """The one-line error of a non-finite loss on finite data: the optimisation diverged."""
    state, saved = run.state, run.dir.checkpoint_dir / run_dir.STATE_FILE
    where = (f"the last good checkpoint is in {run.dir.checkpoint_dir}" if saved.is_file() else
             f"no checkpoint was written before it (--checkpoint-every {run.config.checkpoint_every})")
    return (f"{err} at step {state.step} (epoch {state.epoch}) with finite inputs: training diverged and stopped; "
            f"{where}; rerun with --overwrite and a lower --lr, or with --precision fp32")


# --------------------------------------------------------------------------- evaluation


def evaluate(student: torch.nn.Module, dev: DevSet, task: Any, config: TrainConfig, device: torch.device,
             pad_id: int) -> dict[str, float]:
    """Dev metrics of the student (run without dropout; its train/eval mode is left as it was)."""
    logits = predict_logits(student, dev.ids, dev.types, config.eval_batch_size, device, config.precision, pad_id,
                            reads_segments(student.config))
    return compute_metrics(task, logits, dev.labels)


# --------------------------------------------------------------------------- the loop


def epoch_batches(run: Run, epoch: int, skip_batches: int = 0) -> Any:
    """The batches of one epoch: its shuffled order (minus the first `skip_batches` when resuming) and its
    own draw of negatives (docs/DESIGN.md §3: K of the M candidates drawn afresh each epoch)."""
    run.dataset.set_epoch(epoch)
    run.batches.set_epoch(epoch, skip_batches=skip_batches)
    return make_loader(run.dataset, run.batches, run.workers, seed=run.config.seed + epoch)


def is_better(metrics: dict[str, float], best: dict[str, float] | None, metric: str) -> bool:
    """Every GLUE main metric (accuracy, F1, MCC, Pearson) is higher-is-better; the first result always wins."""
    return best is None or metrics[metric] > best[metric]


def _evaluate_and_keep_best(run: Run) -> None:
    """Evaluate on the cached dev split; the best student so far is saved in HF format. Under torchrun rank 0
    evaluates (every rank holds the same weights) while the others wait."""
    if run.ranks.is_main:
        _evaluate_on_main(run)  # a failure here ends rank 0, and the others' barrier with it (distributed.session)
    distributed.barrier(run.ranks)


def _evaluate_on_main(run: Run) -> None:
    state, metric = run.state, run.objective.metric
    if run.dev is None or run.evaluated_at == state.step:  # e.g. eval_every landing on the last step
        return
    run.evaluated_at = state.step
    student = run.model.student
    metrics = evaluate(student, run.dev, run.objective.task, run.config, run.device, student.config.pad_token_id or 0)
    run.logger.write({"step": state.step, "epoch": state.epoch, "eval": metrics})
    # --keep last: every evaluation replaces the kept student, so the final one is kept whatever dev says
    if is_better(metrics, state.best, metric) or run.config.keep == "last":
        state.best = {**metrics, "step": state.step}
        checkpoint.save_student(run.dir, student, run.tokenizer)
    log.info("step %d: dev %s (%s %s %.4f)", state.step, metrics, "kept (last)" if run.config.keep == "last" else "best",
             metric, state.best[metric])


def train_student(config: TrainConfig) -> dict[str, Any]:
    """Cache (+ negatives) -> the best student in Hugging Face format; returns the training summary.

    Under torchrun: DistributedDataParallel, --batch-size the global batch split evenly over the ranks."""
    with distributed.session(config.device) as ranks, outdir.lock(config.output_dir, "train-student", ranks.is_main):
        return _train(config, ranks)


def _train(config: TrainConfig, ranks: distributed.Ranks) -> dict[str, Any]:
    run = setup_run(config, ranks)
    state, total_steps, objective = run.state, run.total_steps, run.objective

    # ---- the loop: epochs of shuffled batches, resumable mid-epoch
    run.model.student.train()
    started, seen = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=state.step, desc="train-student", unit="step", dynamic_ncols=True,
               disable=not ranks.is_main)
    try:
        while state.step < total_steps:
            for batch in epoch_batches(run, state.epoch, state.batch_in_epoch):
                batch = to_device(batch, run.device)  # int8 hidden states are dequantised on the device
                weights = objective.weights(state.step, total_steps, config)
                try:
                    terms = train_step(run.model, batch, weights, config, objective, run.device)
                except FloatingPointError as err:
                    # Any NaN/inf the batch read from the cache makes some loss term non-finite, so the batch is
                    # inspected only then (not on every step): a damaged cache is named with its rows, else it diverged.
                    check_batch_finite(batch, config.cache_dir)
                    raise LrcError(_diverged(run, err)) from None
                lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the log reports it, not the next one's)
                grad_norm = apply_update(run.params, run.optimizer, run.scheduler, config.max_grad_norm)
                state.step += 1
                state.batch_in_epoch += 1
                seen += len(batch["row_ids"]) * ranks.world_size  # the same count on every rank
                bar.update(1)

                # ---- logging, evaluation, checkpoints
                if state.step % config.log_every == 0 or state.step == total_steps:
                    record = _log_step(run, terms, lr, grad_norm, seen / (time.perf_counter() - started))
                    bar.set_postfix(loss=f"{record['loss']:.4f}", stage=record["stage"])
                if config.eval_every and state.step % config.eval_every == 0:
                    _evaluate_and_keep_best(run)
                if state.step % config.checkpoint_every == 0:
                    run.save()
                if state.step >= total_steps and state.batch_in_epoch < len(run.batches):
                    break  # stopped mid-epoch (max_steps or a fractional --epochs)
            else:  # the epoch ran to its end
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                _evaluate_and_keep_best(run)
                run.save()
    finally:  # an error must not leave a half-drawn progress line behind
        bar.close()
    if state.batch_in_epoch:  # stopped mid-epoch by max_steps: evaluate the final weights too
        _evaluate_and_keep_best(run)
        run.save()
    return _finish(run, _summary(run, seen, time.perf_counter() - started))


def _log_step(run: Run, terms: dict[str, Any], lr: float, grad_norm: float, samples_per_s: float) -> dict[str, Any]:
    """The step's line of train_log.jsonl (rank 0 writes it): the whole batch's loss terms, as one process has them."""
    state = run.state
    record = {k: round(float(v), 6) for k, v in distributed.mean(run.ranks, terms).items()}
    record |= {"step": state.step, "epoch": state.epoch, "lr": lr, "grad_norm": round(grad_norm, 6),
               "stage": run.objective.stage(state.step - 1, run.total_steps, run.config),
               "samples_per_s": round(samples_per_s, 2)}
    if run.logger is not None:
        run.logger.write(record)
    return record


def _finish(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 leaves the final student (a task student, or a general student's encoder), its summary and report."""
    if run.ranks.is_main:
        if run.objective.general:
            general.save_encoder(run.dir, run.model.student, run.tokenizer, run.model.projections, run.layer_map)
        elif run.dev is None:
            checkpoint.save_student(run.dir, run.model.student, run.tokenizer)
        checkpoint.write_summary(run.dir, summary)
        write_report(run.dir.output_dir)
    distributed.barrier(run.ranks)
    log.info("student written to %s: %s", run.dir.output_dir, f"{run.config.keep} dev {run.state.best}"
             if not run.objective.general else "the last student of general distillation (no dev split)")
    return summary


def _summary(run: Run, seen: int, elapsed: float) -> dict[str, Any]:
    objective, best, teacher = run.objective, run.state.best, run.teacher_dev
    metric = objective.metric
    return {
        "task": objective.name, "main_metric": metric, "best": best, "teacher_dev": teacher,
        "kind": objective.kind, "kept": objective.keep(run.config),
        "percent_of_teacher": 100 * best[metric] / teacher[metric] if best and teacher and teacher[metric] else None,
        "steps": run.state.step, "epochs": run.state.epoch, "train_seconds": round(elapsed, 1),
        "samples_per_s": round(seen / max(elapsed, 1e-9), 2),
        "layer_map": run.layer_map,
        "device": describe_device(run.device), "world_size": run.ranks.world_size,
        "parameters": sum(p.numel() for p in run.model.student.parameters()),
        "cache_fingerprint": run.cache.fingerprint,
        "negatives_sha256": run.inputs["negatives_sha256"],
        "config": json.loads(json.dumps(run.config.__dict__, default=str)),
    }


def train_or_reuse(config: TrainConfig) -> tuple[dict[str, Any], str]:
    """Training into a dir that may hold a run already (sweep, demo, benchmarks), by the rule every stage
    follows (pipeline/core/reuse.py): `config.overwrite` retrains whatever the dir holds. Otherwise: finished
    with the same settings on the same cache and negatives: reused ("reused"); unfinished with the same
    settings and a checkpoint: resumed; empty, or unfinished before its first checkpoint: trained; a run
    with other settings or inputs: refused, naming what differs. Returns the training summary and
    "reused" or "done".
    """
    config = resolve_init(config)
    previous = run_dir.previous_run(config, read_manifest(config.cache_dir)["fingerprint"])
    decision = run_dir.decide(config, previous)
    if decision == reuse.REUSE:
        log.info("%s already holds this run, finished: reusing it", config.output_dir)
        return previous.summary, "reused"
    resume = decision == reuse.RESUME
    if resume:
        log.info("resuming the unfinished run in %s", config.output_dir)
    # Restarting an unfinished run that never reached a checkpoint loses nothing.
    return train_student(replace(config, resume=resume, overwrite=decision == reuse.REPLACE)), "done"
