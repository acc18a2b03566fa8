"""Stage two: train the student from the cache (docs/DESIGN.md §2). The teacher is never loaded or run."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pipeline.cache import importance
from pipeline.cache.format import TEACHER_WEIGHTS_DIR, read_manifest
from pipeline.cache.reader import Cache, open_cache
from pipeline.core import distributed, outdir, reuse
from pipeline.core.config import TrainConfig, layer_map
from pipeline.core.errors import LrcError
from pipeline.core.families import reads_segments
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import (
    apply_update, check_finite_weights, describe_device, from_pretrained, predict_logits, seed_everything,
)
from pipeline.core.tasks import get_task
from pipeline.student import checkpoint, general
from pipeline.student.batches import CacheDataset, EpochBatchSampler, make_loader, to_device
from pipeline.student.model import (
    Projections, build_student, init_from_teacher, init_shape, resolve_auto_init, student_config,
)
from pipeline.student.report import write_report
from pipeline.student.sampler import InBatchNegatives, NegativeSampler
from pipeline.student.step import Model, Trainable, check_batch_finite, train_step

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- small pure helpers


def _steps_in(fraction: float, total_steps: int) -> int:
    """floor(fraction * total_steps), immune to float error (0.7 * 90 is 62.99999999999999, not 63)."""
    return math.floor(fraction * total_steps + 1e-9)


def lr_at(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then linear decay to 0."""
    warmup = _steps_in(warmup_ratio, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def stage_at(step: int, total_steps: int, config: TrainConfig) -> int:
    """1 for the first `stage1_fraction` of optimizer steps, 2 after (always 2 in one-stage training)."""
    if config.one_stage or config.intermediate_loss == "none":
        return 2
    return 1 if step < _steps_in(config.stage1_fraction, total_steps) else 2


def loss_weights(step: int, total_steps: int, config: TrainConfig) -> tuple[float, float, float]:
    """(alpha, beta, gamma) for L_total = alpha * L_intermediate + beta * L_soft + gamma * L_hard."""
    return config.stage1_weights if stage_at(step, total_steps, config) == 1 else config.stage2_weights


def resolve_layer_map(config: TrainConfig, cache: Cache, depth: int | None = None) -> list[int]:
    """Teacher layer (1-based) per student layer, for a student `depth` layers deep (default --layers),
    checked against what the cache stores."""
    depth = config.layers if depth is None else depth
    teacher_layers = cache.manifest["teacher"]["num_layers"]
    if config.layer_map and len(config.layer_map) != depth:
        raise LrcError(f"--layer-map {list(config.layer_map)} has {len(config.layer_map)} entries for a {depth}-layer "
                       "student: give one teacher layer per student layer")
    mapping = list(config.layer_map) if config.layer_map else layer_map(teacher_layers, depth)
    missing = [j for j in mapping if j not in cache.layers]
    if config.intermediate_loss != "none" and missing:
        raise LrcError(
            f"the student maps to teacher layers {mapping} but the cache stores {cache.layers}: re-extract with "
            f"`lrc extract-teacher --layers {','.join(map(str, mapping))}` (or --student-layers {config.layers})"
        )
    return mapping


def resolve_init(config: TrainConfig) -> TrainConfig:
    """`--init auto` made concrete from the cache's manifest (pipeline/student/model.py `resolve_auto_init`): the
    checkpoint records, and reuse and resume compare, what the run really starts from."""
    if config.init != "auto":
        return config
    manifest = read_manifest(config.cache_dir)
    teacher = manifest["teacher"]["config"]
    head = general.HEAD if manifest.get("kind") == "corpus" else manifest["task"]
    shape = student_config(teacher, config.layers, config.hidden, config.heads, config.intermediate, head,
                           config.student_family)
    init, why = resolve_auto_init(teacher, config.cache_dir / TEACHER_WEIGHTS_DIR, shape, config.student_family)
    log.info("--init auto: %s (%s)", "the student starts from the teacher" if init == "teacher" else
             "the student starts from random weights", why)
    return replace(config, init=init)


def check_against_cache(config: TrainConfig, cache: Cache) -> tuple[int, int, list[int]]:
    """The checks of a config that need the cache's manifest (and an --init dir's config) but no weights, data or
    negatives: cheap enough for a sweep to run on every point before the first one trains. Returns the student's
    (depth, width) and its layer map."""
    if cache.kind == "corpus":
        general.check_config(config, cache.path)
    depth, width = init_shape(config.init, config.layers, config.hidden, config.student_family)
    mapping = resolve_layer_map(config, cache, depth)
    if config.projection_init == "identity" and width != cache.hidden_size:
        raise LrcError(f"--projection-init identity needs the student width (--hidden {width}) to equal the "
                       f"teacher width ({cache.hidden_size}): use --projection-init auto or random")
    return depth, width, mapping


def _diverged(run: Run, err: FloatingPointError) -> str:
    """The one-line error of a non-finite loss on finite data: the optimisation diverged."""
    state, saved = run.state, run.dir.checkpoint_dir / checkpoint.STATE_FILE
    where = (f"the last good checkpoint is in {run.dir.checkpoint_dir}" if saved.is_file() else
             f"no checkpoint was written before it (--checkpoint-every {run.config.checkpoint_every})")
    return (f"{err} at step {state.step} (epoch {state.epoch}) with finite inputs: training diverged and stopped; "
            f"{where}; rerun with --overwrite and a lower --lr, or with --precision fp32")


# --------------------------------------------------------------------------- evaluation


class DevSet:
    """The cached dev split: inputs, labels and the teacher's logits (for its metric)."""

    def __init__(self, cache: Cache) -> None:
        split = cache.split("dev")
        self.ids = split.column("input_ids").to_pylist()
        self.types = split.column("token_type_ids").to_pylist()
        self.labels = split.labels()
        self.teacher_logits = split.logits()


def evaluate(student: torch.nn.Module, dev: DevSet, task: Any, config: TrainConfig, device: torch.device,
             pad_id: int) -> dict[str, float]:
    """Dev metrics of the student (run without dropout; its train/eval mode is left as it was)."""
    logits = predict_logits(student, dev.ids, dev.types, config.eval_batch_size, device, config.precision, pad_id,
                            reads_segments(student.config))
    return compute_metrics(task, logits, dev.labels)


# --------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """Everything one training run holds between steps."""

    config: TrainConfig
    cache: Cache
    task: Any
    dir: checkpoint.RunDir
    layer_map: list[int]  # teacher layer per student layer
    model: Model
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: CacheDataset
    batches: EpochBatchSampler
    total_steps: int
    state: checkpoint.TrainState
    device: torch.device
    dev: DevSet | None
    teacher_dev: dict[str, float] | None
    tokenizer: Any
    logger: checkpoint.MetricsLog | None  # rank 0's; None on the other ranks
    inputs: dict[str, str | None]  # checkpoint.run_inputs: what this run trains from, by content
    ranks: distributed.Ranks = distributed.SINGLE
    evaluated_at: int = -1

    @property
    def workers(self) -> int:
        """On a CPU the step owns the cores and reading is a small part of it; on a GPU, overlap it."""
        if self.config.num_workers is not None:
            return self.config.num_workers
        return 2 if self.device.type == "cuda" else 0

    def save(self) -> None:
        """Rank 0 writes the checkpoint with every rank's RNG state (ranks draw dropout masks of their own);
        the others wait, so no rank runs ahead of a checkpoint it could be resumed from."""
        rngs = distributed.gather(self.ranks, checkpoint.rng_state())
        if self.ranks.is_main:
            checkpoint.save(self.dir, self.state, self.model.student, self.model.projections, self.optimizer,
                            self.scheduler, rngs, self.inputs)
        distributed.barrier(self.ranks)


def _setup(config: TrainConfig, ranks: distributed.Ranks = distributed.SINGLE) -> Run:
    """Open the cache and negatives, build the student, data path and optimizer; resume if asked.

    Nothing is written before every check has passed: a refused command leaves no run dir behind. Under
    torchrun every rank runs the checks; rank 0 alone then creates the run dir and its log."""
    config = resolve_init(config)  # before the run dir is compared with it
    rank_batch = distributed.per_rank_batch(ranks, config.batch_size)
    run_dir = checkpoint.check_run_dir(config)
    cache = open_cache(config.cache_dir, config.verify_cache)
    is_general = cache.kind == "corpus"  # unlabeled text: general distillation (pipeline/student/general.py)
    task = None if is_general else get_task(cache.task["name"])
    depth, width, mapping = check_against_cache(config, cache)
    sampler = _negatives(config, cache, rank_batch, ranks)
    inputs = checkpoint.run_inputs(cache.fingerprint, sampler.meta["sha256"] if isinstance(sampler, NegativeSampler) else None)
    if config.resume:  # before any model is built: a resume on other inputs is refused in one line
        checkpoint.check_inputs(run_dir, config, inputs)
    seed_everything(config.seed)

    model, carried = _build_model(config, cache, depth, width, mapping)
    student, projections = model.student, model.projections
    device = distributed.device_for(ranks, config.device)
    params = [p for part in (student, projections) if part is not None for p in part.to(device).parameters()]

    dataset = CacheDataset(config.cache_dir, "train", carried, sampler)
    # Every rank cuts the same shuffled order into batches of B / world and takes every world-th one, so one
    # step covers the rows a single process's batch of B covers; the negatives are drawn per row (seed, epoch,
    # row id), so they are the same whatever the world size.
    batches = EpochBatchSampler(len(dataset), rank_batch, config.seed, rank=ranks.rank, world_size=ranks.world_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(batches)))
    # fused: one kernel over all tensors, several times faster than the per-tensor loop on CPU.
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, config.warmup_ratio))
    state = checkpoint.TrainState()
    if config.resume:
        state = checkpoint.load(run_dir, student, projections, optimizer, scheduler, ranks.rank, ranks.world_size)
        log.info("resumed from step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch)
    elif ranks.rank > 0:  # the same initial weights on every rank (DDP also broadcasts rank 0's), then each rank
        # its own dropout masks
        torch.manual_seed(config.seed + ranks.rank)
    if ranks.distributed:
        # One DDP over student + projections. A corpus run leaves the classification head out of its loss:
        # only then must DDP look for parameters without a gradient (a graph walk per step).
        model.synced = distributed.wrap(Trainable(student, projections), device, find_unused=is_general)

    dev = DevSet(cache) if "dev" in cache.manifest["splits"] else None
    teacher_dev = compute_metrics(task, dev.teacher_logits, dev.labels) if dev else None
    log.info("training %d steps (%d per epoch), layer map %s, teacher dev %s", total_steps, len(batches), mapping,
             teacher_dev)
    tokenizer = _student_tokenizer(cache, student)
    distributed.barrier(ranks)  # every rank has read the run dir (for --resume) before rank 0 replaces it
    logger = None
    if ranks.is_main:
        checkpoint.start_run_dir(config)
        logger = checkpoint.MetricsLog(run_dir, keep_until=state.step if config.resume else None)
    distributed.barrier(ranks)
    return Run(config=config, cache=cache, task=task, dir=run_dir, layer_map=mapping, model=model, params=params,
               optimizer=optimizer, scheduler=scheduler, dataset=dataset, batches=batches, total_steps=total_steps,
               state=state, device=device, dev=dev, teacher_dev=teacher_dev, tokenizer=tokenizer, logger=logger,
               inputs=inputs, ranks=ranks)


def _negatives(config: TrainConfig, cache: Cache, rank_batch: int,
               ranks: distributed.Ranks) -> NegativeSampler | InBatchNegatives | None:
    """Where each row's K negatives come from: the negatives file, the rank's own batch, or nowhere (K = 0)."""
    if not config.uses_negatives:
        return None
    if config.negatives_source == "in-batch":
        # Under torchrun each rank draws from its own share of the batch (no all-gather of teacher states), so
        # the negatives, unlike a file's, depend on the world size; that share must still offer K others.
        if rank_batch <= config.k:
            raise LrcError(f"--negatives-source in-batch draws K={config.k} negatives from the other anchors of each "
                           f"rank's batch, here {rank_batch} rows ({config.batch_size} over {ranks.world_size} ranks): "
                           f"raise --batch-size above {config.k * ranks.world_size}, lower --k, or use --negatives-source file")
        return InBatchNegatives(config.k, config.seed)
    if not config.negatives_path.is_file():
        raise LrcError(f"no negatives file at {config.negatives_path}: run `lrc build-negatives --cache "
                       f"{config.cache_dir}` first, or pass --k 0 to train without negatives")
    return NegativeSampler(config.negatives_path, config.k, config.seed, cache.fingerprint)


def _build_model(config: TrainConfig, cache: Cache, depth: int, width: int, mapping: list[int]) -> tuple[Model, list[int]]:
    """The student as --init starts it and its W_i as --projection-init starts them; also the teacher layers
    the batches carry, in slot order."""
    is_general = cache.kind == "corpus"
    shape = student_config(cache.manifest["teacher"]["config"], config.layers, config.hidden, config.heads,
                           config.intermediate, general.HEAD if is_general else cache.task, config.student_family)
    kept = None  # the teacher channels a narrower --init teacher keeps: where its W_i start
    if config.init == "teacher":
        student, kept = init_from_teacher(shape, cache.teacher_weights_dir, mapping,
                                          importance.load(cache.path, cache.manifest), config.init_selection)
    else:
        student = build_student(shape, config.init, cache.teacher_weights_dir, mapping, cache.manifest["max_length"])
    check_finite_weights(student, f"the student initialised from {config.init}")
    if config.intermediate_loss == "none":
        return Model(student, None, []), []
    identity = config.projection_init != "random" and width == cache.hidden_size
    carried = sorted(set(mapping))
    projections = Projections(width, cache.hidden_size, depth, identity)
    if config.projection_init == "auto" and not identity and kept is not None:
        projections.scatter(kept)  # W_i put the kept channels back where the teacher has them
    elif config.projection_init == "auto" and not identity:
        general.load_projections(config.init, projections, mapping)  # from a general student, when it fits
    return Model(student, projections, [carried.index(j) for j in mapping]), carried


def _student_tokenizer(cache: Cache, student: torch.nn.Module) -> Any:
    """The teacher's tokenizer, saved with the student: without token_type_ids where the student reads
    none, so `pipeline()` never hands a model segment ids it has no input for."""
    load = AutoTokenizer.from_pretrained
    names = from_pretrained(load, cache.tokenizer_dir, "the cache's tokenizer", False).model_input_names
    if not reads_segments(student.config):
        names = [n for n in names if n != "token_type_ids"]
    return from_pretrained(load, cache.tokenizer_dir, "the cache's tokenizer", False, model_input_names=names)


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
    state, metric = run.state, run.task.main_metric if run.task else None  # a corpus cache has no dev: returns next
    if run.dev is None or run.evaluated_at == state.step:  # e.g. eval_every landing on the last step
        return
    run.evaluated_at = state.step
    student = run.model.student
    metrics = evaluate(student, run.dev, run.task, run.config, run.device, student.config.pad_token_id or 0)
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
    run = _setup(config, ranks)
    state, total_steps = run.state, run.total_steps
    regression = run.task is not None and run.task.is_regression

    # ---- the loop: epochs of shuffled batches, resumable mid-epoch
    run.model.student.train()
    started, seen = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=state.step, desc="train-student", unit="step", dynamic_ncols=True,
               disable=not ranks.is_main)
    try:
        while state.step < total_steps:
            for batch in epoch_batches(run, state.epoch, state.batch_in_epoch):
                batch = to_device(batch, run.device)  # int8 hidden states are dequantised on the device
                weights = general.WEIGHTS if run.task is None else loss_weights(state.step, total_steps, config)
                try:
                    terms = train_step(run.model, batch, weights, config, regression, run.device)
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
               "stage": 1 if run.task is None else stage_at(state.step - 1, run.total_steps, run.config),
               "samples_per_s": round(samples_per_s, 2)}
    if run.logger is not None:
        run.logger.write(record)
    return record


def _finish(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 leaves the final student (a task student, or a general student's encoder), its summary and report."""
    if run.ranks.is_main:
        if run.task is None:
            general.save_encoder(run.dir, run.model.student, run.tokenizer, run.model.projections, run.layer_map)
        elif run.dev is None:
            checkpoint.save_student(run.dir, run.model.student, run.tokenizer)
        checkpoint.write_summary(run.dir, summary)
        write_report(run.dir.output_dir)
    distributed.barrier(run.ranks)
    log.info("student written to %s: %s", run.dir.output_dir, f"{run.config.keep} dev {run.state.best}" if run.task
             else "the last student of general distillation (no dev split)")
    return summary


def _summary(run: Run, seen: int, elapsed: float) -> dict[str, Any]:
    metric, best, teacher = run.task.main_metric if run.task else None, run.state.best, run.teacher_dev
    return {
        "task": run.task.name if run.task else "corpus", "main_metric": metric, "best": best, "teacher_dev": teacher,
        "kind": "task" if run.task else "general", "kept": run.config.keep if run.task else "last",
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
    previous = checkpoint.previous_run(config, read_manifest(config.cache_dir)["fingerprint"])
    decision = checkpoint.decide(config, previous)
    if decision == reuse.REUSE:
        log.info("%s already holds this run, finished: reusing it", config.output_dir)
        return previous.summary, "reused"
    resume = decision == reuse.RESUME
    if resume:
        log.info("resuming the unfinished run in %s", config.output_dir)
    # Restarting an unfinished run that never reached a checkpoint loses nothing.
    return train_student(replace(config, resume=resume, overwrite=decision == reuse.REPLACE)), "done"
