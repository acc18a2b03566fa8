"""The data path of `lrc train-student`: cached rows -> padded batches with their K negatives.

Rows come from the memory-mapped shards (`cache_read.RowReader`), each DataLoader worker mapping them
itself; the K negatives of a row are gathered by row id from the same split. Batch order is a pure
function of (seed, epoch) and each rank takes its own share of the batches, so `--resume` continues
mid-epoch with the same data and DistributedDataParallel needs only a rank and a world size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pipeline.cache import read_manifest
from pipeline.cache_read import RowReader, verify_shards
from pipeline.errors import LrcError

log = logging.getLogger(__name__)


class NegativeSource(Protocol):
    """What the dataset needs of `sampler.NegativeSampler`."""

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

    def set_epoch(self, epoch: int) -> None:
        """Negatives are drawn with `negatives.sample(..., epoch)`; call before creating the loader's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn get a pickled dataset: never the mapped tables, they map their own.
        return {**self.__dict__, "_reader": None, "_reader_pid": -1}

    def _rows(self) -> RowReader:
        # Keyed by pid so a worker forked after the parent opened the shards still maps them itself.
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = RowReader(self.cache_dir, self._info, self.layers, split=self.split), os.getpid()
        return self._reader

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        """A batch of rows (the DataLoader calls this with a whole batch): one negatives draw per batch."""
        reader = self._rows()
        examples = [reader.example(int(r)) for r in rows]
        if self.negatives is None:
            return examples
        negative_ids = np.asarray(self.negatives.sample(np.asarray(rows, dtype=np.int64), self.epoch), np.int64)
        if negative_ids.ndim != 2 or len(negative_ids) != len(rows):
            raise ValueError(f"negatives.sample gave shape {negative_ids.shape} for {len(rows)} rows, want (B, K)")
        for example, ids in zip(examples, negative_ids):
            # COS-NCE compares a negative with its anchor over their shared positions only (DESIGN §2),
            # so tokens past the anchor's length are never used: cutting them shrinks negative_hidden.
            n = len(example["input_ids"])
            example["negative_ids"] = ids  # (K,)
            example["negative_hidden"] = {j: [reader.hidden(int(r), j)[:n] for r in ids] for j in self.layers}
        return examples


# --------------------------------------------------------------------------- padding


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of rows into tensors; hidden states keep their stored dtype (fp16 by default).

    input_ids, token_type_ids, attention_mask (B, L) long; labels (B,) long or float and teacher_logits
    (B, C) float32 (task caches only); row_ids (B,) long; teacher_hidden (N_layers, B, L, D) when layers were read;
    negative_ids (B, K), negative_hidden (N_layers, B, K, Ln, D), negative_mask (B, K, Ln) with negatives;
    each negative is cut to its anchor's length, so Ln <= L.
    """
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)  # (B,)
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, L)
    batch = {
        "input_ids": torch.from_numpy(_pad_tokens([e["input_ids"] for e in examples], width)),
        "token_type_ids": torch.from_numpy(_pad_tokens([e["token_type_ids"] for e in examples], width)),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "row_ids": torch.tensor([e["row_id"] for e in examples], dtype=torch.long),
    }
    if "label" in examples[0]:  # rows of a corpus cache have no label and no logits
        labels = np.array([e["label"] for e in examples])
        batch["labels"] = torch.from_numpy(labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64))
        batch["teacher_logits"] = torch.from_numpy(np.stack([e["logits"] for e in examples]).astype(np.float32))
    layers = list(examples[0]["hidden"])
    if layers:
        per_layer = [[e["hidden"][j] for e in examples] for j in layers]  # N_layers x B arrays (len, D)
        batch["teacher_hidden"] = _pad_hidden(per_layer, width)  # (N_layers, B, L, D)
    if "negative_ids" in examples[0]:
        batch |= _pad_negatives(examples, layers)
    return batch


def _pad_negatives(examples: list[dict[str, Any]], layers: list[int]) -> dict[str, torch.Tensor]:
    """negative_ids (B, K), negative_hidden (N_layers, B, K, Ln, D), negative_mask (B, K, Ln)."""
    negative_ids = np.stack([e["negative_ids"] for e in examples])  # (B, K)
    b, k = negative_ids.shape
    lengths = np.array([[len(h) for h in e["negative_hidden"][layers[0]]] for e in examples], np.int64)  # (B, K)
    width = int(lengths.max())
    per_layer = [[h for e in examples for h in e["negative_hidden"][j]] for j in layers]  # N_layers x (B*K)
    hidden = _pad_hidden(per_layer, width)  # (N_layers, B*K, Ln, D)
    return {
        "negative_ids": torch.from_numpy(negative_ids),
        "negative_hidden": hidden.view(len(layers), b, k, width, hidden.shape[-1]),
        "negative_mask": torch.from_numpy((np.arange(width)[None, None, :] < lengths[:, :, None]).astype(np.int64)),
    }


def _pad_tokens(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)  # (B, L); padding id 0 (the mask marks it)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _pad_hidden(per_layer: list[list[np.ndarray]], width: int) -> torch.Tensor:
    """N_layers lists of n arrays (len_i, D) -> (N_layers, n, width, D), zeros after each row's tokens."""
    first = per_layer[0][0]
    out = _zeros((len(per_layer), len(per_layer[0]), width, first.shape[1]), first.dtype)
    values = out.numpy()  # a view: numpy slice assignment is the cheapest copy here
    for layer, rows in enumerate(per_layer):
        for i, row in enumerate(rows):
            values[layer, i, : len(row)] = row
    return out


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """Zeros for a padded block. np.zeros (calloc: the kernel's zero pages) fills faster than
    torch.zeros (malloc + memset) at these sizes. In a DataLoader worker the block is put in shared
    memory from the start, as default_collate does, so handing it to the main process copies nothing;
    a new segment reads as zeros (ftruncate). Measurements: docs/PERFORMANCE.md (data path)."""
    if get_worker_info() is None:
        return torch.from_numpy(np.zeros(shape, dtype))
    shared = _new_shared_storage(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    if shared is None:  # the DataLoader moves the block to shared memory when it sends it: one copy more
        return torch.from_numpy(np.zeros(shape, dtype))
    return torch.empty(0, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).set_(shared).view(shape)


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
