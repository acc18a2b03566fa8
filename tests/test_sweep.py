"""`lrc sweep`: grid parsing and coercion, a real two-point sweep on a cache whose teacher is gone, reuse of
finished points on a rerun, shards assembled by a rerun, a killed point resumed, and failing points."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, make_tiny_teacher
from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import SweepConfig, TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student import sweep, sweep_grid, train
from pipeline.student.sweep import run_sweep
from pipeline.student.sweep_grid import grid_points, parse_grid
from pipeline.teacher.extract import extract_teacher

LR_GRID = (("learning_rate", (1e-4, 3e-4)),)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster than two fighting
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- parse_grid


def refused(*needles: str, sets: list[str] = (), grid_file: Path | None = None) -> None:
    assert_refused(lambda: parse_grid(list(sets), grid_file), *needles)


def test_toml_file_with_set_overriding_a_key(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text('learning_rate = [5e-5, 1e-4]\nperturb-eps = [0, 1.0]\ngranularity = "token"\n'
                    'stage2_weights = ["1:1:3", "1:0:1"]\n')
    assert parse_grid([], grid) == (
        ("learning_rate", (5e-5, 1e-4)), ("perturb_eps", (0.0, 1.0)), ("granularity", ("token",)),
        ("stage2_weights", ((1.0, 1.0, 3.0), (1.0, 0.0, 1.0))),
    )
    # --set replaces the file's values for its key (in the file's position) and adds new keys at the end
    assert parse_grid(["perturb_eps=0.5", "k=2,4"], grid) == (
        ("learning_rate", (5e-5, 1e-4)), ("perturb_eps", (0.5,)), ("granularity", ("token",)),
        ("stage2_weights", ((1.0, 1.0, 3.0), (1.0, 0.0, 1.0))), ("k", (2, 4)),
    )


def test_yaml_file(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    grid = tmp_path / "grid.yaml"
    # PyYAML reads 1e-4 (no dot) as the string "1e-4": coercion to the field's type still makes it a float
    grid.write_text("lr: [1e-4, 3.0e-4]\none-stage: [true, false]\nmax_steps: [null, 50]\nlayers: 3\n")
    assert parse_grid([], grid) == (
        ("learning_rate", (1e-4, 3e-4)), ("one_stage", (True, False)), ("max_steps", (None, 50)), ("layers", (3,)),
    )
    assert type(parse_grid([], grid)[0][1][0]) is float


def test_yaml_without_pyyaml_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = tmp_path / "grid.yml"
    grid.write_text("k: [2]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    refused("pyyaml", "TOML", grid_file=grid)


def test_set_values_are_coerced_to_the_field_type() -> None:
    grid = dict(parse_grid(["batch-size=16,32", "learning_rate=1e-4", "one_stage=false,yes", "init=teacher",
                            "layer_map=none,2:4", "stage1_weights=1:0:0"], None))
    assert grid["batch_size"] == (16, 32) and all(type(v) is int for v in grid["batch_size"])
    assert grid["learning_rate"] == (1e-4,) and type(grid["learning_rate"][0]) is float
    assert grid["one_stage"] == (False, True)
    assert grid["init"] == ("teacher",)
    assert grid["layer_map"] == (None, (2, 4))
    assert grid["stage1_weights"] == ((1.0, 0.0, 0.0),)


def test_bad_grids_are_refused(tmp_path: Path) -> None:
    refused("'hiden'", "learning_rate", "perturb_eps", sets=["hiden=32"])  # names the key and lists valid ones
    refused("empty value list", sets=["learning_rate="])
    refused("cannot vary 'cache_dir'", sets=["cache-dir=/tmp/x"])
    refused("cannot vary 'output_dir'", sets=["output_dir=/tmp/x"])
    refused("cannot vary 'overwrite'", sets=["overwrite=true"])
    refused("'1.5'", "integer", sets=["layers=1.5"])
    refused("'fast'", "number", sets=["learning_rate=fast"])
    refused("3 numbers", "1:1:3", sets=["stage2_weights=1:1"])
    refused("true or false", sets=["one_stage=maybe"])
    refused("repeats", sets=["k=2,2"])
    refused("key=v1,v2", sets=["k"])
    refused("given twice", sets=["k=2", "k=4"])
    toml = tmp_path / "g.toml"
    toml.write_text("seed = []\n")
    refused("'seed'", "empty value list", grid_file=toml)
    toml.write_text("seed = [true]\n")  # a bool is no int to a user
    refused("integer", grid_file=toml)
    toml.write_text("learning_rate = [1e-4\n")
    refused("does not parse", grid_file=toml)
    refused("does not exist", grid_file=tmp_path / "missing.toml")
    refused(".toml, .yaml or .yml", grid_file=tmp_path / "grid.json")


def test_points_are_the_product_in_grid_order() -> None:
    grid = (("k", (2, 4)), ("learning_rate", (1e-4, 3e-4, 5e-4)))
    points = grid_points(grid)
    assert points == [{"k": k, "learning_rate": lr} for k in (2, 4) for lr in (1e-4, 3e-4, 5e-4)]
    assert sweep_grid.run_name(3, points[3]) == "run-003-k=4_learning_rate=0.0001"
    assert sweep.parse_shard("1/4") == (1, 4)
    with pytest.raises(LrcError, match="is not I/N"):
        sweep.parse_shard("1of4")


# --------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def orphan_cache(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> Path:
    """A real cache (tiny teacher, layers [2, 4], 64 SST-2 rows, 96 dev rows) whose teacher dir is deleted."""
    root = tmp_path_factory.mktemp("sweep-cache")
    teacher = make_tiny_teacher(root / "teacher", minilm_dir, seed=3)
    dev_lines = (glue_dir / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:97]
    (root / "dev.tsv").write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
    data = DataConfig(task="sst2", data_dir=glue_dir, dev_file=root / "dev.tsv", max_train_examples=64)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=root / "cache", student_layers=2,
                                  shard_rows=32, device="cpu"))
    build_negatives(NegativesConfig(cache_dir=root / "cache", k=2))
    shutil.rmtree(teacher)  # whatever opens the teacher from here on fails
    assert str(teacher) in json.dumps(open_cache(root / "cache").manifest)
    return root / "cache"


def base_config(cache: Path, **kwargs) -> TrainConfig:
    settings = dict(layers=2, hidden=32, heads=2, intermediate=64, k=2, max_steps=4, batch_size=16, num_workers=0,
                    device="cpu", checkpoint_every=2, eval_every=2, log_every=1)
    return TrainConfig(cache_dir=cache, output_dir=cache.parent / "unused", **{**settings, **kwargs})


class CountingTrain:
    """Wraps the real train_student, recording each config it is called with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[TrainConfig] = []
        real = train.train_student  # what train_or_reuse, the sweep's one policy, calls
        monkeypatch.setattr(train, "train_student", lambda config: self.calls.append(config) or real(config))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(orphan_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "lr"
    assert run_sweep(SweepConfig(base=base_config(orphan_cache), grid=LR_GRID, output_dir=out)) == out / "results.csv"
    return out


def test_two_point_sweep_trains_each_point_without_the_teacher(swept: Path) -> None:
    rows = read_csv(swept / "results.csv")
    assert [r["run"] for r in rows] == ["run-000-learning_rate=0.0001", "run-001-learning_rate=0.0003"]
    assert [r["learning_rate"] for r in rows] == ["0.0001", "0.0003"]
    assert [r["status"] for r in rows] == ["done", "done"]
    for row, lr in zip(rows, (1e-4, 3e-4)):
        run = swept / row["run"]
        assert json.loads((run / "train_config.json").read_text())["learning_rate"] == lr
        summary = json.loads((run / "training_summary.json").read_text())
        assert float(row["dev_accuracy"]) == summary["best"]["accuracy"]
        assert float(row["percent_of_teacher"]) == summary["percent_of_teacher"]
        assert int(row["best_step"]) == summary["best"]["step"] and summary["steps"] == 4
        assert (run / "model.safetensors").is_file()
        # the point's learning rate reached the optimizer: no warmup (floor(0.1 * 4) = 0), step 1 runs at the peak
        first = json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and first["lr"] == pytest.approx(lr, rel=1e-12)
    table = (swept / "results.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| run-")]
    assert len(body) == 2 and "| learning_rate |" in table and "dev accuracy" in table
    assert "2 done, 0 reused, 0 failed, 0 pending" in table


def test_rerun_reuses_finished_points(swept: Path, orphan_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = sorted(swept.glob("run-*/model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in weights]
    before = read_csv(swept / "results.csv")
    counter = CountingTrain(monkeypatch)
    run_sweep(SweepConfig(base=base_config(orphan_cache), grid=LR_GRID, output_dir=swept))
    assert counter.calls == []
    assert [p.stat().st_mtime_ns for p in weights] == mtimes
    after = read_csv(swept / "results.csv")
    assert [r["status"] for r in after] == ["reused", "reused"]
    assert [r["dev_accuracy"] for r in after] == [r["dev_accuracy"] for r in before]


def test_finished_point_with_other_settings_is_not_reused(swept: Path, orphan_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingTrain(monkeypatch)
    out = swept.parent / "other-seed"
    shutil.copytree(swept, out)
    with pytest.raises(LrcError, match="every point of the sweep failed"):
        run_sweep(SweepConfig(base=base_config(orphan_cache, seed=7), grid=LR_GRID, output_dir=out))
    assert counter.calls == []
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("differs in: seed (was" in r["message"] and "now 7)" in r["message"] and "--overwrite" in r["message"]
               for r in rows)

    summary_path = out / rows[0]["run"] / "training_summary.json"  # as if the cache was re-extracted since
    summary_path.write_text(json.dumps(json.loads(summary_path.read_text()) | {"cache_fingerprint": "0" * 64}))
    with pytest.raises(LrcError, match="1 of 2 points of the sweep failed"):  # any failed point fails the command
        run_sweep(SweepConfig(base=base_config(orphan_cache), grid=LR_GRID, output_dir=out))
    assert counter.calls == []
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["failed", "reused"] and "re-extracted" in rows[0]["message"]


def test_overwrite_retrains_points_that_hold_other_settings(swept: Path, orphan_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = swept.parent / "overwritten"
    shutil.copytree(swept, out)
    counter = CountingTrain(monkeypatch)
    run_sweep(SweepConfig(base=base_config(orphan_cache, seed=7, overwrite=True), grid=LR_GRID, output_dir=out))
    assert [(c.seed, c.overwrite, c.resume) for c in counter.calls] == [(7, True, False)] * 2
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["done", "done"]
    assert all(json.loads((run / "train_config.json").read_text())["seed"] == 7 for run in out.glob("run-*"))


def test_runs_copied_from_another_machine_are_reused(swept: Path, orphan_cache: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the other machine had the sweep dir and the cache at other paths: same settings, same cache fingerprint
    cache, out = tmp_path / "cache-copy", tmp_path / "merged"
    shutil.copytree(orphan_cache, cache)
    shutil.copytree(swept, out)
    counter = CountingTrain(monkeypatch)
    run_sweep(SweepConfig(base=base_config(cache), grid=LR_GRID, output_dir=out))
    assert counter.calls == []
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["reused", "reused"]


def test_shards_assemble_and_a_killed_point_resumes(swept: Path, orphan_cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out, base = tmp_path / "sharded", base_config(orphan_cache)
    counter = CountingTrain(monkeypatch)
    run_sweep(SweepConfig(base=base, grid=LR_GRID, output_dir=out, shard_index=1, shard_count=2))
    assert [c.learning_rate for c in counter.calls] == [3e-4]  # shard 1 of 2 trains point 1 only
    assert [r["run"] for r in read_csv(out / "results-shard-1-of-2.csv")] == ["run-001-learning_rate=0.0003"]
    assert not (out / "results.csv").exists()

    # shard 0 ran on "another machine": copy its run dir in; kill point 1 after its last checkpoint
    shutil.copytree(swept / "run-000-learning_rate=0.0001", out / "run-000-learning_rate=0.0001")
    (out / "run-001-learning_rate=0.0003" / "training_summary.json").unlink()
    counter.calls.clear()
    run_sweep(SweepConfig(base=base, grid=LR_GRID, output_dir=out))
    assert [(c.learning_rate, c.resume) for c in counter.calls] == [(3e-4, True)]
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["reused", "done"]
    assert rows[0]["dev_accuracy"] == read_csv(swept / "results.csv")[0]["dev_accuracy"]
    assert json.loads((out / rows[1]["run"] / "training_summary.json").read_text())["steps"] == 4


def test_failing_point_is_recorded_and_the_sweep_goes_on(orphan_cache: Path, tmp_path: Path) -> None:
    """A point that fails while training is recorded, the others train, and the command then fails (it used to
    exit 0 unless every point failed)."""
    grid = (("learning_rate", (1e30, 3e-4)),)  # point 0 diverges in its first steps: found only by training it
    out = tmp_path / "one-failed"
    with pytest.raises(LrcError, match=r"1 of 2 points of the sweep failed \(1 of 2; run-000-learning_rate=1e\+30: "):
        run_sweep(SweepConfig(base=base_config(orphan_cache, max_steps=2), grid=grid, output_dir=out))
    rows = read_csv(out / "results.csv")
    assert [(r["learning_rate"], r["status"]) for r in rows] == [("1e+30", "failed"), ("0.0003", "done")]
    assert "diverged" in rows[0]["message"] and rows[0]["dev_accuracy"] == "" and rows[1]["dev_accuracy"] != ""
    assert "failed: " in (out / "results.md").read_text()

    out = tmp_path / "all-failed"  # no point trains: the table lists each
    with pytest.raises(LrcError, match=r"every point of the sweep failed \(2 of 2; run-000-learning_rate=1e\+30: "):
        run_sweep(SweepConfig(base=base_config(orphan_cache, max_steps=2), grid=(("learning_rate", (1e30, 1e29)),),
                              output_dir=out))
    table = (out / "results.md").read_text()
    assert "0 done, 0 reused, 2 failed, 0 pending" in table and "****" not in table


def test_a_point_the_cache_cannot_serve_is_refused_before_the_first_point(orphan_cache: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache stores teacher layers [2, 4]: a layer map 1:3 used to fail only when its point's turn came, after
    the points before it had trained."""
    counter = CountingTrain(monkeypatch)
    out = tmp_path / "refused"
    assert_refused(lambda: run_sweep(SweepConfig(base=base_config(orphan_cache), grid=(("layer_map", ((2, 4), (1, 3))),),
                                                 output_dir=out)),
                   "run-001-layer_map=1-3 is refused before any point trains", "cache stores [2, 4]")
    assert counter.calls == [] and not out.exists()


def test_a_grid_with_a_bad_value_is_refused_before_the_first_point(orphan_cache: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """hidden 32 is not divisible by 3 heads: the point used to fail only when its turn came, after the points
    before it had trained; now the grid is refused whole, nothing trains and no sweep dir is written."""
    counter = CountingTrain(monkeypatch)
    out = tmp_path / "refused"
    assert_refused(lambda: run_sweep(SweepConfig(base=base_config(orphan_cache), grid=(("heads", (2, 3)),),
                                                 output_dir=out)), "heads=3", "not divisible by --heads 3")
    assert_refused(lambda: SweepConfig(base=base_config(orphan_cache), grid=(("learning_rate", (1e-4, float("nan"))),),
                                       output_dir=out), "learning_rate=nan", "--lr")
    assert counter.calls == [] and not out.exists()


def test_finished_points_on_rebuilt_negatives_are_not_reused(swept: Path, orphan_cache: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the cache's fingerprint was compared: a finished point trained on other negatives was reused as if it
    were this grid's."""
    cache, out = tmp_path / "cache", tmp_path / "sweep"
    shutil.copytree(orphan_cache, cache)
    shutil.copytree(swept, out)
    build_negatives(NegativesConfig(cache_dir=cache, k=2, seed=5, overwrite=True))  # the same cache, other candidates
    counter = CountingTrain(monkeypatch)
    with pytest.raises(LrcError, match="every point of the sweep failed"):
        run_sweep(SweepConfig(base=base_config(cache), grid=LR_GRID, output_dir=out))
    assert counter.calls == []
    rows = read_csv(out / "results.csv")
    assert all("the negatives file (rebuilt since)" in r["message"] for r in rows)
