"""The data path of `lrc train-student`: cached rows -> padded batches with their K negatives.

Rows come from the memory-mapped shards (`reader.RowReader`), each DataLoader worker mapping them
itself, read and padded a whole batch at a time (`pipeline/student/gather.py`). The K negatives of a row are
gathered by row id from the same split (negatives file), or are other anchors of the batch, passed as
positions (in-batch). int8 caches travel as int8 + scales and are dequantised by `to_device`. Batch order is a pure
function of (seed, epoch) and each rank takes its own share of the batches, so `--resume` continues
mid-epoch with the same data and DistributedDataParallel needs only a rank and a world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.cache import quant
from pipeline.cache.manifest import read_manifest
from pipeline.cache.reader import RowReader
from pipeline.cache.verify import verify_shards
from pipeline.core.errors import LrcError
from pipeline.student import gather


class NegativeSource(Protocol):
    """What the dataset needs of a negatives source: `sampler.NegativeSampler` (the FAISS file) or
    `sampler.InBatchNegatives` (which also has `in_batch = True` and `positions(row_ids, epoch)`)."""

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray: ...  # (B,) -> (B, K) int64 row ids


# --------------------------------------------------------------------------- rows


class CacheDataset(Dataset):
    """Rows of one cache split; opens the memory-mapped shards lazily in each worker (never pickles tables)."""

    def __init__(self, cache_dir: Path, split: str, layers: list[int], negatives: NegativeSource | None = None) -> None:
        cache_dir = Path(cache_dir)
        manifest = read_manifest(cache_dir)
        verify_shards(cache_dir, manifest, "size")  # the hashes were checked by whoever opened the cache
        if split not in manifest["splits"]:
            have = ", ".join(sorted(manifest["splits"]))
            raise LrcError(f"cache {cache_dir} has no {split!r} split (it has: {have}); re-extract with that split")
        info = manifest["splits"][split]
        missing = [j for j in layers if j not in manifest["layers"]]
        if missing:
            raise LrcError(
                f"cache {cache_dir} stores teacher layers {manifest['layers']}, not {missing}: re-extract with "
                "`lrc extract-teacher --layers ...` or choose a student depth whose layer map it covers"
            )
        if (layers or negatives is not None) and not info["hidden"]:
            raise LrcError(f"split {split!r} of cache {cache_dir} has no hidden states: train on the train split")
        if negatives is not None and not layers:
            raise ValueError("negatives need at least one teacher layer to gather hidden states from")
        self.cache_dir, self.split, self.layers, self.negatives = cache_dir, split, list(layers), negatives
        self.fingerprint: str = manifest["fingerprint"]
        self.num_rows: int = info["rows"]
        self.epoch = 0
        self._info = info
        self._reader: RowReader | None = None
        self._reader_pid = -1
        self._pool = gather.BufferPool(pin=torch.cuda.is_available())

    def set_epoch(self, epoch: int) -> None:
        """Negatives are drawn with `negatives.sample(..., epoch)`; call before creating the loader's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn get a pickled dataset: never the mapped tables, they map their own.
        return {**self.__dict__, "_reader": None, "_reader_pid": -1, "_pool": gather.BufferPool()}

    def _rows(self) -> RowReader:
        # Keyed by pid so a worker forked after the parent opened the shards still maps them itself.
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = RowReader(self.cache_dir, self._info, self.layers, split=self.split), os.getpid()
        return self._reader

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([row])

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, read and padded at once (the DataLoader calls this with a batch's rows); `collate` passes it on.

        input_ids, token_type_ids, attention_mask (B, L) long; labels (B,) long or float and teacher_logits
        (B, C) float32 (task caches only); row_ids (B,) long; teacher_hidden (N_layers, B, L, D) in the stored
        dtype when layers were read, with teacher_scales (N_layers, B, L) float32 for an int8 cache. Hidden
        states past a row's length are unspecified (see `gather.gather_hidden`): read them through the masks.
        Negatives from a file: negative_ids (B, K), negative_hidden (N_layers, B, K, Ln, D) (+ negative_scales),
        negative_mask (B, K, Ln), each negative cut to its anchor's length, so Ln <= L. In-batch negatives:
        negative_ids (B, K) and negative_pos (B, K), their positions in this batch (COS-NCE reads them from
        teacher_hidden), so no row is read twice.
        """
        reader = self._rows()
        ids = np.asarray(rows, dtype=np.int64)
        p = gather.plan(reader, ids)
        b, width = len(ids), p.width
        batch = {"row_ids": torch.from_numpy(ids.copy())}
        for column in ("input_ids", "token_type_ids"):
            values, tensor = self._pool.take(column, (b, width), np.int64)
            gather.gather_tokens(reader, p, column, values)
            batch[column] = tensor
        mask, mask_tensor = self._pool.take("attention_mask", (b, width), np.int64)
        np.less(np.arange(width)[None, :], p.lengths[:, None], out=mask, casting="unsafe")
        batch["attention_mask"] = mask_tensor
        shard = reader.shard_views()[0]
        if shard.labels is not None and shard.logits is not None:  # rows of a corpus cache have no label and no logits
            labels = np.empty(b, np.float32 if shard.labels.dtype.kind == "f" else np.int64)
            logits = np.empty((b, shard.logits.shape[1]), np.float32)
            gather.gather_rows_of(reader, p, "labels", labels)
            gather.gather_rows_of(reader, p, "logits", logits)
            if labels.dtype.kind == "i":
                self._check_labels(labels, logits.shape[1], ids)
            batch |= {"labels": torch.from_numpy(labels), "teacher_logits": torch.from_numpy(logits)}
        if self.layers:
            batch |= self._hidden(reader, p, "teacher", b, ids)
        if self.negatives is not None:
            batch |= self._negatives(reader, ids, p)
        return batch

    def _hidden(self, reader: RowReader, p: gather._Plan, prefix: str, n: int, row_ids: np.ndarray,
                shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """{prefix}_hidden (N_layers, n, width, D) and, for an int8 cache, {prefix}_scales (N_layers, n, width);
        `row_ids` (n,): the rows read, to name them when their scales are refused."""
        first = reader.shard_views()[0].hidden[self.layers[0]][1]
        lead = (len(self.layers), n, p.width)
        values, tensor = self._pool.take(f"{prefix}_hidden", (*lead, first.shape[1]), first.dtype)
        scales, scale_tensor = None, None
        if reader.quantized:
            scales, scale_tensor = self._pool.take(f"{prefix}_scales", lead, np.float32)
        gather.gather_hidden(reader, p, self.layers, values, scales)
        if scales is not None:
            self._check_scales(scales, row_ids)
        view = shape or lead
        out = {f"{prefix}_hidden": tensor.view(*view, first.shape[1])}
        if scale_tensor is not None:
            out[f"{prefix}_scales"] = scale_tensor.view(*view)
        return out

    def _check_labels(self, labels: np.ndarray, num_labels: int, row_ids: np.ndarray) -> None:
        """Class ids index the teacher's logits: one outside [0, C) would end the step in an IndexError traceback
        from the cross-entropy (a device-side assert on a GPU). Data loading refuses such labels, so only a damaged
        or foreign cache holds one."""
        bad = (labels < 0) | (labels >= num_labels)
        if bad.any():
            rows = row_ids[bad].tolist()
            raise LrcError(f"cache {self.cache_dir} holds labels outside 0..{num_labels - 1} for {self.split} row(s) "
                           f"{', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''}: the cache is damaged; "
                           "re-extract it with `lrc extract-teacher --overwrite`")

    def _check_scales(self, scales: np.ndarray, row_ids: np.ndarray) -> None:
        """An int8 scale is max|x| / 127: finite and >= 0. A negative one flips the sign of every value of its token
        and trains silently on the wrong target, so it is refused here, on the host, where it costs one pass over
        (N_layers, n, width) floats (a thousandth of the hidden states' bytes) and no device sync."""
        good = (scales >= 0) & (scales <= np.finfo(np.float32).max)  # NaN fails both comparisons
        if good.all():
            return
        bad = np.unique(row_ids[np.flatnonzero(~good.all(axis=(0, 2)))]).tolist()
        raise LrcError(f"cache {self.cache_dir} holds negative or non-finite int8 scales for {self.split} row(s) "
                       f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}: the cache is damaged; "
                       "re-extract it with `lrc extract-teacher --overwrite`")

    def _negatives(self, reader: RowReader, ids: np.ndarray, anchors: gather._Plan) -> dict[str, torch.Tensor]:
        """One draw of K negatives per anchor for the whole batch (see __getitems__ for what comes back)."""
        if getattr(self.negatives, "in_batch", False):
            positions = self.negatives.positions(ids, self.epoch)  # (B, K') indices into this batch
            if positions.shape[1] == 0:  # a batch of one row has no other anchor: COS-NCE keeps its positive term
                return {}
            return {"negative_ids": torch.from_numpy(ids[positions]), "negative_pos": torch.from_numpy(positions)}
        negative_ids = np.asarray(self.negatives.sample(ids, self.epoch), np.int64)
        if negative_ids.ndim != 2 or len(negative_ids) != len(ids):
            raise ValueError(f"negatives.sample gave shape {negative_ids.shape} for {len(ids)} rows, want (B, K)")
        b, k = negative_ids.shape
        # COS-NCE compares a negative with its anchor over their shared positions only (docs/DESIGN.md §2), so tokens
        # past the anchor's length are never used: cutting them shrinks negative_hidden.
        p = gather.plan(reader, negative_ids.reshape(-1), np.repeat(anchors.lengths, k))
        out = {"negative_ids": torch.from_numpy(negative_ids)}
        out |= self._hidden(reader, p, "negative", b * k, negative_ids.reshape(-1), (len(self.layers), b, k, p.width))
        mask = np.arange(p.width)[None, :] < p.lengths[:, None]  # (B*K, Ln)
        out["negative_mask"] = torch.from_numpy(mask.reshape(b, k, p.width).astype(np.int64))
        return out


# --------------------------------------------------------------------------- to the step


def collate(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The DataLoader's collate_fn: `CacheDataset.__getitems__` already made the batch (a list holding one
    batch, e.g. `[dataset[i]]`, is that batch)."""
    if isinstance(batch, list):
        if len(batch) != 1:
            raise ValueError(f"collate takes one batch from CacheDataset.__getitems__, got a list of {len(batch)}")
        return batch[0]
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch as the step reads it, on `device`: int8 hidden states dequantised there (in float32;
    pipeline/cache/quant.py), so a GPU receives the int8 bytes. In-batch negatives stay positions
    (`negative_pos`): COS-NCE reads them from the anchors' teacher outputs (`losses.cos_nce`), so no
    negative is ever copied, on the host or on the device."""
    moved = {}
    for key, value in batch.items():
        moved[key] = value.to(device, non_blocking=True)
        if device.type == "cuda":
            gather.record_copy(value)  # the pool waits for this copy before it writes the block again
    for prefix in ("teacher", "negative"):
        scales = moved.pop(f"{prefix}_scales", None)
        if scales is not None:
            moved[f"{prefix}_hidden"] = quant.dequantize(moved[f"{prefix}_hidden"], scales)
    return moved


# --------------------------------------------------------------------------- order


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches for one rank: order depends only on (seed, epoch); rank r takes every world_size-th batch.

    With several ranks every rank gets the same number of batches (DDP steps in lockstep): without
    drop_last the batch list is padded by repeating its first batches, with drop_last it is cut.
    """

    def __init__(
        self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or num_rows <= 0:
            raise ValueError(f"need num_rows > 0 and batch_size > 0, got {num_rows} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """skip_batches: resume mid-epoch; the skipped batches' rows are never read."""
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches {skip_batches} outside [0, {len(self)}] for this epoch")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _num_batches_all_ranks(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        if self.drop_last:
            return full - full % self.world_size
        count = full + (rest > 0)
        return -(-count // self.world_size) * self.world_size

    def __len__(self) -> int:
        return self._num_batches_all_ranks() // self.world_size

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches of the whole current epoch (skipped ones included)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        batches = [order[s : s + self.batch_size] for s in range(0, self.num_rows, self.batch_size)]
        if self.drop_last and self.num_rows % self.batch_size:
            batches.pop()
        padded = [batches[i % len(batches)] for i in range(self._num_batches_all_ranks())]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.rank_batches()[self.skip_batches :]:
            yield batch.tolist()


def make_loader(dataset: CacheDataset, sampler: EpochBatchSampler, num_workers: int, seed: int = 0) -> DataLoader:
    """Call `dataset.set_epoch` and `sampler.set_epoch` before each `iter(loader)`.

    Workers are not persistent, so each epoch's fresh workers see the dataset's new epoch; each
    worker maps the shards itself on its first row. `seed` feeds the loader's own generator: without
    one, every `iter(loader)` draws its worker base seed from torch's global RNG and so shifts the
    training RNG stream (dropout) by a call that a resumed run would not replay.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
