"""pipeline/cache/format.py, manifest.py, verify.py + extract: what the cache holds equals the teacher's own outputs
(docs/DESIGN.md §3)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.cache import format as cache
from pipeline.cache.manifest import assemble_manifest, manifest_fingerprint
from pipeline.cache.reader import open_cache
from pipeline.cache.quant import scale_column
from pipeline.core.config import DataConfig, layer_map
from pipeline.core.errors import LrcError
from pipeline.core.task_data import load_examples
from pipeline.core.teacher_config import HIDDEN_DTYPES, ExtractConfig
from pipeline.teacher.extract import extract_teacher
from conftest import assert_refused, sst2_lines, write_tsv

# fp16 storage: one rounding (2^-11 relative) plus batched-vs-single float noise that may flip it by an ulp.
FP16 = {"rtol": 2e-3, "atol": 1e-4}


# ---------------------------------------------------------------- helpers


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(text, int(label)) for text, label in rows]


class Reference:
    """The teacher run by hand: one example at a time, unpadded, output_hidden_states=True."""

    def __init__(self, teacher_dir: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(teacher_dir)

    @torch.no_grad()
    def __call__(self, text: str, max_length: int = 128) -> dict:
        enc = self.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        assert "attention_mask" in enc and int(enc["attention_mask"].min()) == 1  # really unpadded
        out = self.model(**enc, output_hidden_states=True)
        return {
            "input_ids": enc["input_ids"][0].numpy(),
            "logits": out.logits[0].numpy(),
            "hidden": [h[0].numpy() for h in out.hidden_states],  # index j = output of layer j
        }


def assert_row_matches(row: dict, ref: dict, layers: list[int]) -> None:
    np.testing.assert_array_equal(row["input_ids"], ref["input_ids"])
    np.testing.assert_allclose(row["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    tokens = len(ref["input_ids"])
    assert set(row["hidden"]) == set(layers)
    for j in layers:
        stored = row["hidden"][j]
        assert stored.dtype == np.float16 and stored.shape == (tokens, ref["hidden"][j].shape[1])
        np.testing.assert_allclose(stored.astype(np.float32), ref["hidden"][j], **FP16, err_msg=f"layer {j}")
    np.testing.assert_allclose(row["pooled"].astype(np.float32), ref["hidden"][-1].mean(0), **FP16)


@pytest.fixture(scope="module")
def tiny_ref(tiny_teacher: Path) -> Reference:
    return Reference(tiny_teacher)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, glue_dir: Path) -> Path:
    """40 real SST-2 rows through several batches per shard (batch 5, shards of 16), layers 1 and 3."""
    tmp = tmp_path_factory.mktemp("small")
    train = write_tsv(tmp / "train.tsv", sst2_lines(glue_dir, "train", 1000, 40))
    dev = write_tsv(tmp / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 20))
    data = DataConfig(task="sst2", train_file=train, dev_file=dev)
    out = tmp / "cache"
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, layers=(3, 1),
                                  batch_size=5, shard_rows=16, device="cpu"))
    return out


# ---------------------------------------------------------------- the layer map


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [(12, 4, [3, 6, 9, 12]), (6, 4, [2, 3, 5, 6]), (12, 6, [2, 4, 6, 8, 10, 12]), (6, 3, [2, 4, 6]),
     (4, 2, [2, 4]), (24, 4, [6, 12, 18, 24])],
)
def test_layer_map_hand_values(n: int, m: int, expected: list[int]) -> None:
    assert layer_map(n, m) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 6, 12, 24])
def test_layer_map_identity_and_single(n: int) -> None:
    assert layer_map(n, n) == list(range(1, n + 1))
    assert layer_map(n, 1) == [n]


def test_layer_map_is_round_half_up_of_i_n_over_m() -> None:
    for n in range(1, 25):
        for m in range(1, n + 1):
            expected = [int(np.floor(i * n / m + 0.5 + 1e-12)) for i in range(1, m + 1)]
            got = layer_map(n, m)
            assert got == expected, (n, m)
            assert got[-1] == n and all(a < b for a, b in zip(got, got[1:]))


# ---------------------------------------------------------------- round trip against the teacher


@pytest.mark.parametrize("dtype", HIDDEN_DTYPES)
def test_every_hidden_dtype_has_one_storage(dtype: str) -> None:
    """Every --hidden-dtype the config accepts is stored as the one table says: values as the dtype itself, the
    pooled vector as a float (float16 for int8), and the int8 scales beside int8 values only."""
    schema = cache.shard_schema([2], 8, 2, False, dtype, with_hidden=True)
    values = schema.field(cache.hidden_column(2)).type.value_type.value_type
    assert values == pa.from_numpy_dtype(np.dtype(dtype))
    assert schema.field("pooled").type.value_type == (pa.float16() if dtype == "int8" else values)
    assert (scale_column(2) in schema.names) == (dtype == "int8")


def test_tiny_cache_rows_equal_teacher_outputs(tiny_cache: Path, tiny_ref: Reference, glue_dir: Path) -> None:
    c = open_cache(tiny_cache, check="full")
    assert c.layers == layer_map(4, 2) == [2, 4] and c.hidden_size == 32
    examples = load_examples(DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=200), "train")
    train = c.split("train")
    assert train.num_rows == 200 and train.has_hidden
    np.testing.assert_array_equal(train.labels(), np.asarray(examples.labels))
    rows = train.reader(pooled=True)
    for i in [0, 1, 63, 64, 65, 127, 128, 150, 191, 192, 199]:  # both sides of every shard boundary
        row = rows.example(i)
        assert row["row_id"] == i and row["label"] == examples.labels[i]
        assert_row_matches(row, tiny_ref(examples.text_a[i]), [2, 4])


def test_every_row_through_small_batches_and_shards(small_cache: Path, tiny_ref: Reference) -> None:
    """Rows are length-sorted into batches inside each shard: every token must come back to its own row."""
    c = open_cache(small_cache)
    assert c.layers == [1, 3]
    rows = read_tsv(small_cache.parent / "train.tsv")
    train = c.split("train")
    assert train.num_rows == 40 and len(c.manifest["splits"]["train"]["shards"]) == 3  # 16 + 16 + 8
    refs = [tiny_ref(text) for text, _ in rows]
    reader = train.reader(pooled=True)
    for i, ((_, label), ref) in enumerate(zip(rows, refs)):
        row = reader.example(i)
        assert row["label"] == label
        assert_row_matches(row, ref, [1, 3])
    np.testing.assert_allclose(train.logits(), np.stack([r["logits"] for r in refs]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train.pooled(), np.stack([r["hidden"][-1].mean(0) for r in refs]), **FP16)
    assert train.pooled().dtype == np.float32


def test_no_padding_is_stored(small_cache: Path, tiny_ref: Reference) -> None:
    c = open_cache(small_cache)
    rows = read_tsv(small_cache.parent / "train.tsv")
    lengths = [len(tiny_ref.tokenizer(text, truncation=True, max_length=128)["input_ids"]) for text, _ in rows]
    assert len(set(lengths)) > 5  # real sentences of many lengths, so padding would show
    for shard in c.manifest["splits"]["train"]["shards"]:
        with pa.memory_map(str(small_cache / shard["file"])) as source:
            table = pa.ipc.open_stream(source).read_all()
        for k, i in enumerate(range(shard["start"], shard["stop"])):
            ids = table.column("input_ids")[k].as_py()
            assert len(ids) == lengths[i] and 0 not in ids  # 0 is [PAD]
            assert len(table.column("token_type_ids")[k].as_py()) == lengths[i]
            for j in (1, 3):
                assert len(table.column(f"hidden_{j}")[k].as_py()) == lengths[i]
    # Total hidden values stored == tokens x layers x width: nothing padded anywhere.
    total = sum(len(open_cache(small_cache).split("train").reader().example(i)["hidden"][1]) for i in range(40))
    assert total == sum(lengths)


def test_dev_split_has_logits_and_labels_but_no_hidden(small_cache: Path, tiny_ref: Reference) -> None:
    c = open_cache(small_cache)
    rows = read_tsv(small_cache.parent / "dev.tsv")
    dev = c.split("dev")
    assert dev.num_rows == 20 and not dev.has_hidden
    np.testing.assert_array_equal(dev.labels(), [label for _, label in rows])
    np.testing.assert_allclose(dev.logits(), np.stack([tiny_ref(t)["logits"] for t, _ in rows]), rtol=1e-5, atol=1e-5)
    row = dev.reader(pooled=True).example(7)
    assert row["hidden"] == {} and "pooled" not in row
    np.testing.assert_array_equal(row["input_ids"], tiny_ref(rows[7][0])["input_ids"])
    with pytest.raises(LrcError, match="no pooled vectors"):
        dev.pooled()
    names = pa.ipc.open_stream(pa.memory_map(str(small_cache / c.manifest["splits"]["dev"]["shards"][0]["file"]))).schema.names
    assert not any(n.startswith("hidden_") or n == "pooled" for n in names)


def test_manifest_describes_the_cache(small_cache: Path, tiny_teacher: Path) -> None:
    m = json.loads((small_cache / "manifest.json").read_text())
    assert m["format"] == "lrc-cache" and m["format_version"] == cache.FORMAT_VERSION
    assert m["layers"] == [1, 3] and m["hidden_size"] == 32 and m["hidden_dtype"] == "float16"
    assert m["teacher"]["num_layers"] == 4 and Path(m["teacher_path"]) == tiny_teacher.resolve()
    assert m["task"]["name"] == "sst2" and m["task"]["num_labels"] == 2
    assert m["max_length"] == 128 and "mean over real tokens" in m["pooled"]["definition"]
    for name, rows in (("train", 40), ("dev", 20)):
        info = m["splits"][name]
        assert info["rows"] == rows
        assert [(s["start"], s["stop"]) for s in info["shards"]] == [(a, min(a + 16, rows)) for a in range(0, rows, 16)]
        for s in info["shards"]:
            path = small_cache / s["file"]
            assert path.stat().st_size == s["bytes"] and cache.sha256_file(path) == s["sha256"]
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
    # The tokenizer travels with the cache and encodes exactly as the teacher's.
    from transformers import AutoTokenizer

    text = "a gripping , if somewhat long , film ."
    assert AutoTokenizer.from_pretrained(small_cache / "tokenizer")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_teacher)(text)["input_ids"]
    assert not list((small_cache / "shards").glob(".*"))  # no temp files left


def test_identical_inputs_share_a_key(tmp_path: Path, tiny_teacher: Path, glue_dir: Path) -> None:
    lines = sst2_lines(glue_dir, "train", 0, 6)
    train = write_tsv(tmp_path / "train.tsv", [*lines, lines[2], lines[4]])
    data = DataConfig(task="sst2", train_file=train, dev_file=write_tsv(tmp_path / "dev.tsv", lines[:2]))
    out = tmp_path / "cache"
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, shard_rows=3, device="cpu"))
    keys = open_cache(out).split("train").input_keys()
    assert keys[6] == keys[2] and keys[7] == keys[4]
    assert len(set(keys[:6].tolist())) == 6


# ---------------------------------------------------------------- --layers


def test_explicit_and_all_layers_select_their_columns(tmp_path: Path, tiny_teacher: Path, tiny_ref: Reference,
                                                      glue_dir: Path) -> None:
    lines = sst2_lines(glue_dir, "train", 500, 10)
    train = write_tsv(tmp_path / "train.tsv", lines)
    data = DataConfig(task="sst2", train_file=train, dev_file=write_tsv(tmp_path / "dev.tsv", lines[:3]))
    texts = [text for text, _ in read_tsv(train)]
    for layers, all_layers, expected in (((2, 3), False, [2, 3]), (None, True, [1, 2, 3, 4])):
        out = tmp_path / f"cache-{len(expected)}"
        manifest = extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, layers=layers,
                                                 all_layers=all_layers, device="cpu"))
        assert manifest["layers"] == expected
        shard = out / manifest["splits"]["train"]["shards"][0]["file"]
        names = pa.ipc.open_stream(pa.memory_map(str(shard))).schema.names
        assert [n for n in names if n.startswith("hidden_")] == [f"hidden_{j}" for j in expected]
        split = open_cache(out).split("train").reader(pooled=True)
        for i in (0, 9):
            assert_row_matches(split.example(i), tiny_ref(texts[i]), expected)


# ---------------------------------------------------------------- other readers


def test_datasets_and_pyarrow_read_the_same_rows(small_cache: Path) -> None:
    import datasets

    c = open_cache(small_cache)
    for name in ("train", "dev"):
        split = c.split(name)
        reader = split.reader()
        for shard in c.manifest["splits"][name]["shards"]:
            path = small_cache / shard["file"]
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            ds = datasets.Dataset.from_file(str(path))
            assert len(ds) == table.num_rows == shard["stop"] - shard["start"]
            assert ds.column_names == table.schema.names
            assert ds["row_id"] == list(range(shard["start"], shard["stop"]))
            for k in range(len(ds)):
                from_ds, from_pa, mine = ds[k], table.slice(k, 1).to_pylist()[0], reader.example(shard["start"] + k)
                assert from_ds == from_pa
                assert from_pa["input_ids"] == mine["input_ids"].tolist()
                np.testing.assert_array_equal(np.float32(from_pa["logits"]), mine["logits"])
                if split.has_hidden:
                    for j in c.layers:
                        np.testing.assert_array_equal(np.asarray(from_pa[f"hidden_{j}"], np.float16), mine["hidden"][j])


# ---------------------------------------------------------------- opening a damaged or foreign cache


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checksum_mismatch_is_caught_by_verify(small_cache: Path, tmp_path: Path) -> None:
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    shard = c / manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    shard.write_bytes(bytes(data))
    open_cache(c, check="size")  # sizes still match: only a checksum can tell
    with pytest.raises(LrcError, match="does not match its checksum") as err:
        open_cache(c, check="full")
    assert "\n" not in str(err.value) and shard.name in str(err.value)
    # A shard this small is sampled whole, so the default (quick) check at open catches it too.
    assert_refused(lambda: open_cache(c), "does not match its sampled checksum", shard.name)


def test_truncated_or_missing_shard_is_caught_without_verify(small_cache: Path, tmp_path: Path) -> None:
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    shard = c / manifest["splits"]["dev"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LrcError, match="bytes, manifest says"):
        open_cache(c)
    shard.unlink()
    with pytest.raises(LrcError, match="missing shard"):
        open_cache(c)


def test_other_format_version_is_refused(small_cache: Path, tmp_path: Path) -> None:
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    manifest["format_version"] = cache.FORMAT_VERSION + 1
    (c / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LrcError, match=f"format version {cache.FORMAT_VERSION + 1}") as err:
        open_cache(c)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)


def test_incomplete_cache_is_refused_by_a_later_stage(small_cache: Path, tmp_path: Path) -> None:
    c = _copy(small_cache, tmp_path / "c")
    (c / "manifest.json").unlink()
    assert (c / "settings.json").is_file()
    with pytest.raises(LrcError, match="incomplete") as err:
        open_cache(c)
    assert "\n" not in str(err.value) and "extract-teacher" in str(err.value)


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(LrcError, match="does not exist"):
        open_cache(tmp_path / "nowhere")
    with pytest.raises(LrcError, match="not an lrc cache"):
        open_cache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LrcError, match="not valid JSON"):
        open_cache(tmp_path)


# ---------------------------------------------------------------- a manifest is data from disk


def test_manifest_paths_outside_the_cache_are_refused(small_cache: Path, tmp_path: Path) -> None:
    """An absolute path to another cache's (identical) shard used to train silently; `..` was opened and hashed."""
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    elsewhere = shutil.copy(c / manifest["splits"]["train"]["shards"][0]["file"], tmp_path / "elsewhere.arrow")
    for bad in (str(elsewhere), "shards/../../elsewhere.arrow", "../c/shards/train-000000000-000000016.arrow",
                "shards/dev-000000000-000000016.arrow"):  # the last: another split's file
        edited = json.loads(json.dumps(manifest))
        edited["splits"]["train"]["shards"][0]["file"] = bad
        (c / "manifest.json").write_text(json.dumps(edited))
        assert_refused(lambda: open_cache(c, check="size"), repr(bad), "only shards/train-START-STOP.arrow")
    edited = json.loads(json.dumps(manifest))
    del edited["splits"]["train"]["shards"][1]  # a gap in the rows
    (c / "manifest.json").write_text(json.dumps(edited))
    assert_refused(lambda: open_cache(c, check="size"), "malformed", "row 16")


def test_a_corrupted_shard_header_is_one_line(small_cache: Path, tmp_path: Path) -> None:
    c = _copy(small_cache, tmp_path / "c")
    shard = sorted((c / "shards").glob("train-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # the schema message
    shard.write_bytes(bytes(data))
    assert_refused(lambda: open_cache(c), "does not match its sampled checksum", shard.name)
    # past a size-only check, reading it is still one line, not an ArrowInvalid traceback
    assert_refused(lambda: open_cache(c, check="size").split("train"), "not a readable Arrow stream", shard.name)


def _synthetic_cache(out: Path, rows: int, tokens: int, width: int) -> Path:
    """A cache of random hidden states written with the real writer (no teacher): one shard."""
    rng = np.random.default_rng(0)
    schema = cache.shard_schema([1], width, 2, False, "float16", True)
    ids = [rng.integers(1000, 2000, tokens).astype(np.int32) for _ in range(rows)]
    batch = cache.make_record_batch(
        schema, np.arange(rows), ids, [np.zeros(tokens, np.int8)] * rows, rng.integers(0, 2, rows),
        rng.standard_normal((rows, 2)).astype(np.float32),
        {1: rng.standard_normal((rows * tokens, width)).astype(np.float16)},
        rng.standard_normal((rows, width)).astype(np.float16))
    cache.write_shard(out, "train", 0, rows, batch)
    settings = {"splits": {"train": {"rows": rows, "hidden": True}}, "layers": [1], "hidden_size": width,
                "hidden_dtype": "float16", "max_length": tokens, "task": None,
                "teacher": {"config": {}, "weights_sha256": "", "num_layers": 1, "hidden_size": width}}
    assemble_manifest(out, settings, {})
    return out / "shards" / cache.shard_name("train", 0, rows)


def test_quick_check_samples_a_large_shard_and_full_reads_it_all(tmp_path: Path) -> None:
    from pipeline.cache.verify import resolve_check

    shard = _synthetic_cache(tmp_path / "c", rows=64, tokens=32, width=256)  # ~1 MB
    assert shard.stat().st_size > 1 << 20
    data = bytearray(shard.read_bytes())
    step = (len(data) - 2 * cache._SAMPLE_EDGE) // cache._SAMPLE_COUNT  # the spacing of the sampled blocks
    data[cache._SAMPLE_EDGE + step // 2] ^= 0x01  # between the first two sampled body blocks
    shard.write_bytes(bytes(data))
    open_cache(tmp_path / "c", check="quick")  # the quick check's blind spot, measured in docs/RELIABILITY.md
    assert_refused(lambda: open_cache(tmp_path / "c", check="full"), "does not match its checksum")
    data[100] ^= 0x01  # inside the first 64 KiB: the quick check sees it
    shard.write_bytes(bytes(data))
    assert_refused(lambda: open_cache(tmp_path / "c", check="quick"), "sampled checksum")
    # `auto` hashes every byte of a cache that fits in half the RAM, samples a larger one
    assert resolve_check("auto", 1 << 20) == "full" and resolve_check("auto", 1 << 60) == "quick"


# ---------------------------------------------------------------- every file a later stage reads is covered


def _edit_manifest(c: Path, change) -> None:
    manifest = json.loads((c / "manifest.json").read_text())
    change(manifest)
    (c / "manifest.json").write_text(json.dumps(manifest))


def test_a_hand_edited_manifest_is_caught_by_its_fingerprint(small_cache: Path, tmp_path: Path) -> None:
    """The fingerprint used to cover the settings and shard hashes but was never recomputed: a manifest whose task
    was changed from sst2 to cola opened and trained as cola."""
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    assert manifest["fingerprint"] == manifest_fingerprint(manifest) and manifest["files"]
    _edit_manifest(c, lambda m: m["task"].update(name="cola", metric="mcc"))
    assert_refused(lambda: open_cache(c, check="size"), "manifest.json does not match its fingerprint", "re-extract")
    _edit_manifest(c, lambda m: m["task"].update(name="sst2", metric="accuracy"))
    open_cache(c, check="full")  # the edit undone: the same content, the same fingerprint
    weights = f"{cache.TEACHER_WEIGHTS_DIR}/model.safetensors"
    _edit_manifest(c, lambda m: m["files"][weights].update(sha256="0" * 64))  # a checksum "fixed" by hand
    assert_refused(lambda: open_cache(c, check="size"), "does not match its fingerprint")


@pytest.mark.parametrize("where", ["tokenizer", "teacher_weights"])
def test_tokenizer_and_teacher_weights_are_checksummed(small_cache: Path, tmp_path: Path, where: str) -> None:
    """Only the shards were checked: a changed tokenizer or teacher weight trained (and was saved with the student)
    silently."""
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    name = "tokenizer.json" if where == "tokenizer" else "model.safetensors"
    path = c / where / name
    assert f"{where}/{name}" in manifest["files"]
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01  # same size, one bit in the middle: only a full hash sees it
    path.write_bytes(bytes(data))
    open_cache(c, check="size")
    assert_refused(lambda: open_cache(c, check="full"), f"{where}/{name}", "does not match its checksum")
    assert_refused(lambda: open_cache(c, check="auto"), "does not match its checksum")  # a small cache: full
    path.write_bytes(original + b" ")  # another size: every level sees it
    assert_refused(lambda: open_cache(c, check="size"), f"{where}/{name}", "bytes, manifest says")
    path.write_bytes(original)
    (c / where / "added_tokens.json").write_text('{"[NEW]": 30522}')  # a file the loaders would read too
    assert_refused(lambda: open_cache(c, check="size"), "added_tokens.json", "does not record")
    (c / where / "added_tokens.json").unlink()
    path.unlink()
    assert_refused(lambda: open_cache(c, check="size"), f"is missing {where}/{name}")


def test_a_manifest_with_missing_keys_or_wrong_types_is_one_line(small_cache: Path, tmp_path: Path) -> None:
    """A missing key or a string where a number belongs used to surface as a KeyError or TypeError traceback
    wherever a stage first read it; the fingerprint made to match, the schema check still names the key."""
    c = _copy(small_cache, tmp_path / "c")
    original = json.loads((c / "manifest.json").read_text())
    for change, needle in [(lambda m: m.pop("layers"), "no 'layers'"),
                           (lambda m: m.update(hidden_size="32"), "['hidden_size'] is a str"),
                           (lambda m: m["teacher"].pop("num_layers"), "teacher has no 'num_layers'"),
                           (lambda m: m["splits"]["train"].update(rows=True), "['rows'] is a bool"),
                           (lambda m: m["splits"]["dev"]["shards"][0].pop("sha256"), "shard 0 has no 'sha256'"),
                           (lambda m: m.update(files=[]), "['files'] is a list"),
                           (lambda m: m["files"].update({"../../etc/passwd": m["files"]["tokenizer/tokenizer.json"]}),
                            "'../../etc/passwd' as a cache file")]:
        edited = json.loads(json.dumps(original))
        change(edited)
        edited["fingerprint"] = manifest_fingerprint(edited)
        (c / "manifest.json").write_text(json.dumps(edited))
        assert_refused(lambda: open_cache(c, check="size"), needle)


def test_importance_scores_are_a_checksummed_file_like_the_others(small_cache: Path, tmp_path: Path) -> None:
    """The scores a narrower --init teacher cuts by are read by a later stage: --verify and every open check them
    like the tokenizer and weights (not only the stage that loads them)."""
    from pipeline.cache import importance

    assert cache.IMPORTANCE_FILE == importance.FILE
    c = _copy(small_cache, tmp_path / "c")
    manifest = json.loads((c / "manifest.json").read_text())
    assert manifest["files"][cache.IMPORTANCE_FILE]["sha256"] == manifest["importance"]["sha256"]
    path = c / cache.IMPORTANCE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert_refused(lambda: open_cache(c, check="full"), "importance.npz", "does not match its checksum")
