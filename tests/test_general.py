"""General distillation: `train-student` on a corpus cache (no task), its output as `--init DIR` for
task distillation with the encoder weights really loaded, resume, `--keep last`, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_refused, tiny_config
from pipeline.cache.reader import open_cache
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.reuse import MISSING
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student import train as train_module
from pipeline.student.general import PROJECTIONS_FILE
from pipeline.student.model import build_student, student_config
from pipeline.student.run import resolve_init, setup_run
from pipeline.student.run_dir import STATE_FILE
from pipeline.student.state_file import read_state
from pipeline.student.train import train_student


def tiny(cache: Path, out: Path, **kwargs) -> TrainConfig:
    return tiny_config(cache, out, **{"max_steps": 5, **kwargs})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_with_negatives(corpus_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("general-cache") / "corpus"
    shutil.copytree(corpus_cache, out)
    build_negatives(NegativesConfig(cache_dir=out, k=2))
    return out


@pytest.fixture(scope="module")
def task_cache(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("task-cache") / "sst2"
    shutil.copytree(tiny_cache, out)
    build_negatives(NegativesConfig(cache_dir=out, k=2))
    return out


@pytest.fixture(scope="module")
def general_student(corpus_with_negatives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("general") / "student"
    train_student(tiny(corpus_with_negatives, out, max_steps=6))
    return out


def test_general_training_saves_the_last_encoder(general_student: Path, corpus_with_negatives: Path) -> None:
    summary = json.loads((general_student / "training_summary.json").read_text())
    assert summary["kind"] == "general" and summary["kept"] == "last" and summary["best"] is None
    assert summary["steps"] == 6 and summary["teacher_dev"] is None
    steps = [r for r in read_log(general_student) if "eval" not in r]
    assert len(steps) == 6 and not any("eval" in r for r in read_log(general_student))  # no dev to evaluate on
    assert all(set(r) >= {"cos_nce", "loss"} and not {"soft", "hard"} & set(r) for r in steps)
    assert all(r["loss"] == pytest.approx(r["cos_nce"]) for r in steps)  # L_total = L_intermediate alone
    config = json.loads((general_student / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config.get("problem_type") is None
    weights = load_file(general_student / "model.safetensors")
    assert not any(k.startswith("classifier") for k in weights)  # the training head is dropped
    assert (general_student / "tokenizer.json").is_file() and (general_student / "report.md").is_file()
    # the saved encoder is the final student, not the one at its start
    state = read_state(general_student / "checkpoint" / STATE_FILE)
    assert state["state"]["step"] == 6
    key = "encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(weights[key], state["student"]["bert." + key], rtol=0, atol=0)


def test_general_student_loads_as_init(general_student: Path, task_cache: Path, tmp_path: Path) -> None:
    manifest = open_cache(task_cache).manifest
    shape = student_config(manifest["teacher"]["config"], 2, 16, 2, 32, manifest["task"])
    student = build_student(shape, str(general_student), None, [2, 4])
    weights = load_file(general_student / "model.safetensors")
    state = student.state_dict()
    encoder_keys = [k for k in weights if not k.startswith("pooler")]
    assert len(encoder_keys) > 20
    for key in encoder_keys:  # every encoder weight comes from the general student, not a fresh init
        torch.testing.assert_close(state["bert." + key], weights[key], rtol=0, atol=0, msg=key)
    assert student.classifier.out_features == 2  # a fresh head for the task
    summary = train_student(tiny(task_cache, tmp_path / "task", init=str(general_student), max_steps=2))
    assert summary["kind"] == "task" and summary["best"] is not None


def test_init_refuses_missing_encoder_weights_and_takes_the_checkpoints_width(general_student: Path,
                                                                              task_cache: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(general_student, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, broken / "model.safetensors")
    manifest = open_cache(task_cache).manifest
    shape = student_config(manifest["teacher"]["config"], 2, 16, 2, 32, manifest["task"])
    assert_refused(lambda: build_student(shape, str(broken), None, [2, 4]), "encoder weights missing",
                   "encoder.layer.1")
    wide = student_config(manifest["teacher"]["config"], 2, 32, 2, 32, manifest["task"])
    assert build_student(wide, str(general_student), None, [2, 4]).config.hidden_size == 16  # the checkpoint decides


def test_hidden_mse_general_and_perturbation_off(corpus_with_negatives: Path, tmp_path: Path) -> None:
    summary = train_student(tiny(corpus_with_negatives, tmp_path / "mse", intermediate_loss="hidden_mse",
                                 perturb_eps=0.0, max_steps=3))
    steps = [r for r in read_log(tmp_path / "mse") if "eval" not in r]
    assert summary["kind"] == "general" and [set(r) & {"hidden_mse", "cos_nce", "soft"} for r in steps] == \
        [{"hidden_mse"}] * 3


def test_refusals_between_task_and_corpus(corpus_with_negatives: Path, task_cache: Path, tmp_path: Path) -> None:
    assert_refused(lambda: train_student(tiny(corpus_with_negatives, tmp_path / "a", intermediate_loss="none", k=0)),
                   "corpus cache", "--intermediate-loss none", "cos_nce or hidden_mse")
    from pipeline.apps.evaluate import evaluate
    from pipeline.core.apps_config import EvaluateConfig
    from pipeline.core.config import DataConfig

    # a general student has no classification head: evaluating it on a task is refused, not scored at random
    general = tmp_path / "general"
    train_student(tiny(corpus_with_negatives, general, max_steps=1))
    assert_refused(lambda: evaluate(EvaluateConfig(model_dir=general, data=DataConfig(task="sst2"))),
                   "no classification head")


def test_resume_of_a_general_run(corpus_with_negatives: Path, general_student: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    step = train_module.train_step
    calls = {"n": 0}

    def dies_at_step_five(*args, **kwargs):  # a crash after the step-4 checkpoint, mid-epoch (3 batches/epoch)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train_student(tiny(corpus_with_negatives, out, max_steps=6))
    monkeypatch.setattr(train_module, "train_step", step)
    assert not (out / "training_summary.json").exists()
    train_student(tiny(corpus_with_negatives, out, max_steps=6, resume=True))
    ours, reference = load_file(out / "model.safetensors"), load_file(general_student / "model.safetensors")
    assert ours.keys() == reference.keys()
    for key in reference:  # the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-6, msg=key)
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(general_student))


def test_keep_last_on_a_task_cache(task_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "last"
    summary = train_student(tiny(task_cache, out, max_steps=6, eval_every=2, keep="last"))
    evals = [r for r in read_log(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert summary["kept"] == "last" and summary["best"]["step"] == 6
    assert summary["best"]["accuracy"] == evals[-1]["eval"]["accuracy"]  # the final student, whatever dev said
    # (this tiny student ties on dev at every evaluation, so keep=best would keep step 2)
    state = read_state(out / "checkpoint" / STATE_FILE)["student"]
    saved = load_file(out / "model.safetensors")
    torch.testing.assert_close(saved["bert.encoder.layer.1.output.dense.weight"],
                               state["bert.encoder.layer.1.output.dense.weight"], rtol=0, atol=0)
    assert_refused(lambda: TrainConfig(cache_dir=task_cache, output_dir=out, keep="first"), "--keep", "best, last")
    # runs recorded before --keep existed (no "keep" in train_config.json) still match a default config: reused
    from pipeline.student.run_dir import RUN_CONFIG, previous_run

    fingerprint = open_cache(task_cache).fingerprint

    assert json.loads((out / RUN_CONFIG).read_text())["keep"] == "last"
    best = tmp_path / "best"
    train_student(tiny(task_cache, best, max_steps=2))
    assert "keep" not in json.loads((best / RUN_CONFIG).read_text())
    # (previous_run compares a concrete --init: what `--init auto` resolves to on this cache)
    assert previous_run(resolve_init(tiny(task_cache, best, max_steps=2)), fingerprint).changed == []
    changed = previous_run(resolve_init(tiny(task_cache, best, max_steps=2, keep="last")), fingerprint).changed
    assert [(c.key, c.recorded, c.requested) for c in changed] == [("keep", MISSING, "last")]


@pytest.mark.integration
def test_demo_general_runs_the_whole_recipe_and_reuses_it(tmp_path: Path, glue_dir: Path, minilm_dir: Path) -> None:
    """`lrc demo --general` with the real MiniLM on 200 unlabeled GLUE sentences and 160 SST-2 rows, tiny students."""
    from pipeline.apps.demo import run_demo
    from pipeline.core.apps_config import DemoConfig

    config = DemoConfig(task="sst2", data_dir=glue_dir, work_dir=tmp_path / "demo", max_train_examples=160,
                        max_length=32, teacher_epochs=1, student_epochs=1, student_layers=2, student_hidden=64,
                        student_heads=4, student_intermediate=128, k=2, device="cpu", general=True,
                        general_max_passages=200, general_epochs=1)
    outcome = run_demo(config)
    assert list(outcome["stage_seconds"])[:4] == ["make-corpus", "extract-corpus", "build-negatives-corpus",
                                                  "train-general-student"]
    general, student = Path(outcome["artifacts"]["general_student"]), Path(outcome["artifacts"]["student"])
    assert len(Path(outcome["artifacts"]["corpus"]).read_text().splitlines()) == 200
    assert json.loads((general / "config.json").read_text())["architectures"] == ["BertModel"]
    assert json.loads((student / "train_config.json").read_text())["init"] == str(general)
    assert student.name == "student-sst2-general" and (config.work_dir / "demo_general_results.md").is_file()
    weights = general / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_demo(config)  # every stage reused: the general student is not retrained
    assert weights.stat().st_mtime_ns == before and again["student_summary"] == outcome["student_summary"]


def test_a_task_run_keeps_the_general_students_projections(general_student: Path, task_cache: Path,
                                                           tmp_path: Path) -> None:
    """Catches: W_i not saved with the encoder, saved but not loaded (the task run refitting a random map),
    loaded under --projection-init random, or loaded for other teacher layers than they were trained on."""
    saved = read_state(general_student / PROJECTIONS_FILE)["projections"]
    final = read_state(general_student / "checkpoint" / STATE_FILE)["projections"]
    assert saved.keys() == final.keys() and len(saved) == 2
    for key in saved:  # the W_i of the last general step
        torch.testing.assert_close(saved[key], final[key], rtol=0, atol=0)

    def start(name: str, **kwargs) -> dict[str, torch.Tensor]:
        config = tiny(task_cache, tmp_path / name, init=str(general_student), **kwargs)
        return setup_run(config).model.projections.state_dict()

    kept = start("auto")
    assert all(torch.equal(kept[key], saved[key]) for key in saved)
    for name, kwargs in {"random": dict(projection_init="random"), "other-layers": dict(layer_map=(4, 4))}.items():
        got = start(name, **kwargs)
        assert not any(torch.equal(got[key], saved[key]) for key in saved), name
