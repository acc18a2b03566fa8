"""The training loop's decisions, each tested so that the plausible bug fails: which checkpoint is kept,
which teacher layer each student layer learns from, a fresh negatives draw per epoch, gradient clipping,
evaluation without side effects, and the one reuse/resume/retrain policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import assert_refused, make_tiny_teacher, tiny_config
from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import apply_update, predict_logits
from pipeline.core.tasks import get_task
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.student import losses
from pipeline.student.run import DevSet, setup_run
from pipeline.student.step import loss_terms
from pipeline.student.train import epoch_batches, evaluate, train_or_reuse, train_student
from pipeline.teacher.extract import extract_teacher
from transformers import AutoModelForSequenceClassification

CPU = torch.device("cpu")


def tiny(cache: Path, out: Path, **kwargs) -> TrainConfig:
    # random init: these tests watch a student learn, which one cut from its teacher has little left to do
    return tiny_config(cache, out, **{"init": "random", "checkpoint_every": 100, **kwargs})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the best checkpoint


@pytest.fixture(scope="module")
def stsb_cache(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> Path:
    """A regression cache (tiny 2-layer teacher, 100 STS-B train rows, 150 dev rows): Pearson moves with every
    step, where a tiny classifier's accuracy only flips between the two majority classes."""
    root = tmp_path_factory.mktemp("stsb")
    teacher = make_tiny_teacher(root / "teacher", minilm_dir, num_labels=1, layers=2)
    lines = (glue_dir / "STS-B" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:151]
    (root / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = DataConfig(task="stsb", data_dir=glue_dir, dev_file=root / "dev.tsv", text_column="sentence1",
                      text_pair_column="sentence2", label_column="score", max_train_examples=100)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=root / "cache", student_layers=2, device="cpu"))
    return root / "cache"


def test_the_kept_student_is_the_one_with_the_best_dev_metric(stsb_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_student(tiny(stsb_cache, out, k=0, intermediate_loss="none", perturb_eps=0.0, max_steps=12,
                                 eval_every=1, learning_rate=1e-2, batch_size=16, warmup_ratio=0.0))
    pearson = [r["eval"]["pearson"] for r in read_log(out) if "eval" in r]
    best = max(pearson)
    # Informative only if the best is neither the first evaluation nor the last one.
    assert pearson[0] < best and pearson[-1] < best, pearson
    assert summary["main_metric"] == "pearson"
    assert summary["best"]["pearson"] == best and summary["best"]["step"] == pearson.index(best) + 1

    # The model saved at the top of the run dir scores that best metric on the dev split.
    dev = DevSet(open_cache(stsb_cache))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    logits = predict_logits(model, dev.ids, dev.types, 256, CPU)
    assert compute_metrics(get_task("stsb"), logits, dev.labels)["pearson"] == pytest.approx(best, abs=1e-4)  # padding differs


# --------------------------------------------------------------------------- the layer map


def _expected_intermediate(run, batch: dict, mapping: list[int]) -> torch.Tensor:
    """sum_i cos_nce(W_i h_i, teacher layer mapping[i]), the batch's layers being sorted(set(mapping))."""
    stored = sorted(set(mapping))
    assert batch["teacher_hidden"].shape[0] == len(stored)
    out = run.model.student(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"], output_hidden_states=True)
    total = torch.zeros(())
    for i, teacher_layer in enumerate(mapping):
        z = run.model.projections.maps[i](out.hidden_states[i + 1])
        j = stored.index(teacher_layer)
        total = total + losses.cos_nce(z, batch["teacher_hidden"][j], batch["attention_mask"],
                                       batch["negative_hidden"][j], batch["negative_mask"], "flat")
    return total


@pytest.mark.parametrize("mapping", [(4, 2), (4, 4), (2, 4)])
def test_each_student_layer_learns_from_its_mapped_teacher_layer(neg_cache: Path, tmp_path: Path,
                                                                  mapping: tuple) -> None:
    """An out-of-order and a repeated map: matching layers by position would pair them differently."""
    config = tiny(neg_cache, tmp_path / "run", layer_map=mapping, perturb_eps=0.0)
    run = setup_run(config)
    run.model.student.eval()  # no dropout: the loss and the hand computation see the same function
    batch = next(iter(epoch_batches(run, 0)))
    with torch.no_grad():
        terms, _ = loss_terms(run.model, batch, config, run.objective)
        expected = _expected_intermediate(run, batch, list(mapping))
    assert terms["cos_nce"].item() == pytest.approx(expected.item(), rel=1e-5)
    if mapping == (4, 2):  # matched by position, student layer i would learn from the i-th stored layer
        by_position = _expected_intermediate(run, batch, [2, 4])
        assert abs(by_position.item() - expected.item()) > 1e-4


# --------------------------------------------------------------------------- negatives, a fresh draw each epoch


def _negatives_by_row(run, epoch: int) -> dict[int, tuple[int, ...]]:
    drawn = {}
    for batch in epoch_batches(run, epoch):
        for row, negatives in zip(batch["row_ids"].tolist(), batch["negative_ids"].tolist()):
            drawn[row] = tuple(negatives)
    return drawn


def test_negatives_are_drawn_afresh_each_epoch_and_repeat_with_the_seed(neg_cache: Path, tmp_path: Path) -> None:
    run = setup_run(tiny(neg_cache, tmp_path / "run"))
    first, second, first_again = (_negatives_by_row(run, e) for e in (0, 1, 0))
    assert len(first) == 200 and first == first_again
    changed = sum(first[row] != second[row] for row in first)
    assert changed > 150, changed  # K = 2 of M = 16 candidates: a repeated draw is rare
    assert all(row not in negatives for row, negatives in second.items())


# --------------------------------------------------------------------------- gradient clipping


def test_apply_update_clips_the_global_norm() -> None:
    for max_norm, moved in ((1.0, 1.0), (0.0, 10.0)):  # 0 = no clipping
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
        a.grad, b.grad = torch.tensor([6.0, 0.0, 0.0]), torch.tensor([0.0, 8.0, 0.0, 0.0])  # norm 10
        optimizer = torch.optim.SGD([a, b], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        assert apply_update([a, b], optimizer, scheduler, max_norm) == pytest.approx(10.0)
        step = torch.cat([a.detach(), b.detach()])
        assert step.norm().item() == pytest.approx(moved)
        assert torch.equal(a.grad, torch.zeros(3))  # zeroed in place for the next step


def test_train_student_clips_at_max_grad_norm(neg_cache: Path, tmp_path: Path) -> None:
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))

    handle = register_optimizer_step_pre_hook(record)  # every optimizer, including the one the run builds
    try:
        train_student(tiny(neg_cache, tmp_path / "clipped", max_grad_norm=1e-3))
        clipped = list(norms)
        norms.clear()
        train_student(tiny(neg_cache, tmp_path / "free", max_grad_norm=0.0))
    finally:
        handle.remove()
    assert len(clipped) == 3 and max(clipped) <= 1e-3 * (1 + 1e-4), clipped
    assert min(norms) > 1e-2, norms  # unclipped gradients of this run are far larger: the clip did the work
    logged = [r["grad_norm"] for r in read_log(tmp_path / "free") if "grad_norm" in r]
    assert logged == pytest.approx(norms, rel=1e-4)


# --------------------------------------------------------------------------- evaluation has no side effects


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_leaves_the_mode_and_runs_without_dropout(neg_cache: Path, tmp_path: Path, training: bool) -> None:
    config = tiny(neg_cache, tmp_path / "run")
    run = setup_run(config)
    student = run.model.student.train(training)
    first = evaluate(student, run.dev, run.objective.task, config, CPU, 0)
    second = evaluate(student, run.dev, run.objective.task, config, CPU, 0)
    assert student.training is training
    assert first == second  # dropout would make two evaluations differ


# --------------------------------------------------------------------------- one reuse / resume / retrain policy


def test_train_or_reuse(neg_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.student.train as train

    calls: list[TrainConfig] = []
    real = train.train_student
    monkeypatch.setattr(train, "train_student", lambda c: calls.append(c) or real(c))
    config = tiny(neg_cache, tmp_path / "run", checkpoint_every=1)

    first, status = train_or_reuse(config)
    assert status == "done" and len(calls) == 1
    again, status = train_or_reuse(config)
    assert (status, again["best"], len(calls)) == ("reused", first["best"], 1)

    assert_refused(lambda: train_or_reuse(tiny(neg_cache, tmp_path / "run", seed=7, checkpoint_every=1)),
                   "holds a finished run with other settings", "differs in: seed (was", "now 7)", "--overwrite")
    _, status = train_or_reuse(tiny(neg_cache, tmp_path / "run", seed=7, checkpoint_every=1, overwrite=True))
    assert status == "done" and (calls[-1].seed, calls[-1].overwrite, calls[-1].resume) == (7, True, False)

    # A killed run (checkpoint, no summary) resumes instead of starting over.
    (tmp_path / "run" / "training_summary.json").unlink()
    _, status = train_or_reuse(tiny(neg_cache, tmp_path / "run", seed=7, checkpoint_every=1))
    assert status == "done" and (calls[-1].resume, calls[-1].overwrite) == (True, False)


# --------------------------------------------------------------------------- K = 0


def test_cos_nce_without_negatives_is_its_positive_term(neg_cache: Path, tmp_path: Path) -> None:
    """--k 0 ("no negatives") reads no negatives file and leaves COS-NCE g(z_T, z_S) alone, summed over layers."""
    config = tiny(neg_cache, tmp_path / "run", k=0, perturb_eps=0.0)
    run = setup_run(config)
    run.model.student.eval()
    batch = next(iter(epoch_batches(run, 0)))
    assert "negative_hidden" not in batch
    with torch.no_grad():
        terms, _ = loss_terms(run.model, batch, config, run.objective)
        out = run.model.student(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"], output_hidden_states=True)
        positive = sum((1 - torch.nn.functional.cosine_similarity(  # flat: the real tokens of a layer as one vector
            (run.model.projections.maps[i](out.hidden_states[i + 1]) * batch["attention_mask"][..., None]).flatten(1),
            (batch["teacher_hidden"][i].float() * batch["attention_mask"][..., None]).flatten(1))).mean()
            for i in range(2))
    assert terms["cos_nce"].item() == pytest.approx(positive.item(), rel=1e-5)
    assert train_student(tiny(neg_cache, tmp_path / "trained", k=0))["steps"] == 3
