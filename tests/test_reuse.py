"""pipeline/core/reuse.py with hand values: the diff rule and the fresh / resume / reuse / refuse decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core import reuse
from pipeline.core.errors import LrcError
from pipeline.core.reuse import MISSING, Change, decide, describe, diff


def test_equal_settings_differ_in_nothing() -> None:
    settings = {"seed": 0, "lr": 1e-4, "data": {"task": "sst2", "rows": None}, "layers": [2, 4]}
    assert diff(settings, dict(settings)) == []
    assert diff({}, {}) == []


def test_each_differing_key_with_both_values_sorted() -> None:
    recorded = {"seed": 0, "lr": 1e-4, "layers": [2, 4], "same": "x"}
    requested = {"seed": 7, "lr": 3e-4, "layers": [1, 2, 3, 4], "same": "x"}
    assert diff(recorded, requested) == [Change("layers", [2, 4], [1, 2, 3, 4]), Change("lr", 1e-4, 3e-4),
                                         Change("seed", 0, 7)]


def test_a_key_on_one_side_only_differs_and_absent_on_both_does_not() -> None:
    assert diff({"keep": "best"}, {}) == [Change("keep", "best", MISSING)]
    assert diff({}, {"keep": "last"}) == [Change("keep", MISSING, "last")]
    assert diff({"k": None}, {}) == [Change("k", None, MISSING)]  # recorded as none is not the same as unrecorded


def test_nested_settings_are_named_by_their_path() -> None:
    recorded = {"teacher": {"weights_sha256": "a" * 64, "config": {"hidden_size": 384}}, "data": {"task": "sst2"}}
    requested = {"teacher": {"weights_sha256": "b" * 64, "config": {"hidden_size": 384}}, "data": "sst2"}
    assert diff(recorded, requested) == [Change("data", {"task": "sst2"}, "sst2"),
                                         Change("teacher.weights_sha256", "a" * 64, "b" * 64)]


def test_run_only_keys_are_ignored_on_both_sides() -> None:
    recorded = {"seed": 0, "device": "cuda", "output_dir": "/a", "verify_cache": "full"}
    requested = {"seed": 0, "device": "cpu", "output_dir": "/b"}
    assert diff(recorded, requested, run_only=("device", "output_dir", "verify_cache")) == []
    assert diff(recorded, requested | {"seed": 1}, run_only=("device", "output_dir", "verify_cache")) == [
        Change("seed", 0, 1)]


def test_values_compare_as_json_gives_them_back() -> None:
    assert diff({"n": 1}, {"n": 1.0}) == []  # JSON may write 1.0 back as 1.0 or 1: equal numbers are equal
    assert diff({"w": [1, 1, 3]}, {"w": (1, 1, 3)}) == [Change("w", [1, 1, 3], (1, 1, 3))]  # callers pass JSON


def test_describe_shows_values_short_and_labels_alone() -> None:
    text = describe([Change("seed", 0, 7), Change("cache_fingerprint", "a" * 64, "b" * 64),
                     Change("keep", MISSING, "last"), Change("init", None, "x" * 100)])
    assert text == ("seed (was 0, now 7), cache_fingerprint (was aaaaaaaaaaaa, now bbbbbbbbbbbb), "
                    "keep (was unset, now last), init (was none, now " + "x" * 37 + "...)")
    labelled = describe([Change("cache_fingerprint", "a", "b")], {"cache_fingerprint": "the cache (re-extracted)"})
    assert labelled == "the cache (re-extracted)"
    many = describe([Change(f"k{i}", i, i + 1) for i in range(8)])
    assert "k4 (was 4, now 5), k5, k6, k7" in many and "\n" not in many  # every key named, values of the first five


SAME: list[Change] = []
OTHER = [Change("seed", 0, 7)]


@pytest.mark.parametrize("held, changes, overwrite, expected", [
    (reuse.EMPTY, SAME, False, reuse.FRESH),
    (reuse.EMPTY, OTHER, True, reuse.FRESH),
    (reuse.FINISHED, SAME, False, reuse.REUSE),
    (reuse.RESUMABLE, SAME, False, reuse.RESUME),
    (reuse.UNFINISHED, SAME, False, reuse.REPLACE),  # nothing to resume from: starting over loses nothing
    (reuse.FINISHED, SAME, True, reuse.REPLACE),
    (reuse.FINISHED, OTHER, True, reuse.REPLACE),
    (reuse.RESUMABLE, OTHER, True, reuse.REPLACE),
])
def test_the_decision_table(held: str, changes: list[Change], overwrite: bool, expected: str) -> None:
    assert decide(held, changes, overwrite=overwrite, where="out", what="a cache") == expected


@pytest.mark.parametrize("held", [reuse.FINISHED, reuse.RESUMABLE, reuse.UNFINISHED])
def test_other_settings_are_refused_in_one_line_naming_them_and_the_fix(held: str) -> None:
    with pytest.raises(LrcError) as err:
        decide(held, OTHER + [Change("lr", 1e-4, 3e-4)], overwrite=False, where="data/t", what="a teacher")
    assert str(err.value) == ("--output-dir data/t holds a teacher with other settings (differs in: seed (was 0, "
                              "now 7), lr (was 0.0001, now 0.0003)): pass --overwrite to replace it, or choose "
                              "another --output-dir")


def test_the_option_and_labels_reach_the_message() -> None:
    with pytest.raises(LrcError) as err:
        decide(reuse.FINISHED, [Change("cache_fingerprint", "a", "b")], overwrite=False, where="n.arrow",
               what="a negatives file", option="--output", labels={"cache_fingerprint": "the cache (rebuilt)"})
    assert "--output n.arrow holds a negatives file with other settings (differs in: the cache (rebuilt))" in str(
        err.value) and str(err.value).endswith("or choose another --output")


def test_a_stage_that_resumes_only_when_asked() -> None:
    """train-student: --resume must find a checkpoint of the same settings; without it a held dir is refused."""
    assert decide(reuse.RESUMABLE, SAME, overwrite=False, where="run", what="a run", resume=True) == reuse.RESUME
    with pytest.raises(LrcError, match=r"^--resume: run holds a run with other settings \(differs in: seed \(was 0, "
                                       r"now 7\)\): resume with the same settings, or start over with --overwrite$"):
        decide(reuse.RESUMABLE, OTHER, overwrite=False, where="run", what="a run", resume=True)
    with pytest.raises(LrcError, match="nothing to resume from"):
        decide(reuse.EMPTY, SAME, overwrite=False, where="run", what="a run", resume=True)
    assert decide(reuse.EMPTY, SAME, overwrite=False, where="run", what="a run", resume=False) == reuse.FRESH
    assert decide(reuse.FINISHED, SAME, overwrite=True, where="run", what="a run", resume=False) == reuse.REPLACE
    with pytest.raises(LrcError, match="^--output-dir run holds a run: pass --resume to continue it or --overwrite "
                                       "to start over$"):
        decide(reuse.FINISHED, SAME, overwrite=False, where="run", what="a run", resume=False)


def test_a_dir_that_appears_whole_is_reused_refused_or_replaced(tmp_path: Path) -> None:
    """finetune and export: the dir is finished or absent, its settings recorded in a JSON file inside it."""
    record = tmp_path / "teacher" / "teacher_info.json"
    assert reuse.decide_whole(False, record, {"seed": 0}, overwrite=False, what="a teacher") == (reuse.FRESH, {})
    record.parent.mkdir()
    record.write_text(json.dumps({"dev": 0.9, "settings": {"seed": 0}}))
    assert reuse.decide_whole(True, record, {"seed": 0}, overwrite=False, what="a teacher") == (
        reuse.REUSE, {"dev": 0.9, "settings": {"seed": 0}})
    with pytest.raises(LrcError, match=r"holds a teacher with other settings \(differs in: seed \(was 0, now 7\)\)"):
        reuse.decide_whole(True, record, {"seed": 7}, overwrite=False, what="a teacher")
    record.write_text("not json: --overwrite never reads it")
    assert reuse.decide_whole(True, record, {"seed": 7}, overwrite=True, what="a teacher") == (reuse.REPLACE, {})
