"""`lrc export`: every family round-trips to ONNX (logits equal PyTorch's within FP32_TOL on real SST-2 dev
sentences of different lengths), int8 stays within INT8_TOL and keeps the label of almost every sentence, the
exported dir loads like a Hugging Face model dir and is evaluated by `lrc evaluate`, and bad sources and
outputs are refused in one line with nothing half-written left behind."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from conftest import assert_refused, sst2_lines
from pipeline.core import outdir
from pipeline.core.apps_config import ExportConfig
from pipeline.core.families import FAMILIES, reads_segments
from pipeline.core.runtime import encode, predict_logits

pytest.importorskip("onnxruntime", reason='pip install "lrc[onnx]"')
from pipeline.apps.export import export_model  # noqa: E402
from pipeline.apps.onnx_model import MODEL_FILE, OnnxClassifier  # noqa: E402

# Float32 export: the same arithmetic in another order; observed differences are ~1e-6 on these models.
FP32_TOL = 1e-4
# Int8 weights of every MatMul/Gemm with per-batch int8 activations: a few percent of the logit scale.
INT8_TOL = 0.05
CPU = torch.device("cpu")

_SHAPE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
# One tiny random classifier per family with the real bert-base-uncased vocabulary; RoBERTa and MPNet pad
# with id 1 and count positions after it, DeBERTa-v2 uses v3's relative positions and no segment embeddings
# (as tests/test_families.py builds them).
CONFIGS: dict[str, dict] = {
    "bert": _SHAPE,
    "roberta": {**_SHAPE, "pad_token_id": 1, "max_position_embeddings": 130, "type_vocab_size": 1},
    "deberta-v2": {**_SHAPE, "type_vocab_size": 0, "relative_attention": True, "position_biased_input": False,
                   "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1, "position_buckets": 16,
                   "norm_rel_ebd": "layer_norm", "share_att_key": True},
    "electra": {**_SHAPE, "embedding_size": 32},
    "mpnet": {**_SHAPE, "pad_token_id": 1, "max_position_embeddings": 130},
    "distilbert": dict(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128),
}


def make_student(path: Path, family: str, tokenizer_dir: Path, seed: int = 0, extra: dict | None = None) -> Path:
    """A student dir as train-student leaves it (model, tokenizer, the task it records, the run marker)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **CONFIGS.get(family, {}), **(extra or {}), num_labels=2,
                                  id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    options = {}
    if family in FAMILIES and not FAMILIES[family].segments:
        options["model_input_names"] = ["input_ids", "attention_mask"]
    if CONFIGS.get(family, {}).get("pad_token_id") == 1:
        options["pad_token"] = "[unused0]"  # id 1, the model's padding_idx
    AutoTokenizer.from_pretrained(tokenizer_dir, **options).save_pretrained(path)
    (path / "train_config.json").write_text("{}\n")
    (path / "training_summary.json").write_text(json.dumps({"task": "sst2"}) + "\n")
    outdir.mark(path, "run")
    return path


def dev_logits(model_dir: Path, model: object, sentences: list[str]) -> np.ndarray:
    """Logits of `model` on real sentences, length-sorted batches of 16 with padding (the evaluate path)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, types = encode(tokenizer, sentences, None, 64)
    config = AutoConfig.from_pretrained(model_dir)
    return predict_logits(model, ids, types, 16, CPU, "fp32", tokenizer.pad_token_id or 0, reads_segments(config))


@pytest.fixture(scope="module")
def sentences(glue_dir: Path) -> list[str]:
    return [line.split("\t")[0] for line in sst2_lines(glue_dir, "dev", 0, 64)]


@pytest.mark.parametrize("family", [name for name, row in FAMILIES.items() if row.onnx])
def test_every_exportable_family_round_trips_within_fp32_tolerance(family: str, tmp_path: Path, minilm_dir: Path,
                                                                   sentences: list[str]) -> None:
    student = make_student(tmp_path / "student", family, minilm_dir)
    out = tmp_path / "export"
    info = export_model(ExportConfig(source=student, output_dir=out))

    torch_model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    expected = dev_logits(student, torch_model, sentences)
    got = dev_logits(out, OnnxClassifier(out / MODEL_FILE, AutoConfig.from_pretrained(out)), sentences)
    assert np.abs(expected - got).max() <= FP32_TOL
    # The dir reads like a Hugging Face model dir, and says what it holds.
    assert AutoConfig.from_pretrained(out).id2label == {0: "negative", 1: "positive"}
    assert AutoTokenizer.from_pretrained(out)("a fine film")["input_ids"][:1] == [101]
    assert info["opset"] == 17 and info["quantize"] == "none" and info["family"] == family and info["task"] == "sst2"
    assert info["parameters"] == sum(p.numel() for p in torch_model.parameters())
    assert info["max_abs_logit_diff"] <= FP32_TOL and len(info["source_fingerprint"]) == 64
    assert json.loads((out / outdir.MARKER).read_text())["kind"] == "export"
    assert not (tmp_path / ".export.tmp").exists()


def test_int8_stays_close_and_keeps_the_label_of_almost_every_sentence(tmp_path: Path, minilm_dir: Path,
                                                                       sentences: list[str]) -> None:
    student = make_student(tmp_path / "student", "bert", minilm_dir, seed=3)
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    export_model(ExportConfig(source=student, output_dir=fp32))
    info = export_model(ExportConfig(source=student, output_dir=int8, quantize="int8"))

    assert info["quantize"] == "int8" and info["ops_quantized"] == ["MatMul", "Gemm"]
    assert sum(info["quantized_nodes"].values()) >= 2 * 6  # Q, K, V, output, two FFN weights per layer
    assert info["model_bytes"] < (fp32 / MODEL_FILE).stat().st_size
    config = AutoConfig.from_pretrained(int8)
    reference = dev_logits(fp32, OnnxClassifier(fp32 / MODEL_FILE, config), sentences)
    quantized = dev_logits(int8, OnnxClassifier(int8 / MODEL_FILE, config), sentences)
    scale = np.abs(reference).max()
    assert np.abs(reference - quantized).max() <= INT8_TOL * scale
    agree = (reference.argmax(1) == quantized.argmax(1)).mean()
    assert agree >= 0.9, agree
    # The embeddings as int8 too: a smaller file, logits within the same bound.
    gather = export_model(ExportConfig(source=student, output_dir=tmp_path / "gather", quantize="int8",
                                       quantize_ops=("MatMul", "Gemm", "Gather")))
    assert gather["model_bytes"] < 0.5 * info["model_bytes"]
    embedded = dev_logits(int8, OnnxClassifier(tmp_path / "gather" / MODEL_FILE, config), sentences)
    assert np.abs(reference - embedded).max() <= INT8_TOL * scale
    assert_refused(lambda: ExportConfig(source=student, output_dir=tmp_path / "x", quantize_ops=("Conv",)),
                   "--quantize-ops must be some of")


def test_refusals_leave_nothing_behind(tmp_path: Path, minilm_dir: Path) -> None:
    student = make_student(tmp_path / "student", "bert", minilm_dir)
    out = tmp_path / "out"
    config = ExportConfig(source=student, output_dir=out)

    plain = tmp_path / "plain"  # a Hugging Face model dir no lrc stage wrote
    AutoModelForSequenceClassification.from_pretrained(student).save_pretrained(plain)
    assert_refused(lambda: export_model(replace(config, source=plain)), "not a dir lrc wrote", "train-student")
    assert_refused(lambda: export_model(replace(config, source=tmp_path / "missing")), "does not exist")
    albert = make_student(tmp_path / "albert", "albert", minilm_dir,
                          extra=dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, embedding_size=16))
    assert_refused(lambda: export_model(replace(config, source=albert)), "'albert'", "cannot be exported", "bert")
    general = tmp_path / "general"  # a general student: an encoder with no classification head
    general.mkdir()
    AutoConfig.for_model("bert", **_SHAPE).save_pretrained(general)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(general)
    outdir.mark(general, "run")
    assert_refused(lambda: export_model(replace(config, source=general)), "no classification head")

    mine = tmp_path / "mine"  # an output dir holding a user's files, or another lrc artifact
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_refused(lambda: export_model(replace(config, output_dir=mine)), "holds no lrc model export")
    assert_refused(lambda: export_model(replace(config, output_dir=student)), "overlap")
    assert_refused(lambda: export_model(replace(config, output_dir=student / "onnx")), "overlap")
    cache = tmp_path / "cache"
    outdir.mark(cache, "cache")
    (cache / "settings.json").write_text("{}")
    assert_refused(lambda: export_model(replace(config, output_dir=cache)), "holds an lrc cache")
    assert (mine / "notes.txt").read_text() == "keep me" and (cache / "settings.json").is_file()
    # A graph that does not reproduce PyTorch's logits is never kept (here: an impossible tolerance).
    assert_refused(lambda: export_model(replace(config, tolerance=1e-30)), "gives logits up to")
    assert not out.exists() and not (tmp_path / ".out.tmp").exists()


def test_rerun_reuses_other_settings_need_overwrite(tmp_path: Path, minilm_dir: Path) -> None:
    student = make_student(tmp_path / "student", "bert", minilm_dir)
    config = ExportConfig(source=student, output_dir=tmp_path / "out")
    first = export_model(config)
    assert export_model(config) == first  # same source and settings: reused
    assert_refused(lambda: export_model(replace(config, quantize="int8")), "other settings", "--overwrite")
    assert export_model(replace(config, quantize="int8", overwrite=True))["quantize"] == "int8"


def test_cli_export_then_evaluate_the_exported_dir_against_its_source(tmp_path: Path, minilm_dir: Path,
                                                                      glue_dir: Path) -> None:
    from cli import app

    runner = CliRunner()
    student = make_student(tmp_path / "student", "bert", minilm_dir)
    out = tmp_path / "student-int8"
    result = runner.invoke(app, ["export", str(student), "-o", str(out), "--format", "onnx", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "export:" in result.stdout and (out / MODEL_FILE).is_file()

    results_file = tmp_path / "results.json"
    result = runner.invoke(app, ["evaluate", str(out), "--task", "sst2", "--compare", str(student), "--data-dir",
                                 str(glue_dir), "--seq-length", "16", "--timing-batches", "2", "--batch-size", "8",
                                 "--device", "cpu", "--output", str(results_file)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stdout and "latency b1" in result.stdout
    results = json.loads(results_file.read_text())
    model, source = results["model"], results["compare"]
    assert model["runtime"] == "onnxruntime" and source["runtime"] == "pytorch"
    assert set(model["latency_ms_by_batch"]) == {"1", "8"} and results["ratios"]["speedup_by_batch"].keys() == {"1", "8"}
    assert model["parameters"] == source["parameters"] and model["examples"] == 872
    assert abs(model["metrics"]["accuracy"] - source["metrics"]["accuracy"]) <= 0.05

    # Evaluate keeps its checks on an exported dir: the recorded task, and its own output file only.
    result = runner.invoke(app, ["evaluate", str(out), "--task", "cola", "--data-dir", str(glue_dir)])
    assert result.exit_code == 1 and "was trained on sst2" in result.stderr
    for output, message in ((out / "results.json", "inside the model dir"),
                            (student / "config.json", "not written by lrc evaluate")):
        result = runner.invoke(app, ["evaluate", str(out), "--task", "sst2", "--data-dir", str(glue_dir), "--output",
                                     str(output)])
        assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_without_the_onnx_extra_both_commands_say_what_to_install(tmp_path: Path, minilm_dir: Path, glue_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.apps.evaluate import evaluate
    from pipeline.core.apps_config import EvaluateConfig
    from pipeline.core.config import DataConfig

    student = make_student(tmp_path / "student", "bert", minilm_dir)
    export_model(ExportConfig(source=student, output_dir=tmp_path / "out"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert_refused(lambda: export_model(ExportConfig(source=student, output_dir=tmp_path / "again")),
                   'pip install "lrc[onnx]"')
    assert_refused(lambda: evaluate(EvaluateConfig(model_dir=tmp_path / "out", data=DataConfig(task="sst2",
                                                   data_dir=glue_dir), device="cpu")), 'pip install "lrc[onnx]"')
    assert not (tmp_path / "again").exists()
