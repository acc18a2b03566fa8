"""Every supported encoder family as teacher and student: a tiny random backbone of each family
goes finetune-teacher -> extract -> negatives -> train-student (--init random, teacher, DIR), the student
reloads with AutoModelForSequenceClassification and runs in `pipeline()`; teacher-initialisation copies
the right modules; the gradient perturbation follows docs/DESIGN.md §2 for each family, dropout on and off."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (
    AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline,
)

from conftest import assert_refused, sst2_lines, write_tsv, tiny_config
from pipeline.apps.evaluate import evaluate
from pipeline.core.apps_config import EvaluateConfig
from pipeline.core.config import DataConfig, layer_map
from pipeline.core.families import FAMILIES, check_loading_report, get_module, model_inputs
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import ExtractConfig, FinetuneConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student import losses
from pipeline.student.batches import CacheDataset, collate
from pipeline.student.model import Projections, build_student, student_config
from pipeline.student.objective import Objective, objective_for
from pipeline.student.sampler import NegativeSampler
from pipeline.student.step import Model, train_step
from pipeline.student.train import train_student
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.finetune import finetune_teacher

CPU = torch.device("cpu")
_SHAPE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
# A tiny random backbone per family, 4 layers x 32, with the real bert-base-uncased vocabulary. RoBERTa and
# MPNet pad with id 1 and count positions after it, as their real checkpoints do; DeBERTa-v2 uses v3's
# relative-position scheme and no segment embeddings.
BACKBONES: dict[str, dict] = {
    "bert": _SHAPE,
    "roberta": {**_SHAPE, "pad_token_id": 1, "max_position_embeddings": 130, "type_vocab_size": 1},
    "deberta-v2": {**_SHAPE, "type_vocab_size": 0, "relative_attention": True, "position_biased_input": False,
                   "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1, "position_buckets": 16,
                   "norm_rel_ebd": "layer_norm", "share_att_key": True},
    "electra": {**_SHAPE, "embedding_size": 32},
    "mpnet": {**_SHAPE, "pad_token_id": 1, "max_position_embeddings": 130},
    "distilbert": dict(vocab_size=30522, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=128),
}
NAMES = list(BACKBONES)


@dataclass(frozen=True)
class FamilyRun:
    name: str
    data: DataConfig
    teacher: Path
    cache: Path
    dir_init: Path  # a 3 x 24 base encoder of the family (saved with AutoModel), as a general-distilled student


def _backbone(path: Path, name: str, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(name, **BACKBONES[name])).save_pretrained(path)
    extra = {}
    if not FAMILIES[name].segments:  # what extract and finetune read to decide whether to pass token_type_ids
        extra["model_input_names"] = ["input_ids", "attention_mask"]
    if BACKBONES[name].get("pad_token_id") == 1:
        extra["pad_token"] = "[unused0]"  # id 1, the model's padding_idx
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **extra)
    assert tokenizer.pad_token_id == BACKBONES[name].get("pad_token_id", 0)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> Callable[[str], FamilyRun]:
    """finetune-teacher -> extract (all 4 layers) -> negatives for one family, made once per module on demand."""
    made: dict[str, FamilyRun] = {}
    root = tmp_path_factory.mktemp("families")
    train = write_tsv(root / "train.tsv", sst2_lines(glue_dir, "train", 0, 96))
    dev = write_tsv(root / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 32))
    data = DataConfig(task="sst2", data_dir=glue_dir, train_file=train, dev_file=dev)

    def get(name: str) -> FamilyRun:
        if name not in made:
            base = root / name
            backbone = _backbone(base / "backbone", name, minilm_dir)
            teacher = base / "teacher"
            finetune_teacher(FinetuneConfig(data=data, output_dir=teacher, backbone=str(backbone), max_length=32,
                                            epochs=1, batch_size=32, learning_rate=1e-3, device="cpu"))
            cache = base / "cache"
            extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=cache, all_layers=True, max_length=32,
                                          shard_rows=64, device="cpu"))
            build_negatives(NegativesConfig(cache_dir=cache, k=2))
            manifest = json.loads((cache / "manifest.json").read_text())
            shape = student_config(manifest["teacher"]["config"], 3, 24, 4, 48, manifest["task"])
            torch.manual_seed(1)
            AutoModel.from_config(shape).save_pretrained(base / "general")
            AutoTokenizer.from_pretrained(teacher).save_pretrained(base / "general")
            made[name] = FamilyRun(name, data, teacher, cache, base / "general")
        return made[name]

    return get


def tiny(run: FamilyRun, out: Path, **kwargs) -> TrainConfig:
    return tiny_config(run.cache, out, **{"max_steps": 2, **kwargs})


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer layers, where its family's table row says they are."""
    return get_module(model.base_model, FAMILIES[model.config.model_type].layers)


def _reloads_and_classifies(out: Path, family: str) -> AutoModelForSequenceClassification:
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == family
    classify = pipeline("text-classification", model=str(out), device=-1)
    predictions = classify(["a gripping , funny film .", "dull and lifeless ."])
    assert [p["label"] in model.config.id2label.values() for p in predictions] == [True, True]
    assert sorted(model.config.id2label.values()) == ["0", "1"]  # the task's labels, from the cache
    return model


# --------------------------------------------------------------------------- the student's config per family


@pytest.mark.parametrize("family", NAMES)
def test_student_config_reshapes_the_teachers_and_keeps_what_its_ids_need(family: str) -> None:
    teacher = json.loads(AutoConfig.for_model(family, **BACKBONES[family]).to_json_string())
    config = student_config(teacher, 2, 16, 2, 24, {"labels": ["0", "1"], "is_regression": False})
    assert config.model_type == family
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    assert getattr(config, FAMILIES[family].intermediate) == 24
    kept = ("vocab_size", "pad_token_id", "max_position_embeddings", "type_vocab_size", "relative_attention",
            "position_biased_input", "pos_att_type", "max_relative_positions", "position_buckets", "norm_rel_ebd")
    assert {k: getattr(config, k) for k in kept if k in teacher} == {k: teacher[k] for k in kept if k in teacher}
    # every width field follows --hidden (DeBERTa's pooler, ELECTRA's embeddings): the model builds and runs
    model = AutoModelForSequenceClassification.from_config(config)
    assert model(input_ids=torch.tensor([[101, 2023, 102]])).logits.shape == (1, 2)


# --------------------------------------------------------------------------- the pipeline per family


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("init", ["random", "teacher", "dir"])
def test_each_family_distils_with_each_init_and_reloads(runs: Callable, family: str, init: str, tmp_path: Path) -> None:
    run = runs(family)
    shape = {"random": {}, "teacher": dict(hidden=32, heads=4, intermediate=64), "dir": {}}[init]
    summary = train_student(tiny(run, tmp_path / "student", init=str(run.dir_init) if init == "dir" else init, **shape))
    assert summary["steps"] == 2 and summary["best"] is not None  # evaluated on the cached dev split
    # --init DIR: the 3-layer checkpoint decides the depth and the layer map, not --layers 2
    assert summary["layer_map"] == (layer_map(4, 3) if init == "dir" else [2, 4])
    model = _reloads_and_classifies(tmp_path / "student", family)
    width = {"random": 16, "teacher": 32, "dir": 24}[init]
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (3 if init == "dir" else 2, width)
    if init == "random":  # `lrc evaluate` reads the student the way a user would
        result = evaluate(EvaluateConfig(model_dir=tmp_path / "student", data=run.data, batch_size=2, seq_length=16,
                                         timing_batches=1, device="cpu"))
        assert 0 <= result["model"]["metrics"]["accuracy"] <= 1


@pytest.mark.parametrize("family", NAMES)
def test_init_teacher_copies_embeddings_the_mapped_layers_and_the_head(runs: Callable, family: str) -> None:
    run = runs(family)
    manifest = json.loads((run.cache / "manifest.json").read_text())
    teacher = AutoModelForSequenceClassification.from_pretrained(run.cache / "teacher_weights").eval()
    # The teacher's width, heads and FFN: every channel kept (narrower students: tests/test_select.py).
    config = student_config(manifest["teacher"]["config"], 2, 32, 4, getattr(teacher.config, FAMILIES[family].intermediate),
                            manifest["task"])
    student = build_student(config, "teacher", run.cache / "teacher_weights", [3, 4]).eval()
    assert type(student) is type(teacher) and len(_layers(student)) == 2
    prefix = f"{student.base_model_prefix}.{FAMILIES[family].layers}."
    source = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(prefix):  # student layer i <- teacher layer phi(i) = [3, 4][i]
            i, rest = key[len(prefix):].split(".", 1)
            key = f"{prefix}{[3, 4][int(i)] - 1}.{rest}"
        assert torch.equal(value, source[key]), key
    # and it computes what the teacher computes with only those layers
    del _layers(teacher)[:2]  # keeps teacher layers 3 and 4
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_student_of_another_family_reads_the_teachers_ids(runs: Callable, tmp_path: Path) -> None:
    # A RoBERTa teacher pads with id 1 and counts positions after it; a BERT student keeps the pad id and
    # as many usable positions, counted from 0, and no segments (the teacher reads none).
    run = runs("roberta")
    train_student(tiny(run, tmp_path / "student", student_family="bert"))
    model = _reloads_and_classifies(tmp_path / "student", "bert")
    assert (model.config.pad_token_id, model.config.max_position_embeddings, model.config.type_vocab_size) == (1, 128, 1)
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(tmp_path / "student").model_input_names


# --------------------------------------------------------------------------- the perturbation per family


def _batch(run: FamilyRun) -> dict[str, torch.Tensor]:
    dataset = CacheDataset(run.cache, "train", [2, 4], NegativeSampler(run.cache / "negatives.arrow", 2, seed=0))
    return collate(dataset.__getitems__([0, 3, 7, 11]))


def _objective(run: FamilyRun) -> Objective:
    return objective_for(json.loads((run.cache / "manifest.json").read_text()))


def _model(run: FamilyRun) -> Model:
    manifest = json.loads((run.cache / "manifest.json").read_text())
    torch.manual_seed(0)
    student = build_student(student_config(manifest["teacher"]["config"], 2, 16, 2, 32, manifest["task"]), "random",
                            None, [2, 4])
    return Model(student, Projections(16, 32, 2), [0, 1])


def _manual_total(model: Model, batch: dict, embeddings: torch.Tensor, weights: tuple) -> torch.Tensor:
    """L_total written out, the embedding module's output replaced by `embeddings` through a plain hook."""
    hook = model.student.base_model.embeddings.register_forward_hook(lambda m, a, o: embeddings)
    try:
        out = model.student(**model_inputs(model.student, batch), output_hidden_states=True)
    finally:
        hook.remove()
    mask, (alpha, beta, gamma) = batch["attention_mask"], weights
    cos = sum(losses.cos_nce(w(h), batch["teacher_hidden"][i], mask, batch["negative_hidden"][i], batch["negative_mask"],
                             "flat") for i, (w, h) in enumerate(zip(model.projections.maps, out.hidden_states[1:])))
    logits = out.logits.float()
    return alpha * cos + beta * losses.soft_loss(logits, batch["teacher_logits"], 1.1) + gamma * losses.hard_loss(
        logits, batch["labels"])


def _embed(model: Model, batch: dict) -> torch.Tensor:
    out = model.student(**model_inputs(model.student, batch), output_hidden_states=True)
    return out.hidden_states[0]


def _watch(model: Model) -> tuple[list[torch.Tensor], list[int], Callable[[], None]]:
    """Inputs of the first layer (the encoder input) per pass, and calls of the embedding module."""
    seen: list[torch.Tensor] = []
    calls: list[int] = []

    def first_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v) and v.dim() == 3)
        seen.append(tensor.detach().clone())

    hooks = [_layers(model.student)[0].register_forward_pre_hook(first_input, with_kwargs=True),
             model.student.base_model.embeddings.register_forward_hook(lambda m, a, o: calls.append(1))]
    return seen, calls, lambda: [h.remove() for h in hooks]


@pytest.mark.parametrize("family", NAMES)
def test_perturbation_by_hand_for_each_family(runs: Callable, family: str, tmp_path: Path) -> None:
    run, eps, weights = runs(family), 0.5, (1.0, 1.0, 3.0)
    batch, model = _batch(run), _model(run)
    model.student.eval()  # dropout off: the hand computation can rerun the same function
    params = dict(model.student.named_parameters()) | {f"proj.{k}": v for k, v in model.projections.named_parameters()}
    e = _embed(model, batch).detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(_manual_total(model, batch, e, weights), e)
    delta = eps * gr / gr.flatten(1).norm(dim=1).view(-1, 1, 1)  # one norm per sample over l x d
    expected = torch.autograd.grad(_manual_total(model, batch, _embed(model, batch) + delta, weights),
                                   list(params.values()), allow_unused=True)

    seen, calls, stop = _watch(model)
    try:
        train_step(model, batch, weights, tiny(run, tmp_path, perturb_eps=eps), _objective(run), CPU)
    finally:
        stop()
    assert len(seen) == 2 and len(calls) == 1
    torch.testing.assert_close(seen[1] - seen[0], delta, rtol=1e-5, atol=1e-6)
    for (name, p), want in zip(params.items(), expected):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, torch.zeros_like(p) if want is None else want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", NAMES)
def test_perturbation_with_dropout_starts_from_the_same_embedding_output(runs: Callable, family: str,
                                                                          tmp_path: Path) -> None:
    # Dropout on (the student's default): the embedding module, and its dropout, run once; the second pass
    # starts from that e, so the two encoder inputs differ by exactly eps per sample (not by a new mask).
    run, eps = runs(family), 1.0
    batch, model = _batch(run), _model(run)
    model.student.train()
    assert any(m.p > 0 for m in model.student.base_model.embeddings.modules() if isinstance(m, torch.nn.Dropout))
    seen, calls, stop = _watch(model)
    try:
        train_step(model, batch, (1.0, 1.0, 3.0), tiny(run, tmp_path, perturb_eps=eps), _objective(run), CPU)
    finally:
        stop()
    assert len(calls) == 1 and len(seen) == 2
    norms = (seen[1] - seen[0]).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-5, atol=1e-5)
    # the update still reaches the embedding parameters, through e
    assert model.student.get_input_embeddings().weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- bad input


def test_student_family_without_segment_embeddings_is_refused(runs: Callable, tmp_path: Path) -> None:
    run = runs("bert")  # a BERT teacher reads segment ids (type_vocab_size 2)
    for family in ("mpnet", "distilbert"):
        assert_refused(lambda: train_student(tiny(run, tmp_path / family, student_family=family)),
                       f"--student-family {family}", "segment", "bert")
    assert_refused(lambda: train_student(tiny(run, tmp_path / "x", student_family="albert")), "'albert'", "supported")


def test_init_teacher_across_families_is_refused(runs: Callable, tmp_path: Path) -> None:
    run = runs("roberta")
    assert_refused(lambda: train_student(tiny(run, tmp_path / "s", init="teacher", hidden=32, heads=4,
                                              student_family="bert")), "roberta teacher", "--student-family")


def test_init_dir_with_another_vocabulary_is_refused(runs: Callable, tmp_path: Path) -> None:
    run = runs("mpnet")  # all-mpnet-base-v2's own vocabulary has 30527 ids, the tiny teacher's 30522
    AutoModel.from_config(AutoConfig.for_model("mpnet", **{**BACKBONES["mpnet"], "vocab_size": 30527})).save_pretrained(
        tmp_path / "other")
    assert_refused(lambda: train_student(tiny(run, tmp_path / "s", init=str(tmp_path / "other"))),
                   "vocabulary of 30527", "30522")


def test_a_checkpoint_that_does_not_match_its_class_never_loads_silently(runs: Callable, tmp_path: Path) -> None:
    # RoBERTa weights under a BERT config: transformers reports every encoder key and builds random weights
    run = runs("roberta")
    fake = tmp_path / "fake"
    shutil.copytree(run.teacher, fake)
    roberta = json.loads((fake / "config.json").read_text())
    bert = AutoConfig.for_model("bert", **{k: roberta[k] for k in _SHAPE}, pad_token_id=1, id2label=roberta["id2label"])
    bert.save_pretrained(fake)
    assert_refused(lambda: train_student(tiny(run, tmp_path / "s", init=str(fake))),
                   "does not load as BertForSequenceClassification", "bert.")
    model, info = AutoModelForSequenceClassification.from_pretrained(fake, output_loading_info=True)
    assert_refused(lambda: check_loading_report(model, info, fake, "teacher"), "does not load")
    # while a checkpoint of the right family with a pre-training head the classifier has no place for loads
    AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", **_SHAPE)).save_pretrained(tmp_path / "mlm")
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", output_loading_info=True)
    assert any(k.startswith("cls.") for k in info["unexpected_keys"])
    check_loading_report(model, info, tmp_path / "mlm", "backbone")


def test_teacher_family_without_per_layer_hidden_states_is_refused(runs: Callable, minilm_dir: Path,
                                                                    tmp_path: Path) -> None:
    # CANINE downsamples characters inside the model: its hidden states are not one (B, L, d) per layer
    config = AutoConfig.for_model("canine", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "canine")
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path / "canine")
    assert_refused(lambda: extract_teacher(ExtractConfig(teacher=tmp_path / "canine", data=runs("bert").data,
                                                         output_dir=tmp_path / "cache", student_layers=2,
                                                         device="cpu")),
                   "teacher family 'canine'", "hidden state")


def test_backbone_family_without_a_classification_head_is_refused(runs: Callable, minilm_dir: Path,
                                                                   tmp_path: Path) -> None:
    config = AutoConfig.for_model("bert-generation", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)
    AutoModel.from_config(config).save_pretrained(tmp_path / "gen")
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path / "gen")
    assert_refused(lambda: finetune_teacher(FinetuneConfig(data=runs("bert").data, output_dir=tmp_path / "t",
                                                           backbone=str(tmp_path / "gen"), device="cpu")),
                   "backbone family 'bert-generation'", "sequence-classification head")
