"""Several processes under `torchrun` (docs/DESIGN.md §3): the one policy for process groups, ranks, devices and failures.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process it starts. Without
WORLD_SIZE (or with WORLD_SIZE=1) every function here is a no-op for one process and no process group is ever
created, so single-process use is exactly what it was.

Failures: an exception on one rank must end the whole run with one clear error, never a hang. The rank that
fails first claims that role in the process group's store (torchrun's agent hosts it, so it outlives any
worker) and reports its error; every other rank that stops (the same error, or a collective broken because a
peer exited) raises `StoppedByPeer`, which the CLI reports as one `stopped:` line, not a second error.
torchrun itself terminates the remaining workers once one exits non-zero; a rank blocked in a collective on
another machine is freed by the broken connection (gloo) or by the process group's timeout (NCCL).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pipeline.core.errors import LrcError
from pipeline.core.runtime import pick_device

# How long a rank waits in a collective (a barrier while rank 0 evaluates or writes a checkpoint) before the
# run is declared broken. LRC_DIST_TIMEOUT_S overrides it (seconds); a sweep waits for its slowest rank instead.
TIMEOUT = datetime.timedelta(minutes=30)
SWEEP_TIMEOUT = datetime.timedelta(days=7)
# How long a rank waits for the others to join at the start. Ranks started together (torchrun) meet within
# seconds; a rank that waits minutes was started by hand or its peers never came, so it is told so after
# RENDEZVOUS_TIMEOUT instead of after the collective timeout. LRC_DIST_RENDEZVOUS_TIMEOUT_S overrides it.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=3)
_FAILED_KEY = "lrc/failed"


class StoppedByPeer(Exception):
    """This rank stopped because another rank failed first; that rank reports the error."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what is written once: manifests, logs, reports, checkpoints, result tables."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()
_active: Ranks | None = None  # the session this process is in


def from_env() -> Ranks:
    """The ranks torchrun gave this process; SINGLE without WORLD_SIZE."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SINGLE
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as err:
        raise LrcError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers ({err}): start several "
                       "processes with `torchrun --nproc_per_node N -m cli ...`, or unset WORLD_SIZE") from None
    if not 0 <= rank < world:
        raise LrcError(f"RANK {rank} is outside WORLD_SIZE {world}: start the processes with torchrun")
    return Ranks(rank, world, local)


def device_for(ranks: Ranks, name: str) -> torch.device:
    """`--device` for this rank: one GPU per local rank under torchrun (cuda:LOCAL_RANK)."""
    device = pick_device(name)
    if device.type != "cuda" or not ranks.distributed:
        return device
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise LrcError(f"local rank {ranks.local_rank} has no GPU of its own (this node has {count}): start at most "
                       f"{count} processes per node (torchrun --nproc_per_node {count}), or pass --device cpu")
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


def _timeout(default: datetime.timedelta, variable: str = "LRC_DIST_TIMEOUT_S") -> datetime.timedelta:
    value = os.environ.get(variable)
    try:
        seconds = float(value) if value else default.total_seconds()
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise LrcError(f"{variable}={value!r} is not a positive number of seconds: fix or unset it")
    return datetime.timedelta(seconds=seconds)


def _rendezvous(ranks: Ranks) -> Any:
    """The store every rank meets at (MASTER_ADDR:MASTER_PORT, torchrun's agent store when there is one), or a
    one-line LrcError: WORLD_SIZE set by hand without an address, or peers that never join."""
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise LrcError(f"WORLD_SIZE={ranks.world_size} is set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not (no address to meet the other ranks at): start several "
                       "processes with `torchrun --nproc_per_node N -m cli ...`, or unset WORLD_SIZE to run one")
    wait = _timeout(RENDEZVOUS_TIMEOUT, "LRC_DIST_RENDEZVOUS_TIMEOUT_S")
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=ranks.rank, world_size=ranks.world_size, timeout=wait))
    except (RuntimeError, ValueError, OSError) as err:  # DistStoreError (a RuntimeError) on timeout, bad address
        reason = " ".join(str(err).split())[:160]
        raise LrcError(f"rank {ranks.rank} of WORLD_SIZE {ranks.world_size} could not meet the other ranks at "
                       f"{where} within {wait.total_seconds():g} s ({reason}): start all of them together with "
                       "torchrun, or unset WORLD_SIZE to run one process") from None
    return store


@contextlib.contextmanager
def session(device: str, gloo: bool = False, timeout: datetime.timedelta = TIMEOUT) -> Iterator[Ranks]:
    """The ranks of one command, with a process group (gloo on CPU or with `gloo`, nccl on CUDA) for its
    length under torchrun. A session inside a session (a sweep's points) runs as one process: the outer
    command splits the work, each part runs whole on its rank's device."""
    global _active
    outer = _active
    ranks = from_env() if outer is None else SINGLE
    if not ranks.distributed:
        _active = ranks
        try:
            yield ranks
        finally:
            _active = outer
        return
    on_cuda = device_for(ranks, device).type == "cuda"
    store = _rendezvous(ranks)
    dist.init_process_group("gloo" if gloo or not on_cuda else "nccl", store=store, rank=ranks.rank,
                            world_size=ranks.world_size, timeout=_timeout(timeout))
    _active = ranks
    if not ranks.is_main:  # one copy of each progress message: rank 0's
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    try:
        yield ranks
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or _claim_first_failure():
            if not isinstance(err, (LrcError, KeyboardInterrupt, SystemExit)) and _is_comm_error(err):
                raise LrcError(f"rank {ranks.rank} lost contact with the other ranks (one was killed or its machine "
                               f"went away): {' '.join(str(err).split())[:200]}") from None
            raise
        raise StoppedByPeer(f"rank {ranks.rank} stopped because another rank failed (its error is above, or in "
                            "its machine's log)") from None
    else:
        dist.destroy_process_group()  # a failed group is left to the process exit: destroying it may block
    finally:
        _active = outer


def current() -> Ranks:
    """The ranks of the session this process is in (SINGLE outside any, and inside a nested one)."""
    return _active or SINGLE


def _claim_first_failure() -> bool:
    """True on the first rank to fail; when the store is gone (its host died), say it here rather than never."""
    try:
        return dist.distributed_c10d._get_default_store().add(_FAILED_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - any store failure means nobody can tell: report it here
        return True


def _is_comm_error(err: BaseException) -> bool:
    return isinstance(err, getattr(dist, "DistError", RuntimeError)) or "gloo" in str(err).lower() or \
        "connection" in str(err).lower()


def barrier(ranks: Ranks) -> None:
    """Every rank waits here until all have arrived (no-op for one process)."""
    if ranks.distributed:
        dist.barrier()


def gather(ranks: Ranks, value: Any) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others."""
    if not ranks.distributed:
        return [value]
    out: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def mean(ranks: Ranks, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of each scalar over the ranks (one all-reduce), e.g. loss terms for the log."""
    if not ranks.distributed:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / ranks.world_size))


def wrap(module: torch.nn.Module, device: torch.device, find_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel over `module` (the same parameters; rank 0's values are broadcast once). Buffers
    (position ids) never change in training, so they are not re-broadcast before every forward."""
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused,
        forward_sync_buffers=False)


def per_rank_batch(ranks: Ranks, batch_size: int) -> int:
    """--batch-size is the global batch of one optimizer step, split evenly over the ranks."""
    if batch_size % ranks.world_size:
        raise LrcError(f"--batch-size {batch_size} (the global batch) does not split evenly over {ranks.world_size} "
                       f"processes: pass a multiple of {ranks.world_size}")
    return batch_size // ranks.world_size
