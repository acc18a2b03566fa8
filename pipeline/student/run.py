"""A training run's setup (docs/DESIGN.md §2): `--init` made concrete, the cache and the negatives opened,
the layer map resolved, the student and its W_i built, the data path, optimizer and schedule, a resume; and
the `Run` that holds them between steps. pipeline/student/train.py runs the loop over it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AutoTokenizer

from pipeline.cache import importance
from pipeline.cache.format import TEACHER_WEIGHTS_DIR
from pipeline.cache.manifest import read_manifest
from pipeline.cache.reader import Cache, open_cache
from pipeline.core import distributed
from pipeline.core.config import layer_map
from pipeline.core.errors import LrcError
from pipeline.core.families import reads_segments
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import check_finite_weights, from_pretrained, seed_everything
from pipeline.core.train_config import TrainConfig
from pipeline.student import checkpoint, general
from pipeline.student.batches import CacheDataset, EpochBatchSampler
from pipeline.student.model import (
    Projections, build_student, init_from_teacher, init_shape, resolve_auto_init, student_config,
)
from pipeline.student.objective import Objective, objective_for, steps_in
from pipeline.student.run_dir import RunDir, check_run_dir, start_run_dir
from pipeline.student.sampler import InBatchNegatives, NegativeSampler
from pipeline.student.step import Model, Trainable

log = logging.getLogger(__name__)


def lr_at(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then linear decay to 0."""
    warmup = steps_in(warmup_ratio, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


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
    shape = student_config(teacher, config.layers, config.hidden, config.heads, config.intermediate,
                           objective_for(manifest).head, config.student_family)
    init, why = resolve_auto_init(teacher, config.cache_dir / TEACHER_WEIGHTS_DIR, shape, config.student_family)
    log.info("--init auto: %s (%s)", "the student starts from the teacher" if init == "teacher" else
             "the student starts from random weights", why)
    return replace(config, init=init)


def check_against_cache(config: TrainConfig, cache: Cache) -> tuple[int, int, list[int]]:
    """The checks of a config that need the cache's manifest (and an --init dir's config) but no weights, data or
    negatives: cheap enough for a sweep to run on every point before the first one trains. Returns the student's
    (depth, width) and its layer map."""
    objective_for(cache.manifest).check(config, cache.path)
    depth, width = init_shape(config.init, config.layers, config.hidden, config.student_family)
    mapping = resolve_layer_map(config, cache, depth)
    if config.projection_init == "identity" and width != cache.hidden_size:
        raise LrcError(f"--projection-init identity needs the student width (--hidden {width}) to equal the "
                       f"teacher width ({cache.hidden_size}): use --projection-init auto or random")
    return depth, width, mapping


class DevSet:
    """The cached dev split: inputs, labels and the teacher's logits (for its metric)."""

    def __init__(self, cache: Cache) -> None:
        split = cache.split("dev")
        self.ids = split.column("input_ids").to_pylist()
        self.types = split.column("token_type_ids").to_pylist()
        self.labels = split.labels()
        self.teacher_logits = split.logits()


@dataclass
class Run:
    """Everything one training run holds between steps."""

    config: TrainConfig
    cache: Cache
    objective: Objective
    dir: RunDir
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


def setup_run(config: TrainConfig, ranks: distributed.Ranks = distributed.SINGLE) -> Run:
    """Open the cache and negatives, build the student, data path and optimizer; resume if asked.

    Nothing is written before every check has passed: a refused command leaves no run dir behind. Under
    torchrun every rank runs the checks; rank 0 alone then creates the run dir and its log."""
    config = resolve_init(config)  # before the run dir is compared with it
    rank_batch = distributed.per_rank_batch(ranks, config.batch_size)
    run_dir = check_run_dir(config)
    cache = open_cache(config.cache_dir, config.verify_cache)
    objective = objective_for(cache.manifest)
    depth, width, mapping = check_against_cache(config, cache)
    sampler = _negatives(config, cache, rank_batch, ranks)
    inputs = checkpoint.run_inputs(cache.fingerprint, sampler.meta["sha256"] if isinstance(sampler, NegativeSampler) else None)
    if config.resume:  # before any model is built: a resume on other inputs is refused in one line
        checkpoint.check_inputs(run_dir, config, inputs)
    seed_everything(config.seed)

    model, carried = _build_model(config, cache, objective.head, depth, width, mapping)
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
        # One DDP over student + projections.
        model.synced = distributed.wrap(Trainable(student, projections), device, find_unused=objective.find_unused)

    dev = DevSet(cache) if "dev" in cache.manifest["splits"] else None
    teacher_dev = compute_metrics(objective.task, dev.teacher_logits, dev.labels) if dev else None
    log.info("training %d steps (%d per epoch), layer map %s, teacher dev %s", total_steps, len(batches), mapping,
             teacher_dev)
    tokenizer = _student_tokenizer(cache, student)
    distributed.barrier(ranks)  # every rank has read the run dir (for --resume) before rank 0 replaces it
    logger = None
    if ranks.is_main:
        start_run_dir(config)
        logger = checkpoint.MetricsLog(run_dir, keep_until=state.step if config.resume else None)
    distributed.barrier(ranks)
    return Run(config=config, cache=cache, objective=objective, dir=run_dir, layer_map=mapping, model=model, params=params,
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


def _build_model(config: TrainConfig, cache: Cache, head: dict[str, Any], depth: int, width: int,
                 mapping: list[int]) -> tuple[Model, list[int]]:
    """The student (with `head`) as --init starts it and its W_i as --projection-init starts them; also the
    teacher layers the batches carry, in slot order."""
    shape = student_config(cache.manifest["teacher"]["config"], config.layers, config.hidden, config.heads,
                           config.intermediate, head, config.student_family)
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
