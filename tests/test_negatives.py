"""build-negatives: FAISS search vs numpy brute force, the exclusion rules, determinism, the sampler, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.negatives_file import FORMAT_VERSION, manifest_path, write_negatives
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.negatives import search
from pipeline.negatives.build import build_negatives
from pipeline.negatives.candidates import find_candidates
from pipeline.student.sampler import NegativeSampler

UNUSED = Path("unused-cache")


def clustered(n: int, d: int = 32, clusters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised vectors around a few centres (like real embeddings) and each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 3
    cluster = rng.integers(0, clusters, n)
    return (centres[cluster] + rng.standard_normal((n, d))).astype(np.float32), cluster


def config(**kw: object) -> NegativesConfig:
    return NegativesConfig(cache_dir=UNUSED, **kw)  # type: ignore[arg-type]


def naive_hard(x: np.ndarray, labels: np.ndarray | None, keys: np.ndarray, regression: bool, margin: float,
               m: int) -> list[set[int]]:
    """The top-m qualifying rows of each anchor by cosine, one anchor at a time."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        ok = keys != keys[i]
        if labels is not None:
            ok &= np.abs(labels - labels[i]) >= margin if regression else labels != labels[i]
        js = np.flatnonzero(ok)
        cos = np.array([float(np.dot(unit[i], unit[j])) for j in js])
        out.append(set(js[np.argsort(-cos, kind="stable")[:m]].tolist()))
    return out


def naive_cosines(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.array([[unit[i] @ unit[j] for j in row] for i, row in enumerate(ids)])


# --------------------------------------------------------------------------- search vs brute force


@pytest.mark.parametrize("regression", [False, True])
def test_exact_index_matches_brute_force(regression: bool) -> None:
    x, cluster = clustered(800, seed=1)
    rng = np.random.default_rng(1)
    # regression targets follow the clusters, so the nearest rows are mostly within the margin: forces widening
    labels = (cluster * 0.1 + rng.random(800) * 0.2).astype(np.float32) if regression else rng.integers(0, 3, 800)
    keys = np.arange(800)
    cfg = config(k=4, candidates=8, hard_pool=8, strategy="hard", index="flat", regression_margin=0.4)
    ids, scores, stats = find_candidates(x, labels, keys, regression, cfg)
    expected = naive_hard(x, labels, keys, regression, 0.4, 8)
    assert [set(r.tolist()) for r in ids] == expected
    np.testing.assert_allclose(scores, naive_cosines(x, ids), atol=1e-5)
    assert stats["index"] == "flat" and stats["recall_at_m"] is None


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_regression_widening_and_brute_force_fallback(index: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # targets follow the direction of the vector, so nearly all near neighbours sit inside the margin:
    # the filtered top list comes back short, is searched wider, and is finally brute-forced
    x, _ = clustered(800, seed=11)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    direction = np.random.default_rng(11).standard_normal(32)
    y = (10 * unit @ (direction / np.linalg.norm(direction))).astype(np.float32)
    brute_forced: list[int] = []
    exact_top = search._exact_top
    monkeypatch.setattr(search, "_exact_top", lambda *a: brute_forced.append(len(a[3])) or exact_top(*a))
    cfg = config(k=4, candidates=8, hard_pool=8, strategy="hard", index=index, regression_margin=4.0,
                 recall_sample=100)
    ids, _, _ = find_candidates(x, y, np.arange(800), True, cfg)
    expected = naive_hard(x, y, np.arange(800), True, 4.0, 8)
    recall = np.mean([len(set(a) & b) / 8 for a, b in zip(ids.tolist(), expected)])
    assert (np.abs(y[ids] - y[:, None]) >= 4.0).all()
    assert sum(n for n in brute_forced if n != 100) > 0  # the fallback ran (100 = the recall sample)
    assert recall == 1.0 if index == "flat" else recall >= 0.95


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_index_recall_floor(index: str) -> None:
    x, _ = clustered(4000, d=48, clusters=40, seed=2)
    labels = np.random.default_rng(2).integers(0, 2, 4000)
    keys = np.arange(4000)
    cfg = config(k=4, candidates=16, hard_pool=16, strategy="hard", index=index, recall_sample=400)
    ids, _, stats = find_candidates(x, labels, keys, False, cfg)
    sample = np.arange(0, 4000, 10)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    hits = []
    for i in sample:  # exact top-16 of the other label, by brute force
        js = np.flatnonzero(labels != labels[i])
        truth = set(js[np.argsort(-(unit[js] @ unit[i]))[:16]].tolist())
        hits.append(len(truth & set(ids[i].tolist())) / 16)
    floor = 0.95  # the target; both indexes measure >= 0.99 on this data
    assert np.mean(hits) >= floor, np.mean(hits)
    assert stats["index"] == index and stats["recall_queries"] == 400
    assert stats["recall_at_m"] >= floor and abs(stats["recall_at_m"] - np.mean(hits)) < 0.03


def test_low_recall_widens_the_search() -> None:
    # unclustered data: IVF's default 8 probed lists find ~75% of the true neighbours, so it must probe more
    x = np.random.default_rng(10).standard_normal((3000, 16)).astype(np.float32)
    ids, _, stats = find_candidates(x, None, np.arange(3000), False,
                                    config(strategy="hard", hard_pool=16, index="ivf", recall_sample=300))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram = unit @ unit.T
    np.fill_diagonal(gram, -np.inf)
    truth = np.argsort(-gram, axis=1)[:, :16]
    recall = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(ids.tolist(), truth.tolist())])
    assert stats["search_effort"] > 1 and stats["recall_at_m"] >= 0.95
    assert recall >= 0.95 and abs(recall - stats["recall_at_m"]) < 0.02  # the sample's recall is the run's


def test_auto_picks_exact_then_approximate() -> None:
    x, _ = clustered(300, seed=3)
    keys = np.arange(300)
    _, _, small = find_candidates(x, None, keys, False, config(strategy="hard", exact_max_rows=300))
    _, _, large = find_candidates(x, None, keys, False, config(strategy="hard", exact_max_rows=299, recall_sample=50))
    assert small["index"] == "flat" and small["recall_at_m"] is None
    assert large["index"] == "ivf" and 0.95 <= large["recall_at_m"] <= 1.0


# --------------------------------------------------------------------------- exclusion rules


def test_exclusions_hold_for_every_strategy() -> None:
    n = 600
    x, _ = clustered(n, seed=4)
    labels = np.random.default_rng(4).integers(0, 2, n)
    keys = np.arange(n)
    # rows 0-9 duplicate rows 10-19: identical input and vector, half of them with the other label
    x[:10], keys[:10] = x[10:20], keys[10:20]
    labels[:5] = 1 - labels[10:15]
    for strategy in ("random", "hard", "mixed"):
        ids, scores, _ = find_candidates(x, labels, keys, False, config(k=4, strategy=strategy, index="flat"))
        assert ids.shape == (n, 16) and ids.dtype == np.int64 and scores.dtype == np.float32
        assert not (ids == np.arange(n)[:, None]).any(), strategy  # never the row itself
        assert not (keys[ids] == keys[:, None]).any(), strategy  # never an exact duplicate input
        assert all(len(set(r)) == 16 for r in ids.tolist()), strategy  # no repeats in a row
        np.testing.assert_allclose(scores, naive_cosines(x, ids), atol=1e-5)
        hard_cols = {"random": 0, "hard": 16, "mixed": 8}[strategy]
        assert not (labels[ids[:, :hard_cols]] == labels[:, None]).any(), strategy  # hard: never the same label


def test_random_is_uniform_over_other_rows() -> None:
    n = 400
    x, _ = clustered(n, seed=5)
    labels = np.random.default_rng(5).integers(0, 2, n)
    ids, _, stats = find_candidates(x, labels, np.arange(n), False, config(k=4, candidates=40))
    uses = np.bincount(ids.ravel(), minlength=n)  # each row drawn ~ Binomial(n-1, 40/(n-1)): mean 40, sd ~6
    assert abs(uses.mean() - 40) < 1e-9 and uses.std() < 9 and stats["max_uses"] == uses.max()
    same = (labels[ids] == labels[:, None]).mean()  # random ignores labels: about half the draws share one
    assert 0.45 < same < 0.55
    assert stats["index"] is None


def test_regression_margin_respected() -> None:
    n = 500
    x, _ = clustered(n, seed=6)
    y = np.random.default_rng(6).random(n).astype(np.float32) * 5
    for strategy, cols in (("hard", 16), ("mixed", 8)):
        ids, _, _ = find_candidates(x, y, np.arange(n), True, config(strategy=strategy, regression_margin=1.0))
        assert (np.abs(y[ids[:, :cols]] - y[:, None]) >= 1.0).all()


def test_pool_spreads_hard_negatives() -> None:
    # hubs: one member of each cluster sits at the cluster's mean, so it is in its whole cluster's top 16
    x, cluster = clustered(1000, seed=7)
    hubs = np.array([np.flatnonzero(cluster == c)[0] for c in range(20)])
    for c, h in enumerate(hubs):
        x[h] = x[cluster == c].mean(0)
    top, _, _ = find_candidates(x, None, np.arange(1000), False, config(strategy="hard", hard_pool=16))
    ids, _, stats = find_candidates(x, None, np.arange(1000), False, config(strategy="hard"))
    top_uses, uses = np.bincount(top.ravel(), minlength=1000), np.bincount(ids.ravel(), minlength=1000)
    np.testing.assert_array_equal(top_uses[hubs], np.bincount(cluster)[:20] - 1)
    assert stats["hard_pool"] == 64 and uses[hubs].sum() < 0.5 * top_uses[hubs].sum()
    assert stats["max_uses_top"] == top_uses.max() and stats["max_uses"] == uses.max() < top_uses.max()


# --------------------------------------------------------------------------- determinism and errors


@pytest.mark.parametrize("strategy,index", [("random", "flat"), ("hard", "hnsw"), ("mixed", "ivf")])
def test_deterministic_per_seed(strategy: str, index: str) -> None:
    x, _ = clustered(1500, seed=8)
    labels = np.random.default_rng(8).integers(0, 3, 1500)
    cfgs = [config(strategy=strategy, index=index, seed=s, recall_sample=200) for s in (0, 0, 1)]
    run = [find_candidates(x, labels, np.arange(1500), False, cfg) for cfg in cfgs]
    np.testing.assert_array_equal(run[0][0], run[1][0])
    np.testing.assert_array_equal(run[0][1], run[1][1])
    assert (run[0][0] != run[2][0]).mean() > 0.5


def test_too_few_qualifying_rows() -> None:
    x, _ = clustered(100, seed=9)
    labels = np.zeros(100, np.int64)
    labels[:5] = 1  # label 0 holds 95 rows: a label-0 anchor has only 5 other-label rows
    with pytest.raises(LrcError, match=r"label 0 holds 95 of 100 rows.*random or mixed"):
        find_candidates(x, labels, np.arange(100), False, config(k=4, strategy="hard"))
    with pytest.raises(LrcError, match="random or mixed"):  # mixed needs only 8 hard ones, still > 5
        find_candidates(x, labels, np.arange(100), False, config(k=4, strategy="mixed"))
    ids, _, _ = find_candidates(x, labels, np.arange(100), False, config(k=2, candidates=4, strategy="hard"))
    assert (labels[ids] != labels[:, None]).all()
    with pytest.raises(LrcError, match="other distinct inputs"):  # 20 candidates among 10 inputs
        find_candidates(x[:10], None, np.arange(10), False, config(k=4, candidates=20))
    with pytest.raises(LrcError, match="regression-margin"):
        y = np.linspace(0, 1, 100).astype(np.float32)
        find_candidates(x, y, np.arange(100), True, config(strategy="hard", regression_margin=0.9))
    with pytest.raises(LrcError, match="unknown --strategy"):
        config(strategy="closest")
    with pytest.raises(LrcError, match="unknown --index"):
        config(index="ann")


# --------------------------------------------------------------------------- sampler


def write_file(path: Path, n: int = 50, m: int = 8, fingerprint: str = "abc123") -> np.ndarray:
    ids = (np.arange(n)[:, None] + np.arange(1, m + 1)[None, :]) % n  # row i's candidates: i+1 .. i+m
    meta = {"format": "lrc-negatives", "format_version": FORMAT_VERSION, "cache_fingerprint": fingerprint, "candidates": m}
    write_negatives(path, ids, np.zeros((n, m), np.float32), meta)
    return ids


def test_sampler_draws_from_candidates_per_epoch(tmp_path: Path) -> None:
    ids = write_file(tmp_path / "negatives.arrow")
    sampler = NegativeSampler(tmp_path / "negatives.arrow", k=3, seed=0, expected_fingerprint="abc123")
    rows = np.arange(50)
    draws = [sampler.sample(rows, epoch) for epoch in range(40)]
    for d in draws:
        assert d.shape == (50, 3) and d.dtype == np.int64
        assert all(set(r) <= set(c) and len(set(r)) == 3 for r, c in zip(d.tolist(), ids.tolist()))
    assert (draws[0] != draws[1]).any(axis=1).mean() > 0.7  # most rows get new negatives next epoch
    freq = np.stack([(d[:, :, None] == ids[:, None, :]).any(1) for d in draws]).mean((0, 1))
    np.testing.assert_allclose(freq, 3 / 8, atol=0.05)  # each candidate drawn ~K/M of the time
    again = NegativeSampler(tmp_path / "negatives.arrow", k=3, seed=0)
    np.testing.assert_array_equal(again.sample(rows, 5), draws[5])
    other_seed = NegativeSampler(tmp_path / "negatives.arrow", k=3, seed=1)
    assert (other_seed.sample(rows, 5) != draws[5]).any()


def test_sampler_ignores_batch_composition(tmp_path: Path) -> None:
    write_file(tmp_path / "negatives.arrow")
    sampler = NegativeSampler(tmp_path / "negatives.arrow", k=4, seed=7)
    full = sampler.sample(np.arange(50), epoch=3)
    perm = np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(sampler.sample(perm, epoch=3), full[perm])  # shuffled batch
    np.testing.assert_array_equal(sampler.sample(np.array([17]), epoch=3), full[[17]])  # alone
    sampler.sample(np.arange(10), epoch=9)  # call order must not matter either
    np.testing.assert_array_equal(sampler.sample(np.array([17, 3]), epoch=3), full[[17, 3]])


def test_sampler_refusals(tmp_path: Path) -> None:
    path = tmp_path / "negatives.arrow"
    with pytest.raises(LrcError, match="does not exist"):
        NegativeSampler(path, k=2, seed=0)
    path.write_bytes(b"not arrow at all")
    with pytest.raises(LrcError, match="not an lrc negatives file"):
        NegativeSampler(path, k=2, seed=0)
    write_file(path, fingerprint="abc123")
    with pytest.raises(LrcError, match="another cache"):
        NegativeSampler(path, k=2, seed=0, expected_fingerprint="def456")
    with pytest.raises(LrcError, match="lower --k"):
        NegativeSampler(path, k=9, seed=0)
    with pytest.raises(LrcError, match="outside the 50 rows"):
        NegativeSampler(path, k=2, seed=0).sample(np.array([50]), epoch=0)


def test_failed_write_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "negatives.arrow"
    old = write_file(path)
    meta = {"format": "lrc-negatives", "format_version": FORMAT_VERSION, "cache_fingerprint": "x", "candidates": 8}
    with pytest.raises(Exception):  # scores of the wrong width fail inside the writer
        write_negatives(path, np.zeros((50, 8), np.int64), np.zeros((50, 7), np.float32), meta)
    np.testing.assert_array_equal(NegativeSampler(path, k=8, seed=0).candidates, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["negatives.arrow"]


# --------------------------------------------------------------------------- end to end on a real cache


def test_build_negatives_on_tiny_cache(tiny_cache: Path, tmp_path: Path) -> None:
    from pipeline.cache.reader import open_cache

    cache = open_cache(tiny_cache)
    train = cache.split("train")
    labels, keys, n = train.labels(), train.input_keys(), train.num_rows
    out = tmp_path / "neg" / "negatives.arrow"
    path = build_negatives(NegativesConfig(cache_dir=tiny_cache, k=4, strategy="hard", output=out, seed=3))
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["cache_fingerprint"] == cache.fingerprint and manifest["strategy"] == "hard"
    assert (manifest["k"], manifest["candidates"], manifest["index"], manifest["rows"]) == (4, 16, "flat", n)
    assert manifest["max_uses"] >= 16 and manifest["seconds"] > 0
    sampler = NegativeSampler(path, k=4, seed=0, expected_fingerprint=cache.fingerprint)
    ids = sampler.candidates
    assert ids.shape == (n, 16)
    assert not (labels[ids] == labels[:, None]).any() and not (keys[ids] == keys[:, None]).any()
    np.testing.assert_allclose(sampler.scores, naive_cosines(train.pooled(), ids), atol=1e-4)
    batch = sampler.sample(np.arange(n), epoch=0)
    assert (batch[:, :, None] == ids[:, None, :]).any(2).all()
    with pytest.raises(LrcError, match="another cache"):
        NegativeSampler(path, k=4, seed=0, expected_fingerprint="0" * 64)
    again = build_negatives(NegativesConfig(cache_dir=tiny_cache, k=4, strategy="hard", output=out, seed=3))
    np.testing.assert_array_equal(NegativeSampler(again, k=4, seed=0).candidates, ids)


def test_build_negatives_refuses_bad_caches(tiny_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(LrcError, match="does not exist"):
        build_negatives(NegativesConfig(cache_dir=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrcError, match="not an lrc cache"):
        build_negatives(NegativesConfig(cache_dir=tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_cache, broken)
    shard = sorted((broken / "shards").glob("train-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(LrcError, match="checksum"):
        build_negatives(NegativesConfig(cache_dir=broken))
    assert not (broken / "negatives.arrow").exists() and not (broken / "negatives.json").exists()


def test_edited_negatives_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "negatives.arrow"
    ids = write_file(path)
    # a byte changed inside the candidates: the content hash in the file no longer matches
    data = bytearray(path.read_bytes())
    where = data.find(ids[45, 3:5].astype(np.int64).tobytes())  # (49, 0): in no other column
    assert where > 0
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LrcError, match="does not match its checksum"):
        NegativeSampler(path, k=2, seed=0)
    # well-formed files (valid hash) that break what the builder guarantees
    meta = {"format": "lrc-negatives", "format_version": FORMAT_VERSION, "cache_fingerprint": "f", "candidates": 8}
    for change, needle in (((10, 3, 10), "row 10 is its own negative"), ((4, 0, 50), "row 4 has candidate 50, outside"),
                           ((7, 1, -1), "row 7 has candidate -1"), ((2, 5, None), "row 2 lists a candidate twice")):
        edited = ids.copy()
        row, col, value = change
        edited[row, col] = edited[row, 0] if value is None else value
        write_negatives(path, edited, np.zeros((50, 8), np.float32), meta)
        with pytest.raises(LrcError, match=needle):
            NegativeSampler(path, k=2, seed=0)


def test_build_negatives_never_replaces_a_file_it_did_not_write(tiny_cache: Path, tmp_path: Path) -> None:
    """--output cache/manifest.arrow used to overwrite cache/manifest.json, the cache's own manifest."""
    c = tmp_path / "c"
    shutil.copytree(tiny_cache, c)
    manifest = (c / "manifest.json").read_bytes()
    for output, needle in ((c / "manifest.arrow", "would replace"), (c / "manifest.json", "ends in .json"),
                           (c / "settings.arrow", "would replace"), (c / "shards", "is a directory"),
                           (next((c / "shards").glob("train-*.arrow")), "not a negatives file")):
        with pytest.raises(LrcError, match=needle):
            build_negatives(NegativesConfig(cache_dir=c, k=2, output=output))
    assert (c / "manifest.json").read_bytes() == manifest
    from pipeline.cache.reader import open_cache

    open_cache(c, check="full")
    # its own earlier output (file and .json) is replaced with --overwrite
    out = build_negatives(NegativesConfig(cache_dir=c, k=2, output=tmp_path / "n.arrow"))
    assert build_negatives(NegativesConfig(cache_dir=c, k=2, seed=1, output=out, overwrite=True)) == out


def test_rebuilding_negatives_reuses_the_same_settings_and_refuses_others(tiny_cache: Path, tmp_path: Path) -> None:
    """The rule every stage follows (pipeline/core/reuse.py): the same settings on the same cache reuse the file, other
    settings are refused in one line naming them and the fix, and --overwrite rebuilds it."""
    out = tmp_path / "n.arrow"
    build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, output=out))
    stamp, meta = out.stat().st_mtime_ns, manifest_path(out).read_bytes()
    assert build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, output=out)) == out
    assert out.stat().st_mtime_ns == stamp and manifest_path(out).read_bytes() == meta  # reused, not rebuilt
    with pytest.raises(LrcError, match="other settings") as err:
        build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, strategy="hard", output=out))
    message = str(err.value)
    assert "\n" not in message and "strategy (was random, now hard)" in message
    assert "--overwrite" in message and "--output" in message
    assert out.stat().st_mtime_ns == stamp and manifest_path(out).read_bytes() == meta  # refused: untouched
    build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, strategy="hard", output=out, overwrite=True))
    assert json.loads(manifest_path(out).read_text())["settings"]["strategy"] == "hard"
    # a file from an lrc that recorded no settings is rebuilt, as it always was
    recorded = json.loads(manifest_path(out).read_text())
    del recorded["settings"]
    manifest_path(out).write_text(json.dumps(recorded))
    build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, output=out))
    assert json.loads(manifest_path(out).read_text())["settings"]["strategy"] == "random"
    # and so is one damaged since (training would refuse it): never reused
    ids = NegativeSampler(out, k=2, seed=0).candidates
    data = bytearray(out.read_bytes())
    data[data.find(ids[-1, -2:].astype(np.int64).tobytes())] ^= 0x01  # a candidate id: the checksum no longer matches
    out.write_bytes(bytes(data))
    with pytest.raises(LrcError, match="checksum"):
        NegativeSampler(out, k=2, seed=0)
    build_negatives(NegativesConfig(cache_dir=tiny_cache, k=2, output=out))
    np.testing.assert_array_equal(NegativeSampler(out, k=2, seed=0).candidates, ids)
