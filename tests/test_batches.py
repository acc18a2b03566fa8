"""The train-student data path against rows read the naive way (`conftest.ArrowRows`) and naive loops."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import RowReader, open_cache
from pipeline.core.errors import LrcError
from pipeline.student.batches import CacheDataset, EpochBatchSampler, collate, make_loader
from conftest import ArrowRows

K = 3


class StandInNegatives:
    """Duck-typed NegativeSampler: K row ids per anchor, a fixed function of (seed, epoch, row id)."""

    def __init__(self, num_rows: int, k: int = K, seed: int = 0) -> None:
        self.num_rows, self.k, self.seed = num_rows, k, seed

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        out = np.empty((len(row_ids), self.k), dtype=np.int64)
        for i, row in enumerate(row_ids):
            rng = np.random.default_rng([self.seed, epoch, int(row)])
            others = np.delete(np.arange(self.num_rows), row)
            out[i] = rng.choice(others, size=self.k, replace=False)
        return out


@pytest.fixture(scope="module")
def train_split(tiny_cache: Path) -> ArrowRows:
    return ArrowRows(tiny_cache, "train")


def _dataset(tiny_cache: Path, layers=(2, 4), negatives: bool = True) -> CacheDataset:
    return CacheDataset(tiny_cache, "train", list(layers), StandInNegatives(200) if negatives else None)


def _assert_batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- rows and padding


@pytest.mark.parametrize("random_access", [True, False])  # MADV_RANDOM mapping and pyarrow's default one
def test_row_reader_matches_naive_rows(tiny_cache: Path, train_split, random_access: bool) -> None:
    info = open_cache(tiny_cache).manifest["splits"]["train"]
    reader = RowReader(tiny_cache, info, [4], random_access=random_access)
    assert RowReader(tiny_cache, info, [4]).random_access is False  # a 0.4 MB split fits in any page cache
    for row in range(200):  # every row of all four shards, the short last one included
        want, got = train_split.example(row), reader.example(row)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["token_type_ids"], want["token_type_ids"])
        assert got["label"] == want["label"]
        np.testing.assert_array_equal(got["logits"], want["logits"])
        assert list(got["hidden"]) == [4]
        assert got["hidden"][4].dtype == np.float16
        np.testing.assert_array_equal(got["hidden"][4], want["hidden"][4])
        np.testing.assert_array_equal(reader.hidden(row, 4), want["hidden"][4])
    with pytest.raises(IndexError):
        reader.example(200)


def test_collate_matches_rows(tiny_cache: Path, train_split) -> None:
    dataset = _dataset(tiny_cache)
    rows = [5, 0, 199, 64, 63, 130, 128]  # across every shard boundary
    batch = collate(dataset.__getitems__(rows))
    lengths = [len(train_split.example(r)["input_ids"]) for r in rows]
    b, width = len(rows), max(lengths)

    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == (b, width)
    assert batch["teacher_hidden"].shape == (2, b, width, 32) and batch["teacher_hidden"].dtype == torch.float16
    assert batch["labels"].dtype == torch.long and batch["teacher_logits"].dtype == torch.float32
    assert batch["row_ids"].tolist() == rows
    for i, row in enumerate(rows):
        want, n = train_split.example(row), lengths[i]
        assert batch["input_ids"][i, :n].tolist() == want["input_ids"].tolist()
        assert batch["token_type_ids"][i, :n].tolist() == want["token_type_ids"].tolist()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert not batch["input_ids"][i, n:].any() and not batch["token_type_ids"][i, n:].any()
        assert batch["labels"][i].item() == want["label"]
        np.testing.assert_array_equal(batch["teacher_logits"][i].numpy(), want["logits"])
        for l, layer in enumerate([2, 4]):
            np.testing.assert_array_equal(batch["teacher_hidden"][l, i, :n].numpy(), want["hidden"][layer])
            assert not batch["teacher_hidden"][l, i, n:].any()


def test_negatives_are_the_sampled_rows_hidden_states(tiny_cache: Path, train_split) -> None:
    dataset = _dataset(tiny_cache)
    dataset.set_epoch(3)
    rows = [7, 70, 140, 199]
    batch = collate(dataset.__getitems__(rows))
    expected_ids = StandInNegatives(200).sample(np.array(rows), epoch=3)
    assert batch["negative_ids"].tolist() == expected_ids.tolist()
    # Each negative is cut to its anchor's length: COS-NCE uses the shared positions only.
    anchor_lengths = [len(train_split.example(r)["input_ids"]) for r in rows]
    neg_lengths = [[min(len(train_split.example(int(n))["input_ids"]), a) for n in ids]
                   for ids, a in zip(expected_ids, anchor_lengths)]
    assert any(len(train_split.example(int(n))["input_ids"]) > a for ids, a in zip(expected_ids, anchor_lengths)
               for n in ids)  # the cut happens in this batch
    width = max(max(x) for x in neg_lengths)
    assert batch["negative_hidden"].shape == (2, 4, K, width, 32)
    assert batch["negative_hidden"].dtype == torch.float16
    assert batch["negative_mask"].shape == (4, K, width)
    for i, ids in enumerate(expected_ids):
        for k, neg in enumerate(ids):
            want, n = train_split.example(int(neg)), neg_lengths[i][k]
            assert batch["negative_mask"][i, k].tolist() == [1] * n + [0] * (width - n)
            for l, layer in enumerate([2, 4]):
                np.testing.assert_array_equal(batch["negative_hidden"][l, i, k, :n].numpy(), want["hidden"][layer][:n])
                assert not batch["negative_hidden"][l, i, k, n:].any()
    # A row's negatives depend on the epoch, not on the batch it sits in.
    alone = collate([dataset[70]])
    assert alone["negative_ids"][0].tolist() == expected_ids[1].tolist()
    dataset.set_epoch(4)
    assert collate([dataset[70]])["negative_ids"][0].tolist() != expected_ids[1].tolist()


def test_real_negative_sampler_feeds_the_dataset(tiny_cache: Path, train_split, tmp_path: Path) -> None:
    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.negatives.build import build_negatives
    from pipeline.student.sampler import NegativeSampler

    path = build_negatives(NegativesConfig(cache_dir=tiny_cache, k=4, output=tmp_path / "neg.arrow", seed=1))
    sampler = NegativeSampler(path, 4, seed=2, expected_fingerprint=open_cache(tiny_cache).fingerprint)
    dataset = CacheDataset(tiny_cache, "train", [4], sampler)
    dataset.set_epoch(1)
    rows = [0, 100, 199]
    batch = collate(dataset.__getitems__(rows))
    ids = sampler.sample(np.array(rows), 1)
    assert batch["negative_ids"].tolist() == ids.tolist()
    for i, row in enumerate(rows):
        n = len(train_split.example(row)["input_ids"])
        for k, neg in enumerate(ids[i]):
            want = train_split.example(int(neg))["hidden"][4][:n]
            np.testing.assert_array_equal(batch["negative_hidden"][0, i, k, : len(want)].numpy(), want)
            assert batch["negative_mask"][i, k].sum().item() == len(want)


def test_layers_come_in_the_order_given(tiny_cache: Path, train_split) -> None:
    batch = collate(_dataset(tiny_cache, layers=(4, 2)).__getitems__([10]))
    n = len(train_split.example(10)["input_ids"])
    np.testing.assert_array_equal(batch["teacher_hidden"][0, 0, :n].numpy(), train_split.example(10)["hidden"][4])
    np.testing.assert_array_equal(batch["teacher_hidden"][1, 0, :n].numpy(), train_split.example(10)["hidden"][2])


def test_dev_split_has_no_hidden_states(tiny_cache: Path) -> None:
    dev = CacheDataset(tiny_cache, "dev", [])
    dev_split = ArrowRows(tiny_cache, "dev")
    assert len(dev) == 872
    batch = collate(dev.__getitems__([0, 871]))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "teacher_logits", "row_ids"}
    assert batch["labels"].tolist() == [dev_split.example(0)["label"], dev_split.example(871)["label"]]
    np.testing.assert_array_equal(batch["teacher_logits"][1].numpy(), dev_split.example(871)["logits"])


def test_bad_requests_are_one_line_errors(tiny_cache: Path) -> None:
    with pytest.raises(LrcError, match="not \\[3\\]"):
        CacheDataset(tiny_cache, "train", [2, 3])
    with pytest.raises(LrcError, match="no hidden states"):
        CacheDataset(tiny_cache, "dev", [2])
    with pytest.raises(LrcError, match="no 'test' split"):
        CacheDataset(tiny_cache, "test", [])


def test_dataset_pickles_without_its_mapped_shards(tiny_cache: Path) -> None:
    dataset = _dataset(tiny_cache)
    first = collate([dataset[3]])  # maps the shards in this process
    blob = pickle.dumps(dataset)
    assert len(blob) < 20_000  # the shards hold ~370 KB; only the path and manifest entry travel
    _assert_batches_equal(collate([pickle.loads(blob)[3]]), first)


# --------------------------------------------------------------------------- order


def _flat(batches: list[list[int]]) -> list[int]:
    return [row for batch in batches for row in batch]


def test_sampler_covers_every_row_once_and_reshuffles_per_epoch() -> None:
    sampler = EpochBatchSampler(200, 16, seed=7)
    assert len(sampler) == 13
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches] == [16] * 12 + [8]
        assert sorted(_flat(batches)) == list(range(200))
        epochs.append(_flat(batches))
    assert epochs[0] != epochs[1] != epochs[2]
    again = EpochBatchSampler(200, 16, seed=7)
    again.set_epoch(1)
    assert _flat(list(again)) == epochs[1]  # a function of (seed, epoch) alone
    other_seed = EpochBatchSampler(200, 16, seed=8)
    other_seed.set_epoch(1)
    assert _flat(list(other_seed)) != epochs[1]


def test_sampler_without_shuffle_and_drop_last() -> None:
    plain = EpochBatchSampler(10, 4, seed=0, shuffle=False)
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = EpochBatchSampler(10, 4, seed=0, drop_last=True)
    assert len(dropped) == 2 and [len(b) for b in dropped] == [4, 4]


def test_ranks_partition_the_batches() -> None:
    single = EpochBatchSampler(200, 20, seed=3)  # 10 batches: 2 ranks split them exactly
    single.set_epoch(5)
    whole = list(single)
    ranks = []
    for rank in range(2):
        sampler = EpochBatchSampler(200, 20, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(5)
        ranks.append(list(sampler))
        assert ranks[-1] == whole[rank::2] and len(sampler) == 5
    assert sorted(_flat(ranks[0] + ranks[1])) == list(range(200))


def test_uneven_ranks_get_equal_batch_counts() -> None:
    # 13 batches over 3 ranks: DDP needs 5 each, so the first two batches come round again.
    ranks = []
    for rank in range(3):
        sampler = EpochBatchSampler(200, 16, seed=1, rank=rank, world_size=3)
        sampler.set_epoch(0)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler) == 5
    single = EpochBatchSampler(200, 16, seed=1)
    single.set_epoch(0)
    whole = list(single)
    assert sorted(_flat(ranks[0] + ranks[1] + ranks[2])) == sorted(_flat(whole + whole[:2]))
    for rank in range(3):
        cut = EpochBatchSampler(200, 16, seed=1, drop_last=True, rank=rank, world_size=3)
        cut.set_epoch(0)
        assert len(list(cut)) == len(cut) == 4  # 12 full batches, 4 per rank


def test_skip_batches_resumes_with_the_remaining_batches() -> None:
    sampler = EpochBatchSampler(200, 16, seed=2, rank=1, world_size=2)
    sampler.set_epoch(4)
    whole = list(sampler)
    for skip in (0, 3, len(sampler)):
        sampler.set_epoch(4, skip_batches=skip)
        assert list(sampler) == whole[skip:]
        assert len(sampler) == len(whole)  # len stays a full epoch's
    sampler.set_epoch(5)
    assert list(sampler) != whole  # the skip does not leak into the next epoch
    with pytest.raises(ValueError):
        sampler.set_epoch(4, skip_batches=len(whole) + 1)


# --------------------------------------------------------------------------- the loader


def _epoch(dataset: CacheDataset, sampler: EpochBatchSampler, epoch: int, workers: int, skip: int = 0) -> list[dict]:
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch, skip_batches=skip)
    return list(make_loader(dataset, sampler, num_workers=workers, seed=epoch))


def test_loader_resume_mid_epoch_gives_the_same_batches(tiny_cache: Path) -> None:
    dataset, sampler = _dataset(tiny_cache), EpochBatchSampler(200, 16, seed=11)
    full = _epoch(dataset, sampler, epoch=2, workers=0)
    assert [b["row_ids"].tolist() for b in full] == [b.tolist() for b in sampler.rank_batches()]
    read = []
    original = dataset.__getitems__
    dataset.__getitems__ = lambda rows: read.extend(rows) or original(rows)  # spy on the rows actually read
    resumed = _epoch(dataset, EpochBatchSampler(200, 16, seed=11), epoch=2, workers=0, skip=5)
    assert len(resumed) == len(full) - 5
    for a, b in zip(resumed, full[5:]):
        _assert_batches_equal(a, b)
    assert sorted(read) == sorted(_flat([b["row_ids"].tolist() for b in full[5:]]))


def test_workers_give_the_same_batches_as_the_main_process(tiny_cache: Path) -> None:
    dataset, sampler = _dataset(tiny_cache), EpochBatchSampler(200, 16, seed=5)
    collate([dataset[0]])  # the parent maps the shards first: forked workers must still work
    for epoch in (0, 1):  # a new epoch's negatives reach fresh workers
        main = _epoch(dataset, sampler, epoch, workers=0)
        workers = _epoch(dataset, sampler, epoch, workers=2)
        assert len(main) == len(workers) == 13
        for a, b in zip(main, workers):
            _assert_batches_equal(a, b)
        for batch in workers:
            want = StandInNegatives(200).sample(batch["row_ids"].numpy(), epoch)
            assert batch["negative_ids"].tolist() == want.tolist()


def test_loader_leaves_the_global_torch_rng_alone(tiny_cache: Path) -> None:
    dataset, sampler = _dataset(tiny_cache, negatives=False), EpochBatchSampler(200, 64, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(dataset, sampler, 0, workers=0)
    assert torch.equal(torch.rand(3), expected)  # a resumed run replays the same dropout masks


def test_workers_without_the_private_shared_memory_api_give_the_same_batches(tiny_cache: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`_zeros` uses torch's private `UntypedStorage._new_shared` in workers; a torch without it falls back."""
    dataset = _dataset(tiny_cache)
    sampler = EpochBatchSampler(len(dataset), 16, seed=5)
    want = list(make_loader(dataset, sampler, num_workers=0, seed=1))
    with_api = list(make_loader(dataset, sampler, num_workers=1, seed=1))
    from pipeline.student import gather as batches  # the shared-memory blocks are made in pipeline/student/gather.py

    def broken(nbytes: int) -> None:
        raise TypeError("a future torch's signature")

    monkeypatch.setattr(batches, "_NEW_SHARED", None)  # workers fork from this process: they see it too
    without_api = list(make_loader(dataset, sampler, num_workers=1, seed=1))
    monkeypatch.setattr(batches, "_NEW_SHARED", broken)
    failing_api = list(make_loader(dataset, sampler, num_workers=1, seed=1))
    assert len(want) == len(with_api) == len(without_api) == len(failing_api) == 13
    for a, b, c, d in zip(want, with_api, without_api, failing_api):
        _assert_batches_equal(a, b)
        _assert_batches_equal(a, c)
        _assert_batches_equal(a, d)
