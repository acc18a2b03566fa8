"""int8 hidden states, in-batch negatives and the vectorised data path, each against a naive
reference or hand values, so that the plausible bug fails (named in each test's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused
from pipeline.cache import quant
from pipeline.cache.describe import describe
from pipeline.cache.reader import RowReader, open_cache
from pipeline.core.config import DataConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.student import gather, losses, run_dir, state_file
from pipeline.student.batches import CacheDataset, EpochBatchSampler, make_loader, to_device
from pipeline.student.sampler import InBatchNegatives
from pipeline.student.train import train_student
from pipeline.teacher.extract import extract_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, glue_dir: Path) -> Path:
    """The session cache's rows (tiny teacher, 200 SST-2 rows, shards of 64, layers [2, 4]) stored as int8."""
    out = tmp_path_factory.mktemp("int8") / "sst2"
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=200)
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, student_layers=2, shard_rows=64,
                                  hidden_dtype="int8"))
    return out


# --------------------------------------------------------------------------- quantisation


def test_int8_hand_values_and_the_all_zero_token() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, 0.0]])
    q, scale = quant.quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.0, 2.0]))
    assert q.tolist() == [[1, -2, 0, 127], [0, 0, 0, 0], [-127, 64, 0, 0]]  # round half to even: 0.5 -> 0, 63.5 -> 64
    back = quant.dequantize(q, scale)
    assert torch.equal(back[1], torch.zeros(4))  # scale 0 dequantises to exact zeros, never NaN


def test_int8_error_is_bounded_per_token_not_per_layer() -> None:
    """A scale per layer (or tensor) would give the small token the large one's step: error ~ 1000 / 254."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # token scales over 6 decades
    x[7] = 0.0
    q, scale = quant.quantize(x)
    err = (quant.dequantize(q, scale) - x).abs().amax(-1)  # (T,)
    bound = x.abs().amax(-1) / 254
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all())
    assert float(err[0]) < 1e-4  # the 1e-3 token keeps its own precision (a shared scale: ~10)
    assert int(q.abs().max()) == 127 and not bool((q == -128).any())


def test_int8_cache_matches_the_fp16_cache_within_the_bound(int8_cache: Path, tiny_cache: Path) -> None:
    fp16, int8 = open_cache(tiny_cache).split("train").reader(), open_cache(int8_cache).split("train").reader()
    assert int8.quantized and not fp16.quantized
    for row in (0, 63, 64, 199):  # first and last rows of shards
        for j in (2, 4):
            a, b = fp16.dequantized(row, j), int8.dequantized(row, j)
            absmax = np.abs(a).max(1, keepdims=True)
            assert np.all(np.abs(a - b) <= absmax / 254 + absmax * 2.0**-10)  # int8 bound + float16's rounding
            assert int8.hidden(row, j).dtype == np.int8 and int8.scales(row, j).shape == (len(a),)


def test_int8_manifest_readers_and_size(int8_cache: Path, tiny_cache: Path) -> None:
    import datasets

    manifest = json.loads((int8_cache / "manifest.json").read_text())
    assert manifest["hidden_dtype"] == "int8" and manifest["hidden_quant"]["scheme"] == "int8-symmetric-absmax"
    assert "hidden_quant" not in json.loads((tiny_cache / "manifest.json").read_text())  # fp16: as before int8
    text = describe(open_cache(int8_cache))
    assert "stored as int8" in text and "int8-symmetric-absmax" in text and "(float16)" in text
    shard = sorted((int8_cache / "shards").glob("train-*.arrow"))[0]
    ds = datasets.Dataset.from_file(str(shard))
    assert {"hidden_2", "hidden_2_scale", "pooled"} <= set(ds.column_names) and len(ds) == 64
    pooled = open_cache(int8_cache).split("train").pooled()  # what build-negatives reads: floats as ever
    assert pooled.dtype == np.float32 and np.isfinite(pooled).all()
    # a quarter of the float32 bytes + a scale per token: well under the fp16 cache (at d' = 32, overheads dominate)
    assert manifest["splits"]["train"]["bytes"] < 0.75 * json.loads((tiny_cache / "manifest.json").read_text())["splits"]["train"]["bytes"]


def test_resuming_a_cache_with_another_dtype_is_refused(tiny_cache: Path, tiny_teacher: Path, glue_dir: Path,
                                                        tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=200)
    assert_refused(lambda: extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=copy,
                                                         student_layers=2, shard_rows=64, hidden_dtype="int8")),
                   "other settings", "hidden_dtype")
    assert_refused(lambda: ExtractConfig(teacher=tiny_teacher, data=data, output_dir=copy, hidden_dtype="int4"),
                   "--hidden-dtype")


# --------------------------------------------------------------------------- the data path against a naive one


def naive_batch(reader: RowReader, rows: list[int], negatives: np.ndarray | None) -> dict[str, np.ndarray]:
    """The old per-row collate, kept tiny: rows padded one by one, hidden states dequantised to float32."""
    ex = [reader.example(r) for r in rows]
    width = max(len(e["input_ids"]) for e in ex)
    out = {"input_ids": np.zeros((len(rows), width), np.int64), "attention_mask": np.zeros((len(rows), width), np.int64),
           "teacher_hidden": np.zeros((len(reader.layers), len(rows), width, 32), np.float32),
           "labels": np.array([e["label"] for e in ex]), "teacher_logits": np.stack([e["logits"] for e in ex])}
    for i, (row, e) in enumerate(zip(rows, ex)):
        n = len(e["input_ids"])
        out["input_ids"][i, :n], out["attention_mask"][i, :n] = e["input_ids"], 1
        for s, j in enumerate(reader.layers):
            out["teacher_hidden"][s, i, :n] = reader.dequantized(row, j)
    if negatives is not None:
        k = negatives.shape[1]
        cut = [[min(len(reader.hidden(int(r), reader.layers[0])), len(e["input_ids"])) for r in negs]
               for negs, e in zip(negatives, ex)]
        ln = max(max(c) for c in cut)
        out["negative_hidden"] = np.zeros((len(reader.layers), len(rows), k, ln, 32), np.float32)
        out["negative_mask"] = np.zeros((len(rows), k, ln), np.int64)
        for i, negs in enumerate(negatives):
            for kk, r in enumerate(negs):
                n = cut[i][kk]
                out["negative_mask"][i, kk, :n] = 1
                for s, j in enumerate(reader.layers):
                    out["negative_hidden"][s, i, kk, :n] = reader.dequantized(int(r), j)[:n]
    return out


class FixedNegatives:
    """The file source's interface with given negatives: (seed, epoch, row) -> 3 other rows."""

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        return np.stack([(np.asarray(row_ids) + d * 37 + epoch) % 200 for d in (1, 2, 3)], axis=1)


def assert_matches_naive(batch: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    """Equal everywhere, except hidden-state padding, which the data path leaves unspecified (stale)
    for float caches: there only the masked positions are compared (int8 padding dequantises to 0)."""
    got = to_device(batch, CPU)
    masks = {"teacher_hidden": want["attention_mask"], "negative_hidden": want.get("negative_mask")}
    for key, value in want.items():
        actual = got[key].float().numpy() if got[key].is_floating_point() else got[key].numpy()
        if key in masks and "teacher_scales" not in batch:
            actual = np.where(masks[key][None, ..., None].astype(bool), actual, 0.0)
        np.testing.assert_array_equal(actual, value, err_msg=key)


@pytest.mark.parametrize("path", ["gather", "slices"])
@pytest.mark.parametrize("which", ["fp16", "int8"])
def test_vectorised_batches_equal_the_naive_collate_with_reused_buffers(tiny_cache: Path, int8_cache: Path,
                                                                         which: str, path: str, monkeypatch) -> None:
    """Catches: a token range off by one, rows from the wrong shard, token ids or masks left stale in a
    reused block (or int8 scales, which must zero the padding), scales not following their tokens, negatives not cut to the anchor's length; on both copy paths
    (the fancy-index gather of narrow rows, one slice per row for wide ones)."""
    monkeypatch.setattr(gather, "SLICE_BYTES", 0 if path == "slices" else 1 << 40)
    cache = tiny_cache if which == "fp16" else int8_cache
    dataset = CacheDataset(cache, "train", [2, 4], FixedNegatives())
    reader = RowReader(cache, json.loads((cache / "manifest.json").read_text())["splits"]["train"], [2, 4])
    lengths = np.array([len(reader.example(r)["input_ids"]) for r in range(200)])
    longest = [int(r) for r in np.argsort(-lengths)[:16]]
    ragged = [3, 64, 199, 127, 0, 128, 65, int(np.argmin(lengths)), 190]  # every shard, first/last rows, shortest
    first = dataset.__getitems__(longest)  # fills the pooled blocks with long rows
    kept = {k: v.clone() for k, v in first.items()}
    second = dataset.__getitems__(ragged)  # `first` is still held: must get other blocks
    for key in kept:
        assert torch.equal(first[key], kept[key]), f"{key} of a held batch was overwritten"
    assert_matches_naive(second, naive_batch(reader, ragged, FixedNegatives().sample(np.array(ragged), 0)))
    del first, second, kept
    for _ in range(3):  # now blocks are reused: stale long rows must not leak into the padding
        batch = dataset.__getitems__(ragged[::-1])
        assert_matches_naive(batch, naive_batch(reader, ragged[::-1], FixedNegatives().sample(np.array(ragged[::-1]), 0)))
    if which == "int8":
        assert batch["teacher_hidden"].dtype == torch.int8 and "teacher_scales" in batch
        assert to_device(batch, CPU)["teacher_hidden"].dtype == torch.float32


# --------------------------------------------------------------------------- in-batch negatives


def test_in_batch_negatives_are_other_anchors_uniform_and_seeded() -> None:
    """Catches: the anchor drawn as its own negative, a repeated negative, a draw that ignores the seed or
    the epoch, and a biased draw (e.g. always the next anchors)."""
    source = InBatchNegatives(k=4, seed=3)
    rows = np.random.default_rng(0).permutation(1000)[:16]
    counts = np.zeros((16, 16))
    for epoch in range(400):
        pos = source.positions(rows, epoch)
        assert pos.shape == (16, 4)
        assert not (pos == np.arange(16)[:, None]).any()
        assert all(len(set(p)) == 4 for p in pos.tolist())
        np.testing.assert_array_equal(source.sample(rows, epoch), rows[pos])
        counts[np.arange(16)[:, None], pos] += 1
    off_diagonal = counts[~np.eye(16, dtype=bool)]
    assert counts.trace() == 0 and off_diagonal.min() > 0.6 * 400 * 4 / 15 and off_diagonal.max() < 1.4 * 400 * 4 / 15
    same = InBatchNegatives(k=4, seed=3).positions(rows, 7)
    np.testing.assert_array_equal(same, source.positions(rows, 7))  # deterministic: a resume draws the same
    assert not np.array_equal(InBatchNegatives(k=4, seed=4).positions(rows, 7), same)
    assert not np.array_equal(source.positions(rows, 8), same)


def test_in_batch_short_batches_and_bad_settings(tmp_path: Path) -> None:
    source = InBatchNegatives(k=4, seed=0)
    pos = source.positions(np.array([10, 20, 30]), 0)  # B - 1 = 2 < K: all the others
    assert sorted(map(sorted, pos.tolist())) == [[0, 1], [0, 2], [1, 2]] and not (pos == np.arange(3)[:, None]).any()
    assert source.positions(np.array([5]), 0).shape == (1, 0)
    assert_refused(lambda: TrainConfig(cache_dir=tmp_path, output_dir=tmp_path / "o", negatives_source="in-batch",
                                       batch_size=4, k=4), "--batch-size 4 must be > --k")
    assert_refused(lambda: TrainConfig(cache_dir=tmp_path, output_dir=tmp_path / "o", negatives_source="faiss"),
                   "--negatives-source")


class SameIds:
    """A file-like source that returns the ids an in-batch draw picked: the two paths must then agree."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        return self.ids


@pytest.mark.parametrize("which", ["fp16", "int8"])
def test_in_batch_negatives_give_the_cos_nce_of_the_same_rows_read_from_the_cache(tiny_cache: Path, int8_cache: Path,
                                                                                   which: str) -> None:
    """Catches a wrong position -> anchor mapping (in the data path or in cos_nce's all-pairs gather), and
    in-batch negatives compared over positions the anchor does not have."""
    cache = tiny_cache if which == "fp16" else int8_cache
    rows = [5, 70, 140, 199, 0, 33, 101, 150]
    in_batch = to_device(CacheDataset(cache, "train", [2, 4], InBatchNegatives(3, seed=1)).__getitems__(rows), CPU)
    ids = in_batch["negative_ids"].numpy()
    from_file = to_device(CacheDataset(cache, "train", [2, 4], SameIds(ids)).__getitems__(rows), CPU)
    np.testing.assert_array_equal(ids, np.array(rows)[InBatchNegatives(3, seed=1).positions(np.array(rows), 0)])
    assert "negative_hidden" not in in_batch  # positions only: no negative is copied
    student = torch.randn(*in_batch["teacher_hidden"].shape[1:], generator=torch.Generator().manual_seed(0))
    b, length, width = student.shape
    empty, empty_mask = torch.zeros(b, 0, length, width), torch.zeros(b, 0, length, dtype=torch.long)
    for granularity in ("flat", "token", "cls"):
        for slot in (0, 1):
            a = losses.cos_nce(student, in_batch["teacher_hidden"][slot].float(), in_batch["attention_mask"],
                               empty, empty_mask, granularity, in_batch["negative_pos"])
            b = losses.cos_nce(student, from_file["teacher_hidden"][slot].float(), from_file["attention_mask"],
                               from_file["negative_hidden"][slot], from_file["negative_mask"], granularity)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- training from an int8 cache


def _tiny(cache: Path, out: Path, **kwargs) -> TrainConfig:
    settings = dict(layers=2, hidden=16, heads=2, intermediate=32, k=2, max_steps=12, num_workers=0, device="cpu",
                    checkpoint_every=4, log_every=1, batch_size=16, negatives_source="in-batch")
    return TrainConfig(cache_dir=cache, output_dir=out, **{**settings, **kwargs})


def test_an_int8_cache_with_in_batch_negatives_trains_and_resumes_exactly(int8_cache: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a resume that reads other batches or other negatives (the draw not a function of the step),
    and a loss that does not see the dequantised targets (no negatives file exists here: in-batch only)."""
    assert not (int8_cache / "negatives.arrow").exists()
    reference = train_student(_tiny(int8_cache, tmp_path / "ref"))
    assert reference["steps"] == 12

    import pipeline.student.train as train_module

    step, calls = train_module.train_step, []

    def crash_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # a kill after the step-4 checkpoint
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_student(_tiny(int8_cache, tmp_path / "run"))
    monkeypatch.setattr(train_module, "train_step", step)
    resumed = train_student(_tiny(int8_cache, tmp_path / "run", resume=True))
    a = state_file.read_state(tmp_path / "run" / run_dir.CHECKPOINT_DIR / run_dir.STATE_FILE)
    b = state_file.read_state(tmp_path / "ref" / run_dir.CHECKPOINT_DIR / run_dir.STATE_FILE)
    assert a["state"] == b["state"] and resumed["best"] == reference["best"]
    for part in ("student", "projections"):
        for key in b[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["cos_nce"] < 4 * 2 for r in log if "cos_nce" in r)  # 2 mapped layers, each in [0, 4]


def test_the_loader_delivers_int8_batches_in_the_sampler_order(int8_cache: Path) -> None:
    dataset = CacheDataset(int8_cache, "train", [2, 4], InBatchNegatives(2, seed=0))
    sampler = EpochBatchSampler(200, 64, seed=1)
    sampler.set_epoch(1, skip_batches=1)
    dataset.set_epoch(1)
    batches = [to_device(b, CPU) for b in make_loader(dataset, sampler, num_workers=0, seed=1)]
    assert [b["row_ids"].tolist() for b in batches] == [x.tolist() for x in sampler.rank_batches()[1:]]
    last = batches[-1]  # 200 = 3 x 64 + 8: a short batch still has K = 2 others per anchor
    assert last["negative_pos"].shape == (8, 2) and last["teacher_hidden"].dtype == torch.float32


def test_inspect_cache_names_the_scheme(int8_cache: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["inspect-cache", str(int8_cache), "--verify"])
    assert result.exit_code == 0, result.output
    assert "stored as int8" in result.stdout and "int8-symmetric-absmax" in result.stdout
    assert "hidden_<layer>_scale" in result.stdout and "every shard matches its checksum" in result.stdout


def test_in_batch_under_torchrun_needs_k_others_in_each_ranks_share(tiny_cache: Path, tmp_path: Path) -> None:
    """--batch-size is the global batch: 8 over 2 ranks leaves 4 rows per rank, too few for K = 4 in-batch
    negatives, although 8 > K passes the one-process check. Refused before any process group or run dir."""
    from pipeline.core import distributed
    from pipeline.student.run import setup_run

    config = TrainConfig(cache_dir=tiny_cache, output_dir=tmp_path / "o", negatives_source="in-batch", batch_size=8, k=4,
                         layers=2, hidden=32, heads=2, intermediate=64)
    assert_refused(lambda: setup_run(config, distributed.Ranks(rank=0, world_size=2)), "here 4 rows (8 over 2 ranks)")
    assert not (tmp_path / "o").exists()


def test_negative_or_non_finite_int8_scales_are_refused_by_row(int8_cache: Path, tmp_path: Path) -> None:
    """A negative scale flips its token's sign and used to train silently (a NaN one only showed as a NaN loss):
    the batch that reads it is refused, naming the cache, the rows and the fix."""
    import shutil

    import pyarrow as pa

    from pipeline.cache import format as cache_mod
    from pipeline.cache.manifest import assemble_manifest

    for bad in (-0.5, float("inf")):
        c = tmp_path / f"cache-{bad}"
        shutil.copytree(int8_cache, c)
        manifest = json.loads((c / "manifest.json").read_text())
        entry = manifest["splits"]["train"]["shards"][1]
        with pa.memory_map(str(c / entry["file"])) as source:
            table = pa.ipc.open_stream(source).read_all().combine_chunks()
        name = quant.scale_column(2)
        column = table.column(name).chunk(0)
        values = column.values.to_numpy().copy()
        row = 5  # the shard's sixth row: its first token gets the bad scale
        values[column.offsets.to_numpy()[row]] = bad
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), pa.ListArray.from_arrays(column.offsets, pa.array(values)))
        cache_mod.write_shard(c, "train", entry["start"], entry["stop"], table.to_batches()[0])  # checksums match
        extra = {k: manifest[k] for k in ("teacher_path", "kind")}
        assemble_manifest(c, json.loads((c / "settings.json").read_text()), extra)
        out = tmp_path / f"run-{bad}"
        assert_refused(lambda: train_student(_tiny(c, out, max_steps=13, negatives_source="file", k=0)),
                       "negative or non-finite int8 scales", f"train row(s) {entry['start'] + row}", "re-extract")
