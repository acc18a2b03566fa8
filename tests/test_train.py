"""`train-student` (docs/DESIGN.md §2): schedule, gradient perturbation, loss terms, a run without the teacher,
resume after SIGKILL, and bad inputs. The integration test trains on a real GLUE slice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import REPO, assert_refused, make_tiny_teacher, tiny_config
from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student import checkpoint, losses, run_dir, state_file
from pipeline.student.batches import CacheDataset, collate
from pipeline.student.model import Projections, student_config
from pipeline.student.objective import Objective, loss_weights, objective_for, stage_at
from pipeline.student.run import lr_at, resolve_layer_map, setup_run
from pipeline.student.sampler import NegativeSampler
from pipeline.student.step import Model, loss_terms, train_step, weighted_total
from pipeline.student.train import train_student
from pipeline.teacher.extract import extract_teacher

CPU = torch.device("cpu")


tiny = tiny_config
# The neg_cache's task: a two-class classification, soft and hard terms on.
CLASSIFY = Objective(get_task("sst2"), {"labels": ["0", "1"], "num_labels": 2, "is_regression": False})


def refused(config: TrainConfig, *needles: str) -> str:
    return assert_refused(lambda: train_student(config), *needles)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- schedule


def test_stage_weights_switch_at_80_percent(tmp_path: Path) -> None:
    config = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, stage1_fraction=0.8)
    for step in range(100):
        expected = (1, (1.0, 0.0, 0.0)) if step < 80 else (2, (1.0, 1.0, 3.0))
        assert (stage_at(step, 100, config), loss_weights(step, 100, config)) == expected, step


def test_stage_boundary_is_exact_where_float_rounding_bites(tmp_path: Path) -> None:
    # 0.7 * 90 == 62.99999999999999 and 0.29 * 100 == 28.999999999999996 in floating point
    for fraction, total, boundary in ((0.7, 90, 63), (0.29, 100, 29), (0.8, 7, 5)):
        config = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, stage1_fraction=fraction)
        stages = [stage_at(s, total, config) for s in range(total)]
        assert stages == [1] * boundary + [2] * (total - boundary), (fraction, total)


def test_custom_stage_weights(tmp_path: Path) -> None:
    config = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, stage1_fraction=0.5,
                         stage1_weights=(2.0, 0.5, 0.0), stage2_weights=(0.0, 1.0, 1.0))
    assert [loss_weights(s, 4, config) for s in range(4)] == [(2.0, 0.5, 0.0)] * 2 + [(0.0, 1.0, 1.0)] * 2


@pytest.mark.parametrize("setting", [{"one_stage": True}, {"intermediate_loss": "none", "k": 0}])
def test_one_stage_and_kd_only_are_always_stage_two(tmp_path: Path, setting: dict) -> None:
    config = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, **setting)
    assert {stage_at(s, 100, config) for s in range(100)} == {2}
    assert {loss_weights(s, 100, config) for s in range(100)} == {(1.0, 1.0, 3.0)}


def test_lr_warmup_then_linear_decay() -> None:
    # 100 steps, 10% warmup: (s + 1) / 10 for s < 10, then (100 - s) / 90
    assert [lr_at(s, 100, 0.1) for s in range(10)] == pytest.approx([0.1 * (s + 1) for s in range(10)])
    assert lr_at(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_at(99, 100, 0.1) == pytest.approx(1 / 90)
    assert lr_at(100, 100, 0.1) == 0.0
    # no warmup: the first step runs at the peak
    assert [lr_at(s, 4, 0.0) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # warmup shorter than one step (int(0.1 * 5) == 0) is no warmup
    assert lr_at(0, 5, 0.1) == pytest.approx(1.0)
    # 8 steps, 25% warmup: 0.5, 1, then (8 - s) / 6
    assert [lr_at(s, 8, 0.25) for s in range(8)] == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_layer_map_resolution(neg_cache: Path, tmp_path: Path) -> None:
    cache = open_cache(neg_cache)  # a 4-layer teacher, layers [2, 4] stored
    assert resolve_layer_map(tiny(neg_cache, tmp_path), cache) == [2, 4]
    assert resolve_layer_map(tiny(neg_cache, tmp_path, layers=1, layer_map=(4,)), cache) == [4]
    # KD-only reads no hidden states, so any map is fine
    assert resolve_layer_map(tiny(neg_cache, tmp_path, layers=3, intermediate_loss="none", k=0), cache) == [1, 3, 4]


# --------------------------------------------------------------------------- one training step


@pytest.fixture(scope="module")
def batch(neg_cache: Path) -> dict[str, torch.Tensor]:
    """Six real rows of the cache with their teacher layers [2, 4] and K = 2 negatives each."""
    sampler = NegativeSampler(neg_cache / "negatives.arrow", 2, seed=0)
    dataset = CacheDataset(neg_cache, "train", [2, 4], sampler)
    return collate(dataset.__getitems__([0, 3, 7, 11, 42, 199]))


def make_model(cache: Path, intermediate_loss: str = "cos_nce", seed: int = 0) -> Model:
    """A 2 x 16 student without dropout (so two forward passes compute the same function) + projections."""
    manifest = open_cache(cache).manifest
    config = student_config(manifest["teacher"]["config"], 2, 16, 2, 32, manifest["task"])
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    student = BertForSequenceClassification(config)
    projections = Projections(16, 32, 2) if intermediate_loss != "none" else None
    return Model(student, projections, [0, 1] if projections is not None else [])


def named_params(model: Model) -> dict[str, torch.nn.Parameter]:
    params = dict(model.student.named_parameters())
    if model.projections is not None:
        params |= {f"proj.{k}": v for k, v in model.projections.named_parameters()}
    return params


def manual_total(model: Model, batch: dict, embeddings: torch.Tensor, weights: tuple[float, float, float],
                 granularity: str = "flat") -> torch.Tensor:
    """L_total written out from the losses, with the student's embedding output replaced by `embeddings`."""
    student = model.student
    layer_out: list[torch.Tensor] = []
    hooks = [student.bert.embeddings.register_forward_hook(lambda m, a, o: embeddings)]
    hooks += [layer.register_forward_hook(lambda m, a, o: layer_out.append(o[0] if isinstance(o, tuple) else o))
              for layer in student.bert.encoder.layer]
    try:
        logits = student(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"]).logits
    finally:
        for hook in hooks:
            hook.remove()
    alpha, beta, gamma = weights
    mask = batch["attention_mask"]
    cos = sum(losses.cos_nce(w(h), batch["teacher_hidden"][i], mask, batch["negative_hidden"][i],
                             batch["negative_mask"], granularity)
              for i, (w, h) in enumerate(zip(model.projections.maps, layer_out)))
    soft = losses.soft_loss(logits, batch["teacher_logits"], 1.1)
    hard = losses.hard_loss(logits, batch["labels"])
    return alpha * cos + beta * soft + gamma * hard


def embed(model: Model, batch: dict) -> torch.Tensor:
    return model.student.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])


def grads_of(total: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    values = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), values)}


def step_grads(model: Model, batch: dict, weights: tuple, config: TrainConfig) -> dict[str, torch.Tensor]:
    for p in named_params(model).values():
        p.grad = None
    train_step(model, batch, weights, config, CLASSIFY, CPU)
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in named_params(model).items()}


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_perturbation_moves_embeddings_along_the_gradient_and_updates_on_the_perturbed_loss(
    neg_cache: Path, batch: dict, tmp_path: Path
) -> None:
    eps, weights = 0.5, (1.0, 1.0, 3.0)
    config = tiny(neg_cache, tmp_path, perturb_eps=eps)
    model = make_model(neg_cache)
    params = named_params(model)

    # by hand: gr = dL/de at e, e' = e + eps * gr / ||gr|| (one norm per sample over l x d)
    e = embed(model, batch).detach().requires_grad_(True)
    plain_total = manual_total(model, batch, e, weights)
    (gr,) = torch.autograd.grad(plain_total, e)
    delta = eps * gr / gr.flatten(1).norm(dim=1).view(-1, 1, 1)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((len(e),), eps))
    perturbed_total = manual_total(model, batch, embed(model, batch) + delta, weights)
    expected = grads_of(perturbed_total, params)
    plain = grads_of(manual_total(model, batch, embed(model, batch), weights), params)

    # what train_step feeds the encoder: e on the first pass, e' on the second
    seen: list[torch.Tensor] = []
    hook = model.student.bert.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True)
    try:
        got = step_grads(model, batch, weights, config)
    finally:
        hook.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], e.detach())
    torch.testing.assert_close(seen[1] - seen[0], delta, rtol=1e-5, atol=1e-7)
    assert perturbed_total.item() > plain_total.item()  # a step up the loss: the point is adversarial

    assert_grads_close(got, expected)  # the update uses the perturbed loss's gradient ...
    diff = max((got[k] - plain[k]).abs().max().item() for k in got)
    assert diff > 1e-4  # ... and not the unperturbed loss's
    # every part of the model gets a gradient from the stage-two loss
    assert all(got[k].abs().sum() > 0 for k in got if "pooler" not in k and "token_type" not in k), \
        [k for k in got if got[k].abs().sum() == 0]


def test_returned_terms_are_those_of_the_perturbed_pass(neg_cache: Path, batch: dict, tmp_path: Path) -> None:
    weights = (1.0, 1.0, 3.0)
    model = make_model(neg_cache)
    e = embed(model, batch).detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(manual_total(model, batch, e, weights), e)
    delta = gr / gr.flatten(1).norm(dim=1).view(-1, 1, 1)
    with torch.no_grad():
        expected = manual_total(model, batch, embed(model, batch) + delta, weights)
    terms = train_step(model, batch, weights, tiny(neg_cache, tmp_path, perturb_eps=1.0), CLASSIFY, CPU)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_eps_gives_the_plain_gradients(neg_cache: Path, batch: dict, tmp_path: Path) -> None:
    weights = (1.0, 1.0, 3.0)
    model = make_model(neg_cache)
    calls: list[int] = []
    hook = model.student.bert.encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = step_grads(model, batch, weights, tiny(neg_cache, tmp_path, perturb_eps=0.0))
    finally:
        hook.remove()
    assert len(calls) == 1  # no second pass
    assert_grads_close(got, grads_of(manual_total(model, batch, embed(model, batch), weights), named_params(model)))


def test_stage_one_updates_only_from_cos_nce(neg_cache: Path, batch: dict, tmp_path: Path) -> None:
    model = make_model(neg_cache)
    got = step_grads(model, batch, (1.0, 0.0, 0.0), tiny(neg_cache, tmp_path, perturb_eps=0.0))
    # the classifier sees no loss in stage one; the encoder and projections do
    assert got["classifier.weight"].abs().sum() == 0 and got["bert.pooler.dense.weight"].abs().sum() == 0
    assert got["proj.maps.0.weight"].abs().sum() > 0 and got["bert.encoder.layer.0.output.dense.weight"].abs().sum() > 0


@pytest.mark.parametrize("granularity", ["flat", "token", "cls"])
def test_loss_terms_cos_nce(neg_cache: Path, batch: dict, tmp_path: Path, granularity: str) -> None:
    model = make_model(neg_cache)
    terms, e = loss_terms(model, batch, tiny(neg_cache, tmp_path, granularity=granularity), CLASSIFY)
    assert set(terms) == {"cos_nce", "soft", "hard"}
    with torch.no_grad():
        cos = manual_total(model, batch, embed(model, batch), (1.0, 0.0, 0.0), granularity)
        everything = manual_total(model, batch, embed(model, batch), (1.0, 1.0, 3.0), granularity)
    assert terms["cos_nce"].item() == pytest.approx(cos.item(), rel=1e-6)
    assert 0 < terms["cos_nce"].item() <= 2 * 4  # two mapped layers, each in [0, 4]
    total = weighted_total(terms, (1.0, 1.0, 3.0))
    assert total.item() == pytest.approx(everything.item(), rel=1e-6)
    assert e.shape == (6, batch["input_ids"].shape[1], 16)


def test_loss_terms_hidden_mse(neg_cache: Path, batch: dict, tmp_path: Path) -> None:
    model = make_model(neg_cache)
    terms, _ = loss_terms(model, batch, tiny(neg_cache, tmp_path, intermediate_loss="hidden_mse"), CLASSIFY)
    assert set(terms) == {"hidden_mse", "soft", "hard"}
    with torch.no_grad():
        out = model.student(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        expected = 0.0
        for i, w in enumerate(model.projections.maps):  # naive: mean over real tokens and width, summed over layers
            z, t = w(out.hidden_states[i + 1]), batch["teacher_hidden"][i].float()
            expected += ((z - t)[mask] ** 2).mean().item()
    assert terms["hidden_mse"].item() == pytest.approx(expected, rel=1e-5)


def test_loss_terms_none(neg_cache: Path, batch: dict, tmp_path: Path) -> None:
    model = make_model(neg_cache, intermediate_loss="none")
    terms, _ = loss_terms(model, batch, tiny(neg_cache, tmp_path, intermediate_loss="none", k=0), CLASSIFY)
    assert set(terms) == {"soft", "hard"}
    with torch.no_grad():
        logits = model.student(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                               attention_mask=batch["attention_mask"]).logits
    # naive soft and hard losses, per sample
    t = 1.1
    p = torch.softmax(batch["teacher_logits"] / t, -1)
    q = torch.log_softmax(logits / t, -1)
    soft = sum((p[i] * (p[i].log() - q[i])).sum() for i in range(6)) / 6 * t * t
    hard = -sum(torch.log_softmax(logits[i], -1)[batch["labels"][i]] for i in range(6)) / 6
    assert terms["soft"].item() == pytest.approx(soft.item(), rel=1e-5, abs=1e-7)
    assert terms["hard"].item() == pytest.approx(hard.item(), rel=1e-6)


@pytest.mark.parametrize("hidden, projection_init, identity", [
    (32, "auto", True), (32, "identity", True), (32, "random", False), (16, "auto", False)])
def test_projection_start(neg_cache: Path, tmp_path: Path, hidden: int, projection_init: str, identity: bool) -> None:
    # The tiny teacher is 32 wide: auto starts W_i at the identity only where the student is as wide.
    run = setup_run(tiny(neg_cache, tmp_path / "run", hidden=hidden, heads=4, projection_init=projection_init))
    for w in run.model.projections.maps:
        assert w.weight.shape == (32, hidden)
        assert torch.equal(w.weight, torch.eye(32)) == identity


def test_identity_projection_needs_equal_widths(neg_cache: Path, tmp_path: Path) -> None:
    refused(tiny(neg_cache, tmp_path / "run", projection_init="identity"), "--projection-init identity", "--hidden 16", "32")
    assert not (tmp_path / "run").exists()  # refused before the run dir is made


def test_weighted_total() -> None:
    terms = {"cos_nce": torch.tensor(2.0), "soft": torch.tensor(3.0), "hard": torch.tensor(5.0)}
    assert weighted_total(terms, (1.0, 1.0, 3.0)).item() == 20.0
    assert weighted_total(terms, (1.0, 0.0, 0.0)).item() == 2.0
    assert weighted_total(terms, (0.5, 2.0, 0.0)).item() == 7.0
    mse = {"hidden_mse": torch.tensor(4.0), "soft": torch.tensor(3.0), "hard": torch.tensor(5.0)}
    assert weighted_total(mse, (2.0, 1.0, 1.0)).item() == 16.0
    kd = {"soft": torch.tensor(3.0), "hard": torch.tensor(5.0)}
    assert weighted_total(kd, (1.0, 1.0, 3.0)).item() == 18.0
    general = {"cos_nce": torch.tensor(2.0)}  # a corpus run: the intermediate term alone
    assert weighted_total(general, (1.5, 0.0, 0.0)).item() == 3.0


def test_the_objective_follows_the_cache_kind(tmp_path: Path) -> None:
    """A corpus cache trains the intermediate loss alone at every step, keeps the last student and lets DDP look for
    the unused head; a task cache follows the two-stage schedule and its task's metric and loss type."""
    config = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path / "run", stage1_fraction=0.5, keep="best")
    corpus = objective_for({"kind": "corpus", "task": None})
    assert corpus.general and not corpus.predicts and corpus.find_unused and corpus.metric is None
    assert {corpus.weights(s, 10, config) for s in range(10)} == {(1.0, 0.0, 0.0)}
    assert {corpus.stage(s, 10, config) for s in range(10)} == {1}
    assert (corpus.keep(config), corpus.kind, corpus.head["num_labels"]) == ("last", "general", 1)
    stsb = objective_for({"kind": "task", "task": {"name": "stsb", "labels": None, "num_labels": 1,
                                                    "is_regression": True, "metric": "pearson_spearman"}})
    assert stsb.predicts and stsb.regression and not stsb.find_unused and stsb.metric == "pearson"
    assert [stsb.weights(s, 4, config) for s in range(4)] == [config.stage1_weights] * 2 + [config.stage2_weights] * 2
    assert (stsb.keep(config), stsb.kind, stsb.name) == ("best", "task", "stsb")


# --------------------------------------------------------------------------- a whole run, without the teacher


@pytest.fixture(scope="module")
def orphan_cache(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> Path:
    """A cache whose teacher directory was deleted after extraction; its negatives built afterwards."""
    root = tmp_path_factory.mktemp("orphan")
    teacher = make_tiny_teacher(root / "teacher", minilm_dir, seed=7)
    dev_lines = (glue_dir / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:97]  # header + 96 rows
    (root / "dev.tsv").write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
    data = DataConfig(task="sst2", data_dir=glue_dir, dev_file=root / "dev.tsv", max_train_examples=64)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=root / "cache", student_layers=2,
                                  shard_rows=32, device="cpu"))
    shutil.rmtree(teacher)
    build_negatives(NegativesConfig(cache_dir=root / "cache", k=2))
    return root / "cache"


def test_training_without_the_teacher_directory(orphan_cache: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    assert not (orphan_cache.parent / "teacher").exists()
    out = tmp_path / "student"
    # --init teacher reads the weights the cache keeps, not the deleted teacher dir
    summary = train_student(tiny(orphan_cache, out, hidden=32, heads=4, intermediate=64, init="teacher"))
    assert summary["steps"] == 3 and summary["layer_map"] == [2, 4]
    assert json.loads((out / "training_summary.json").read_text())["best"] == summary["best"]

    classify = pipeline("text-classification", model=str(out), tokenizer=str(out), device=-1)
    predictions = classify(["a gripping , beautifully made film .", "dull and lifeless ."])
    task_labels = open_cache(orphan_cache).task["labels"]
    assert [p["label"] in task_labels for p in predictions] == [True, True]

    records = read_log(out)
    steps = [r for r in records if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"cos_nce", "soft", "hard", "loss", "stage", "lr", "epoch"} <= r.keys()
    assert [r for r in records if "eval" in r][-1]["eval"]["accuracy"] == summary["best"]["accuracy"]


def test_log_reports_stage_lr_and_total_of_each_step(neg_cache: Path, tmp_path: Path) -> None:
    config = tiny(neg_cache, tmp_path / "run", max_steps=10, warmup_ratio=0.2, stage1_fraction=0.6,
                  learning_rate=1e-3)
    train_student(config)
    steps = [r for r in read_log(tmp_path / "run") if "eval" not in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["stage"] for r in steps] == [1] * 6 + [2] * 4
    # the rate each step ran at: warmup 2 steps (0.5, 1.0), then (10 - s) / 8
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 * lr_at(s, 10, 0.2) for s in range(10)])
    assert steps[0]["lr"] == pytest.approx(5e-4)
    for r in steps:
        weights = (1, 0, 0) if r["stage"] == 1 else (1, 1, 3)
        total = weights[0] * r["cos_nce"] + weights[1] * r["soft"] + weights[2] * r["hard"]
        assert r["loss"] == pytest.approx(total, abs=5e-6)
    assert (tmp_path / "run" / "train_config.json").is_file()


# --------------------------------------------------------------------------- resume after a kill


def cli_args(cache: Path, out: Path, *extra: str) -> list[str]:
    """tiny_config's run (perturbation on) as train-student's command line."""
    return ["train-student", "--cache", str(cache), "--output-dir", str(out), "--layers", "2", "--hidden", "16",
            "--heads", "2", "--intermediate", "32", "--k", "2", "--max-steps", "30", "--checkpoint-every", "2",
            "--log-every", "1", "--device", "cpu", "--perturb-eps", "1.0", *extra]


@pytest.fixture(scope="module")
def uninterrupted(neg_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 30 steps (2 epochs of 13 batches and 4 more) in one go, in this process."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_student(tiny(neg_cache, out, max_steps=30, num_workers=0))
    return out


def final_state(out: Path) -> dict:
    return state_file.read_state(out / run_dir.CHECKPOINT_DIR / run_dir.STATE_FILE)


def past_a_checkpoint(out: Path) -> bool:
    """A checkpoint exists and the log already holds a step after it (odd steps are never checkpointed)."""
    try:
        lines = (out / "train_log.jsonl").read_text().splitlines()
        return (out / run_dir.CHECKPOINT_DIR / run_dir.STATE_FILE).is_file() and json.loads(lines[-1])["step"] % 2 == 1
    except (FileNotFoundError, IndexError, json.JSONDecodeError):  # not yet written, or caught mid-line
        return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_kill_matches_an_uninterrupted_run(neg_cache: Path, uninterrupted: Path, tmp_path: Path,
                                                        workers: int) -> None:
    out = tmp_path / "run"
    # Each step sleeps 0.2 s in the killed process (timing only, the arithmetic is untouched) so that the
    # kill lands after a checkpoint and well before the end whatever the machine's load.
    slow = ("import time, pipeline.student.train as t; step = t.train_step; "
            "t.train_step = lambda *a, **k: (time.sleep(0.2), step(*a, **k))[1]; from cli import app; app()")
    # one thread, as conftest sets for this process: the same float arithmetic in every run compared here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", slow, *cli_args(neg_cache, out, "--num-workers", str(workers))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not past_a_checkpoint(out):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader worker, like a lost machine
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr.decode()[-1000:]}"
    assert not (out / "training_summary.json").exists()
    killed_at = final_state(out)["state"]["step"]
    assert 2 <= killed_at < 30 and killed_at % 2 == 0

    # resume in this process; --num-workers, --log-every and --checkpoint-every may change on resume
    summary = train_student(tiny(neg_cache, out, max_steps=30, num_workers=workers, resume=True, log_every=1))
    assert summary["steps"] == 30

    a, b = final_state(out), final_state(uninterrupted)
    assert a["state"] == b["state"]
    for part in ("student", "projections"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # the log has each step once and the same numbers (records the killed run wrote past its checkpoint dropped)
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(uninterrupted))
    best = json.loads((uninterrupted / "training_summary.json").read_text())["best"]
    assert summary["best"] == best
    from safetensors.torch import load_file

    ours, theirs = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


# --------------------------------------------------------------------------- bad input


def test_cache_without_the_mapped_layers(neg_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    refused(tiny(neg_cache, out, layer_map=(1, 3)), "[1, 3]", "[2, 4]", "--layers 1,3")
    refused(tiny(neg_cache, out, layers=3), "[1, 3, 4]", "[2, 4]", "--student-layers 3")  # 4 layers -> 1, 3, 4
    assert not out.exists()  # refused before anything was written


def test_negatives_from_another_cache(neg_cache: Path, orphan_cache: Path, tmp_path: Path) -> None:
    config = tiny(neg_cache, tmp_path / "run", negatives=orphan_cache / "negatives.arrow")
    refused(config, "another cache", "build-negatives")


def test_missing_negatives_file(neg_cache: Path, tmp_path: Path) -> None:
    refused(tiny(neg_cache, tmp_path / "run", negatives=tmp_path / "nope.arrow"), "no negatives file", "nope.arrow",
            "build-negatives")
    assert not (tmp_path / "run").exists()


def test_hidden_not_divisible_by_heads(neg_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(LrcError, match="--hidden 30 is not divisible by --heads 4"):
        tiny(neg_cache, tmp_path, hidden=30, heads=4)
    # the same through the command line: one line on stderr, exit code 1
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, cli_args(neg_cache, tmp_path / "run", "--hidden", "30", "--heads", "4"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "not divisible by --heads 4" in result.stderr
    assert not (tmp_path / "run").exists()


def test_init_teacher_wider_than_the_teacher(neg_cache: Path, tmp_path: Path) -> None:
    refused(tiny(neg_cache, tmp_path / "run", init="teacher", hidden=64, heads=4), "wider", "--hidden gives 64",
            "at most 32")


def test_nan_loss_names_step_and_term_and_keeps_the_last_checkpoint(neg_cache: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_soft, calls = losses.soft_loss, []

    def soft_then_nan(*args, **kwargs):
        calls.append(1)
        value = real_soft(*args, **kwargs)
        return value * float("nan") if len(calls) > 8 else value  # 2 passes per step: NaN from step index 4

    monkeypatch.setattr(losses, "soft_loss", soft_then_nan)
    out = tmp_path / "run"
    config = tiny(neg_cache, out, max_steps=8)
    refused(config, "soft", "nan", "step 4", str(out / "checkpoint"))
    monkeypatch.setattr(losses, "soft_loss", real_soft)

    # the last good checkpoint (step 4) loads, holds finite weights, and the run resumes from it to the end
    state = final_state(out)
    assert state["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    summary = train_student(replace(config, resume=True))
    assert summary["steps"] == 8


def test_resume_with_other_settings(neg_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_student(tiny(neg_cache, out, max_steps=2))
    refused(tiny(neg_cache, out, max_steps=2, resume=True, learning_rate=5e-4), "differs in: learning_rate",
            "--overwrite")
    refused(tiny(neg_cache, out, max_steps=2, resume=True, hidden=32, heads=4), "hidden")


def test_resume_without_a_checkpoint(neg_cache: Path, tmp_path: Path) -> None:
    refused(tiny(neg_cache, tmp_path / "run", resume=True), "--resume", "no checkpoint")


def test_output_dir_holding_a_run(neg_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_student(tiny(neg_cache, out, max_steps=2))
    before = (out / "train_log.jsonl").read_text()
    refused(tiny(neg_cache, out, max_steps=2), "holds a training run", "--resume", "--overwrite")
    assert (out / "train_log.jsonl").read_text() == before  # untouched
    summary = train_student(tiny(neg_cache, out, max_steps=1, overwrite=True))
    assert summary["steps"] == 1 and [r["step"] for r in read_log(out) if "eval" not in r] == [1]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(tiny(neg_cache, foreign, overwrite=True), "not empty", "no lrc training run")
    assert (foreign / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- integration: real data, real teacher


@pytest.mark.integration
def test_student_beats_the_majority_class_on_sst2(tmp_path: Path, minilm_dir: Path, glue_dir: Path) -> None:
    """MiniLM teacher fine-tuned on 400 SST-2 rows -> cache -> negatives -> a 3 x 384 LRC-BERT student.

    About 2.5 minutes on 2 busy cores. The student is 3 of the teacher's 6 layers (3, 5, 6), trained
    one-stage: in a run this short the default two stages leave the classifier only ~10 steps.
    """
    from pipeline.core.teacher_config import FinetuneConfig
    from pipeline.teacher.finetune import finetune_teacher

    started = time.perf_counter()
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=400)
    finetune_teacher(FinetuneConfig(data=data, output_dir=tmp_path / "teacher", backbone=str(minilm_dir),
                                    max_length=64, epochs=2, batch_size=16, learning_rate=2e-4, device="cpu"))
    extract_teacher(ExtractConfig(teacher=tmp_path / "teacher", data=data, output_dir=tmp_path / "cache",
                                  student_layers=4, max_length=64, device="cpu"))
    assert open_cache(tmp_path / "cache").layers == [2, 3, 5, 6]
    build_negatives(NegativesConfig(cache_dir=tmp_path / "cache", k=4))
    summary = train_student(TrainConfig(
        cache_dir=tmp_path / "cache", output_dir=tmp_path / "student", layers=3, layer_map=(3, 5, 6), hidden=384,
        heads=12, intermediate=1536, init="teacher", k=4, one_stage=True, epochs=2, batch_size=16,
        learning_rate=1e-4, num_workers=0, device="cpu"))
    majority = 444 / 872  # SST-2 dev: 444 positive of 872
    accuracy, teacher = summary["best"]["accuracy"], summary["teacher_dev"]["accuracy"]
    print(f"integration: student dev accuracy {accuracy:.4f} (teacher {teacher:.4f}, majority {majority:.4f}) "
          f"in {time.perf_counter() - started:.0f} s")
    assert teacher >= 0.70  # otherwise the teacher, not the distillation, is what failed
    assert accuracy >= 0.60 > majority + 0.09


# --------------------------------------------------------------------------- epoch accounting


def test_whole_epochs_are_counted_and_evaluated_once_each(neg_cache: Path, tmp_path: Path) -> None:
    """200 rows in batches of 64 -> 4 batches an epoch; 2 epochs end exactly on the last step."""
    summary = train_student(tiny(neg_cache, tmp_path / "run", max_steps=None, epochs=2, batch_size=64,
                                 eval_batch_size=256, checkpoint_every=100))
    assert (summary["steps"], summary["epochs"]) == (8, 2)
    evals = [r for r in read_log(tmp_path / "run") if "eval" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1), (8, 2)]


def test_a_fractional_epoch_stops_mid_epoch_and_evaluates_the_last_step(neg_cache: Path, tmp_path: Path) -> None:
    summary = train_student(tiny(neg_cache, tmp_path / "run", max_steps=None, epochs=1.5, batch_size=64,
                                 eval_batch_size=256, checkpoint_every=100))
    assert (summary["steps"], summary["epochs"]) == (6, 1)
    evals = [r for r in read_log(tmp_path / "run") if "eval" in r]
    assert [r["step"] for r in evals] == [4, 6]


# --------------------------------------------------------------------------- what the run trusts


def test_a_refused_run_leaves_no_run_dir_behind(neg_cache: Path, tmp_path: Path) -> None:
    """A refusal after the cache was opened (here: identity projections at another width) used to leave a stub
    run dir that made the corrected command ask for --resume or --overwrite."""
    out = tmp_path / "run"
    refused(tiny(neg_cache, out, projection_init="identity"), "--projection-init identity", "teacher width (32)")
    assert not out.exists()
    assert train_student(tiny(neg_cache, out, max_steps=1))["steps"] == 1  # the corrected command, as it is


def test_a_damaged_cache_is_refused_before_training(neg_cache: Path, tmp_path: Path) -> None:
    c = tmp_path / "cache"
    shutil.copytree(neg_cache, c)
    shard = sorted((c / "shards").glob("train-*.arrow"))[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04  # flipped bits, same size
    shard.write_bytes(bytes(data))
    refused(tiny(c, tmp_path / "run"), shard.name, "checksum")
    assert not (tmp_path / "run").exists()


def _poison_shard(c: Path, layer: int) -> tuple[int, int]:
    """Rewrite train shard 1 with NaN hidden states at `layer`, checksums made to match (as from an lrc
    that never checked its teacher's outputs): only the values can tell."""
    import pyarrow as pa

    from pipeline.cache import format as cache_mod
    from pipeline.cache.manifest import assemble_manifest

    manifest = json.loads((c / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    with pa.memory_map(str(c / entry["file"])) as source:
        table = pa.ipc.open_stream(source).read_all().combine_chunks()
    name = f"hidden_{layer}"
    column = table.column(name).chunk(0)
    tokens = column.values
    nan = pa.array(np.full(len(tokens.values), np.nan, np.float16))
    poisoned = pa.ListArray.from_arrays(column.offsets, pa.FixedSizeListArray.from_arrays(nan, tokens.type.list_size))
    index = table.schema.get_field_index(name)
    table = table.set_column(index, table.schema.field(index), poisoned)
    cache_mod.write_shard(c, "train", entry["start"], entry["stop"], table.to_batches()[0])
    settings = json.loads((c / "settings.json").read_text())
    assemble_manifest(c, settings, {"teacher_path": manifest["teacher_path"]})
    return entry["start"], entry["stop"]


def test_nan_from_the_cache_is_blamed_on_the_cache_not_the_learning_rate(neg_cache: Path, tmp_path: Path) -> None:
    c = tmp_path / "cache"
    shutil.copytree(neg_cache, c)
    start, stop = _poison_shard(c, 2)
    out = tmp_path / "run"
    message = refused(tiny(c, out, k=0, batch_size=16, checkpoint_every=100), "holds non-finite teacher hidden states",
                      "re-extract")
    rows = [int(r) for r in message.split("row(s) ")[1].split(":")[0].split(", ")]
    assert rows and all(start <= r < stop for r in rows)
    assert "--lr" not in message and "checkpoint" not in message


def test_a_diverged_run_without_a_checkpoint_does_not_point_at_one(neg_cache: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_soft = losses.soft_loss
    monkeypatch.setattr(losses, "soft_loss", lambda *a, **k: real_soft(*a, **k) * float("nan"))
    out = tmp_path / "run"
    message = refused(tiny(out=out, cache=neg_cache, checkpoint_every=50), "soft", "step 0", "no checkpoint was written",
                      "--overwrite", "lower --lr")
    assert str(out / "checkpoint") not in message and not (out / "checkpoint").exists()


# --------------------------------------------------------------------------- resume means the same inputs


def _killed_at_step_3(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train until step 3 fails (a kill after the step-2 checkpoint), in this process."""
    import pipeline.student.train as train_module

    step, calls = train_module.train_step, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_student(config)
    monkeypatch.setattr(train_module, "train_step", step)
    assert final_state(config.output_dir)["state"]["step"] == 2


def test_resume_refuses_a_re_extracted_cache_or_rebuilt_negatives(neg_cache: Path, tiny_teacher: Path, glue_dir: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same paths with other contents used to resume silently, mixing two trainings in one student."""
    c = tmp_path / "cache"
    shutil.copytree(neg_cache, c)
    with_negatives, without = tmp_path / "run-k2", tmp_path / "run-k0"
    _killed_at_step_3(tiny(c, with_negatives, max_steps=4), monkeypatch)
    _killed_at_step_3(tiny(c, without, max_steps=4, k=0), monkeypatch)
    recorded = checkpoint.recorded_inputs(with_negatives / "checkpoint" / run_dir.STATE_FILE)
    assert recorded["cache_fingerprint"] == open_cache(c).fingerprint and len(recorded["negatives_sha256"]) == 64

    build_negatives(NegativesConfig(cache_dir=c, k=2, seed=1, overwrite=True))  # rebuilt in place: other candidates
    refused(tiny(c, with_negatives, max_steps=4, resume=True), "the negatives file", "sha256", "rebuilt or another file",
            "--overwrite")
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=180)  # re-extracted in place: other rows
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=c, student_layers=2, shard_rows=64,
                                  overwrite=True))
    refused(tiny(c, without, max_steps=4, k=0, resume=True), "the cache", "fingerprint", "re-extracted or another cache")
    assert final_state(without)["state"]["step"] == 2  # the refused resume wrote nothing


def test_a_run_dir_copied_elsewhere_resumes_on_copied_inputs(neg_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded output and cache paths used to block this ("differs in: cache_dir, output_dir"): the inputs
    are now compared by content, wherever they live."""
    first, out = tmp_path / "a" / "cache", tmp_path / "a" / "run"
    shutil.copytree(neg_cache, first)
    _killed_at_step_3(tiny(first, out, max_steps=4), monkeypatch)
    moved_cache, moved_run = tmp_path / "b" / "cache-copy", tmp_path / "b" / "run-copy"
    shutil.copytree(first, moved_cache)
    shutil.copytree(out, moved_run)
    shutil.rmtree(tmp_path / "a")
    summary = train_student(tiny(moved_cache, moved_run, max_steps=4, resume=True))
    assert summary["steps"] == 4 and [r["step"] for r in read_log(moved_run) if "eval" not in r] == [1, 2, 3, 4]


def test_a_checkpoint_without_recorded_inputs_keeps_the_path_rule(neg_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written before inputs were recorded cannot be compared by content: it resumes only on the
    paths it recorded, as it was written to."""
    c, out = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(neg_cache, c)
    _killed_at_step_3(tiny(c, out, max_steps=4), monkeypatch)
    path = out / "checkpoint" / run_dir.STATE_FILE
    payload = state_file.read_state(path)
    del payload["inputs"]
    state_file.write_state(path, payload)
    assert checkpoint.recorded_inputs(path) is None
    moved = tmp_path / "cache-copy"
    shutil.copytree(c, moved)
    refused(tiny(moved, out, max_steps=4, resume=True), "records no input fingerprints", "cache_dir", "--overwrite")
    assert train_student(tiny(c, out, max_steps=4, resume=True))["steps"] == 4


def test_a_label_outside_the_tasks_classes_in_the_cache_is_one_line(neg_cache: Path, tmp_path: Path) -> None:
    """Data loading refuses such labels, so only a damaged cache holds one (checksums made to match here): the
    cross-entropy used to end in an IndexError traceback ("Target 7 is out of bounds")."""
    import pyarrow as pa

    from pipeline.cache import format as cache_mod
    from pipeline.cache.manifest import assemble_manifest

    c = tmp_path / "cache"
    shutil.copytree(neg_cache, c)
    manifest = json.loads((c / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    with pa.memory_map(str(c / entry["file"])) as source:
        table = pa.ipc.open_stream(source).read_all().combine_chunks()
    labels = table.column("label").to_numpy().copy()
    labels[3] = 7
    index = table.schema.get_field_index("label")
    table = table.set_column(index, table.schema.field(index), pa.array(labels))
    cache_mod.write_shard(c, "train", entry["start"], entry["stop"], table.to_batches()[0])
    assemble_manifest(c, json.loads((c / "settings.json").read_text()),
                      {k: manifest[k] for k in ("teacher_path", "kind")})
    refused(tiny(c, tmp_path / "run", k=0, max_steps=13, batch_size=16), "labels outside 0..1", "train row(s) 3",
            "re-extract")
