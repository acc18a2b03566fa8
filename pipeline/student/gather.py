"""Cached rows -> padded arrays, one batch at a time (the data path of `pipeline/student/batches.py`).

Per batch and per (shard, column) one fancy-index copy, never a Python loop over tokens: the rows of a
shard are contiguous token ranges of its values, so the flat source and destination token positions of
a whole batch are two `np.repeat` + `arange` expressions (`_token_ranges`). Wide hidden-state rows
(`SLICE_BYTES`) are copied one slice per row instead, which writes each token once. Padded blocks come from a
`BufferPool` and are reused across batches when nothing holds the previous one any more, so the
allocator sees the same few blocks every step instead of a new size per batch (variable-length
batches fragment glibc's heap: docs/DESIGN.md §6, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.cache.reader import RowReader

_TORCH_OF = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.int8): torch.int8,
             np.dtype(np.int64): torch.int64}


# --------------------------------------------------------------------------- buffers


@dataclass
class _Slot:
    storage: torch.Tensor  # (nbytes,) uint8, grown when a batch needs more
    handed: weakref.ref | None = None  # the tensor last handed out of it; dead = free to reuse


class BufferPool:
    """Reusable blocks for padded batches, per name (e.g. "teacher_hidden").

    A block is reused only when the tensor last handed out of it is gone (a weak reference): a consumer
    that keeps batches (a test collecting a list, a benchmark holding them all) simply gets new blocks,
    so reuse can never change a batch someone still holds. On CUDA the blocks are pinned, and a block
    whose asynchronous host-to-device copy may still be running is waited for (`record_copy`) before it is
    written again. In a DataLoader worker nothing is pooled: blocks go to the main process in shared
    memory (`fresh_zeros`), and the worker cannot know when the main process is done with them.
    """

    def __init__(self, slots_per_name: int = 2, pin: bool = False) -> None:
        self._slots: dict[str, list[_Slot]] = {}
        self.slots_per_name, self.pin = slots_per_name, pin

    def take(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """(numpy view, tensor) of a C-contiguous block holding stale contents: the caller writes every
        position it hands on (hidden-state padding aside: `gather_hidden`)."""
        dtype = np.dtype(dtype)
        if get_worker_info() is not None:
            tensor = fresh_zeros(shape, dtype)
            return tensor.numpy(), tensor
        nbytes = int(np.prod(shape)) * dtype.itemsize
        slots = self._slots.setdefault(name, [])
        slot = next((s for s in slots if s.handed is None or s.handed() is None), None)
        if slot is None and len(slots) < self.slots_per_name:
            slot = _Slot(torch.empty(0, dtype=torch.uint8))
            slots.append(slot)
        if slot is None:  # every block is still held: an ordinary allocation, not pooled
            tensor = torch.from_numpy(np.zeros(shape, dtype))
            return tensor.numpy(), tensor
        if slot.storage.numel() < nbytes:  # grow by a quarter more than asked, so slow growth does not reallocate often
            slot.storage = torch.zeros(nbytes + nbytes // 4, dtype=torch.uint8, pin_memory=self.pin)
        _wait_for_copy(slot.storage)
        tensor = torch.empty(0, dtype=_TORCH_OF[dtype]).set_(slot.storage.untyped_storage(), 0, shape)
        slot.handed = weakref.ref(tensor)
        return tensor.numpy(), tensor


def fresh_zeros(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """Zeros; in a DataLoader worker in shared memory from the start, as default_collate does, so handing
    the block to the main process copies nothing (a new segment reads as zeros). np.zeros (calloc: the
    kernel's zero pages) fills faster than torch.zeros at these sizes."""
    if get_worker_info() is None:
        return torch.from_numpy(np.zeros(shape, dtype))
    shared = _new_shared_storage(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    if shared is None:  # the DataLoader moves the block to shared memory when it sends it: one copy more
        return torch.from_numpy(np.zeros(shape, dtype))
    return torch.empty(0, dtype=_TORCH_OF[np.dtype(dtype)]).set_(shared).view(shape)


# A private torch API (what default_collate itself uses in workers): looked up once, never required.
_NEW_SHARED = getattr(torch.UntypedStorage, "_new_shared", None)


def _new_shared_storage(nbytes: int) -> torch.UntypedStorage | None:
    """A zero-filled shared-memory storage from `_NEW_SHARED`, or None: a torch without it, or whose
    version of it fails, costs one copy per batch, not a crash (tests/test_batches.py runs both paths)."""
    if _NEW_SHARED is None:
        return None
    try:
        return _NEW_SHARED(nbytes)
    except (RuntimeError, TypeError):
        return None


# Host blocks whose non-blocking copy to the GPU was issued, by data pointer: written again only after it ran.
_IN_FLIGHT: dict[int, "torch.cuda.Event"] = {}


def record_copy(host: torch.Tensor) -> None:
    """Called after `host.to(cuda, non_blocking=True)`: the pool waits for this event before reusing the block."""
    if host.is_pinned():
        event = torch.cuda.Event()
        event.record()
        _IN_FLIGHT[host.untyped_storage().data_ptr()] = event


def _wait_for_copy(storage: torch.Tensor) -> None:
    event = _IN_FLIGHT.pop(storage.untyped_storage().data_ptr(), None) if _IN_FLIGHT else None
    if event is not None:
        event.synchronize()


# --------------------------------------------------------------------------- gathering


def _token_ranges(begins: np.ndarray, lengths: np.ndarray, out_rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat source positions [begin_i, begin_i + len_i) and their destinations out_row_i * width + [0, len_i),
    concatenated over the rows: one batch's tokens in two arrays."""
    before = np.cumsum(lengths) - lengths  # tokens of the earlier rows
    step = np.arange(int(lengths.sum()), dtype=np.int64)
    return np.repeat(begins - before, lengths) + step, np.repeat(out_rows * width - before, lengths) + step


@dataclass
class _Part:
    """The rows of one set that live in one shard."""

    shard: int
    out_rows: np.ndarray  # (m,) their positions in the set
    local: np.ndarray  # (m,) their row numbers in the shard
    begins: np.ndarray  # (m,) first token of each in the shard's token columns
    lengths: np.ndarray  # (m,) tokens taken (after any cut)
    src: np.ndarray  # every token taken, as flat positions in the shard's token columns
    dst: np.ndarray  # ... and where each goes in the row-major (n, width) block


@dataclass
class _Plan:
    """Where one set of rows' tokens come from (per shard) and go (row-major (n, width) positions)."""

    parts: list[_Part]
    lengths: np.ndarray  # (n,) tokens taken per row (after any cut)
    width: int
    pad: np.ndarray  # flat positions past each row's length


def plan(reader: RowReader, rows: np.ndarray, cut: np.ndarray | None = None) -> _Plan:
    """The gather plan of `rows` (row ids), each cut to at most `cut[i]` tokens when given."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= reader.num_rows):
        bad = rows[(rows < 0) | (rows >= reader.num_rows)][0]
        raise IndexError(f"row {bad} outside a split of {reader.num_rows} rows")
    shards = reader.shard_views()
    which = np.searchsorted(reader.shard_starts, rows, side="right") - 1  # (n,)
    begins, lengths = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    groups = []
    for s in np.unique(which):
        out_rows = np.flatnonzero(which == s)
        offsets = shards[s].input_ids[0]  # every token column of a shard shares these offsets (cache.make_record_batch)
        local = rows[out_rows] - shards[s].start
        begins[out_rows], lengths[out_rows] = offsets[local], offsets[local + 1] - offsets[local]
        groups.append((int(s), out_rows, local))
    if cut is not None:
        lengths = np.minimum(lengths, cut)
    width = int(lengths.max()) if len(rows) else 0
    parts = []
    for s, out_rows, local in groups:
        src, dst = _token_ranges(begins[out_rows], lengths[out_rows], out_rows, width)
        parts.append(_Part(s, out_rows, local, begins[out_rows], lengths[out_rows], src, dst))
    mask = np.arange(width)[None, :] < lengths[:, None]  # (n, width)
    return _Plan(parts, lengths, width, np.flatnonzero(~mask.ravel()))


def gather_tokens(reader: RowReader, p: _Plan, column: str, out: np.ndarray) -> None:
    """input_ids or token_type_ids into `out` (n, width), padding 0 (the mask marks it)."""
    flat = out.reshape(-1)
    for part in p.parts:
        flat[part.dst] = getattr(reader.shard_views()[part.shard], column)[1][part.src]
    flat[p.pad] = 0


def gather_hidden(reader: RowReader, p: _Plan, layers: list[int], out: np.ndarray,
                  scales: np.ndarray | None = None) -> None:
    """Hidden states of `layers` into `out` (N_layers, n, width, D) in the stored dtype; with `scales`
    (N_layers, n, width) the int8 cache's per-token scales.

    Padding positions of `out` are left as they are: stale values of an earlier batch in a reused block.
    Every reader masks them: the losses through `losses._zero_padding` (a `torch.where`, so not even a
    NaN there leaks; tests/test_losses.py feeds them garbage padding), `step.check_batch_finite` by the
    masks. Zeroing the padding by fancy index cost as much as copying the tokens: padding is most of a
    batch of SST-2-length rows (docs/PERFORMANCE.md). int8 scales are zeroed there, so dequantised padding is zeros."""
    shards = reader.shard_views()
    wide = int(p.lengths.sum()) * out.shape[-1] * out.itemsize >= SLICE_BYTES * max(len(p.lengths), 1)
    for slot, j in enumerate(layers):
        flat = out[slot].reshape(-1, out.shape[-1])  # (n * width, D)
        for part in p.parts:
            if wide:
                _copy_rows(shards[part.shard].hidden[j][1], part, out[slot])
            else:
                flat[part.dst] = _take(shards[part.shard].hidden[j][1], part.src)
        if scales is not None:
            flat_scales = scales[slot].reshape(-1)
            for part in p.parts:
                flat_scales[part.dst] = _take(shards[part.shard].scales[j], part.src)
            flat_scales[p.pad] = 0


# Bytes per row (tokens x D x itemsize, on average over the rows of a batch) from which one slice copy per
# row beats the fancy-index gather. The gather copies every token twice (into a temporary, then scattered
# into the padded block); a slice copy writes it once but costs a Python call per row, so slices win on wide
# rows only (benchmarks/bench_gather.py places the threshold; its table is in docs/PERFORMANCE.md).
SLICE_BYTES = 8192


def _copy_rows(values: np.ndarray, part: _Part, out: np.ndarray) -> None:
    """Each row's contiguous token range into its row of `out` (n, width, D): one memcpy per row."""
    for row, begin, length in zip(part.out_rows.tolist(), part.begins.tolist(), part.lengths.tolist()):
        out[row, :length] = values[begin:begin + length]


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # mode="clip" skips take's bounds check and buffered copy (the plan's indices are in range by construction):
    # about twice as fast as values[rows] on these (tokens, D) blocks.
    out = np.empty((len(rows), *values.shape[1:]), values.dtype)
    return np.take(values, rows, axis=0, out=out, mode="clip")


def gather_rows_of(reader: RowReader, p: _Plan, field: str, out: np.ndarray) -> None:
    """A per-row field ("labels", "logits") into `out` (n, ...)."""
    for part in p.parts:
        out[part.out_rows] = getattr(reader.shard_views()[part.shard], field)[part.local]
