"""A student cut from its teacher (pipeline/student/select.py, model.init_from_teacher) and the importance scores stage
one records for it (pipeline/cache/importance.py): tiny random models of every family, built from configs, and real
caches of real SST-2 rows."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification
from typer.testing import CliRunner

from cli import app
from conftest import assert_refused
from pipeline.cache import importance
from pipeline.cache.describe import describe
from pipeline.cache.format import sha256_file
from pipeline.cache.manifest import manifest_fingerprint, read_manifest
from pipeline.cache.reader import open_cache
from pipeline.core.config import DataConfig, layer_map
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student import select
from pipeline.student.model import init_from_teacher, resolve_auto_init, student_config
from pipeline.student.run import resolve_init, setup_run
from pipeline.student.train import train_or_reuse, train_student
from pipeline.teacher.extract import extract_teacher

TASK = {"labels": ["negative", "positive"], "is_regression": False}
FAMILIES = ["bert", "roberta", "deberta-v2", "electra", "mpnet", "distilbert"]
# Written out here, not read from pipeline/core/families.py, so a wrong table row fails: the state-dict prefix of the
# layers and, under one layer, query, key, value, attention output, FFN up and FFN down.
NAMES = {
    "bert": ("bert.encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"),
    "roberta": ("roberta.encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"),
    "deberta-v2": ("deberta.encoder.layer", "attention.self.query_proj", "attention.self.key_proj",
                   "attention.self.value_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
    "electra": ("electra.encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"),
    "mpnet": ("mpnet.encoder.layer", "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
              "intermediate.dense", "output.dense"),
    "distilbert": ("distilbert.transformer.layer", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                   "attention.out_lin", "ffn.lin1", "ffn.lin2"),
}
WORD = {f: f"{NAMES[f][0].split('.')[0]}.embeddings.word_embeddings.weight" for f in FAMILIES}
# teacher: 3 layers x 16, 4 heads of 4 dims, FFN 24; the cut student: 2 layers x 6, 3 heads of 2 dims, FFN 10
TEACHER, STUDENT = select.Shape(16, 4, 4, 24), select.Shape(6, 3, 2, 10)
MAP = layer_map(3, 2)  # [2, 3]


def teacher_config(family: str, **extra):
    sizes = dict(vocab_size=60, num_hidden_layers=3, num_attention_heads=4, hidden_size=16, intermediate_size=24,
                 max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "distilbert":
        sizes = dict(vocab_size=60, n_layers=3, n_heads=4, dim=16, hidden_dim=24, max_position_embeddings=40,
                     dropout=0.0, attention_dropout=0.0)
    if family == "electra":  # the width of its embeddings too (a smaller one: see the test below)
        sizes["embedding_size"] = 16
    if family == "deberta-v2":  # relative attention with separate position projections (c2p and p2c)
        sizes |= dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=8,
                      position_buckets=4, type_vocab_size=2, share_att_key=False)
    return CONFIG_MAPPING[family](**{**sizes, **extra})


def save_teacher(family: str, path: Path, seed: int = 0, **extra) -> AutoModelForSequenceClassification:
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(teacher_config(family, **extra)).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, so a wrong index shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_()
    model.save_pretrained(path)
    return model


def planted_scores(seed: int = 0, shared: bool = False) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Random low scores with planted high ones; returns the scores and the indices a student must keep.
    `shared`: the same heads planted in every layer (MPNet keeps one head set, see below)."""
    rng = np.random.default_rng(seed)
    scores = {"residual": rng.uniform(0, 1, (4, 16)), "ffn": rng.uniform(0, 1, (3, 24)),
              "qk": rng.uniform(0, 1, (3, 16)), "v": rng.uniform(0, 1, (3, 16)), "context": rng.uniform(0, 1, (3, 16))}
    want: dict[str, list] = {"channels": sorted(rng.choice(16, 6, replace=False)), "heads": [], "qk": [], "v": [],
                             "ffn": []}
    scores["residual"][:, want["channels"]] += 10
    same = sorted(rng.choice(4, 3, replace=False))
    for j in MAP:
        heads = same if shared else sorted(rng.choice(4, 3, replace=False))
        scores["context"][j - 1].reshape(4, 4)[heads] += 10
        want["heads"].append(heads)
        for name in ("qk", "v"):
            dims = [sorted(rng.choice(4, 2, replace=False)) for _ in heads]
            for h, d in zip(heads, dims):
                scores[name][j - 1][h * 4 + np.array(d)] += 10
            want[name].append([h * 4 + x for h, d in zip(heads, dims) for x in d])
        neurons = sorted(rng.choice(24, 10, replace=False))
        scores["ffn"][j - 1][neurons] += 10
        want["ffn"].append(neurons)
    return scores, want


def cut(family: str, teacher_dir: Path, teacher, shape: select.Shape, depth: int, scores=None, selection="activation"):
    config = student_config(teacher.config.to_dict(), depth, shape.hidden, shape.heads, shape.intermediate, TASK)
    mapping = layer_map(teacher.config.num_hidden_layers, depth)
    return init_from_teacher(config, teacher_dir, mapping, scores, selection)


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("family", FAMILIES)
def test_every_channel_kept_reproduces_the_teacher(family: str, tmp_path: Path) -> None:
    teacher = save_teacher(family, tmp_path / "t")
    scores, _ = planted_scores()  # scores or not, keeping everything keeps everything in its place
    student, kept = cut(family, tmp_path / "t", teacher, TEACHER, 3, scores)
    assert kept.tolist() == list(range(16))
    with torch.no_grad():
        a = teacher(**inputs(), output_hidden_states=True)
        b = student.eval()(**inputs(), output_hidden_states=True)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_weights_are_the_teachers_at_the_planted_indices(family: str, tmp_path: Path) -> None:
    teacher = save_teacher(family, tmp_path / "t")
    scores, want = planted_scores(seed=1, shared=family == "mpnet")
    student, kept = cut(family, tmp_path / "t", teacher, STUDENT, 2, scores)
    assert kept.tolist() == want["channels"]
    t, s = teacher.state_dict(), student.state_dict()
    c = torch.tensor(want["channels"])
    prefix, q, k, v, o, up, down = NAMES[family]
    scale = math.sqrt(2 / 4)
    for i, j in enumerate(MAP):
        qk, vo, ffn = (torch.tensor(want[n][i]) for n in ("qk", "v", "ffn"))
        T = lambda m, p: t[f"{prefix}.{j - 1}.{m}.{p}"]  # noqa: E731
        S = lambda m, p: s[f"{prefix}.{i}.{m}.{p}"]  # noqa: E731
        assert torch.allclose(S(q, "weight"), T(q, "weight")[qk][:, c] * scale)
        assert torch.allclose(S(q, "bias"), T(q, "bias")[qk] * scale)
        assert torch.equal(S(k, "weight"), T(k, "weight")[qk][:, c]) and torch.equal(S(k, "bias"), T(k, "bias")[qk])
        assert torch.equal(S(v, "weight"), T(v, "weight")[vo][:, c]) and torch.equal(S(v, "bias"), T(v, "bias")[vo])
        assert torch.equal(S(o, "weight"), T(o, "weight")[c][:, vo]) and torch.equal(S(o, "bias"), T(o, "bias")[c])
        assert torch.equal(S(up, "weight"), T(up, "weight")[ffn][:, c]) and torch.equal(S(up, "bias"), T(up, "bias")[ffn])
        assert torch.equal(S(down, "weight"), T(down, "weight")[c][:, ffn])
        norms = [key for key in s if key.startswith(f"{prefix}.{i}.") and "norm" in key.lower()]
        assert len(norms) == 4  # two LayerNorms' weights and biases
        for key in norms:
            assert torch.equal(s[key], t[key.replace(f"{prefix}.{i}.", f"{prefix}.{j - 1}.")][c]), key
    assert torch.equal(s[WORD[family]], t[WORD[family]][:, c])
    head = {"bert": "classifier.weight", "distilbert": "classifier.weight"}.get(family, "classifier.out_proj.weight")
    if family == "deberta-v2":
        head = "classifier.weight"
    assert torch.equal(s[head], t[head][:, c])
    if family == "deberta-v2":  # the position projections keep the Q/K dims; the query-like one the rescale too
        qk = torch.tensor(want["qk"][0])
        pq, pk = f"{prefix}.1.attention.self.pos_query_proj.weight", f"{prefix}.1.attention.self.pos_key_proj.weight"
        assert torch.allclose(s[pq.replace(".1.", ".0.")], t[pq][qk][:, c] * scale)
        assert torch.equal(s[pk.replace(".1.", ".0.")], t[pk][qk][:, c])
        rel = "deberta.encoder.rel_embeddings.weight"
        assert torch.equal(s[rel], t[rel][:, c])
    with torch.no_grad():
        assert torch.isfinite(student.eval()(**inputs()).logits).all()


def test_electra_with_narrower_embeddings_keeps_them_and_cuts_their_projection(tmp_path: Path) -> None:
    teacher = save_teacher("electra", tmp_path / "t", embedding_size=8)
    scores, want = planted_scores(seed=4)
    student, kept = cut("electra", tmp_path / "t", teacher, STUDENT, 2, scores)
    t, s = teacher.state_dict(), student.state_dict()
    assert student.config.embedding_size == 8 and torch.equal(s[WORD["electra"]], t[WORD["electra"]])
    project = "electra.embeddings_project.weight"
    assert torch.equal(s[project], t[project][torch.tensor(want["channels"])])


def test_deberta_convolution_is_cut_on_both_sides_and_a_grouped_one_refused(tmp_path: Path) -> None:
    teacher = save_teacher("deberta-v2", tmp_path / "t", conv_kernel_size=3)
    scores, want = planted_scores(seed=5)
    student, _ = cut("deberta-v2", tmp_path / "t", teacher, STUDENT, 2, scores)
    c, key = torch.tensor(want["channels"]), "deberta.encoder.conv.conv.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key][c][:, c])
    grouped = save_teacher("deberta-v2", tmp_path / "g", conv_kernel_size=3, conv_groups=2)
    assert_refused(lambda: cut("deberta-v2", tmp_path / "g", grouped, STUDENT, 2, scores), "grouped convolution")


def test_mpnet_keeps_one_head_set_for_its_shared_position_bias(tmp_path: Path) -> None:
    teacher = save_teacher("mpnet", tmp_path / "t")
    scores, _ = planted_scores(seed=2)
    student, _ = cut("mpnet", tmp_path / "t", teacher, STUDENT, 2, scores)
    head_score = scores["context"].reshape(3, 4, 4).sum(-1)[[j - 1 for j in MAP]]
    shared = np.sort(np.argsort(-(head_score / head_score.mean(1, keepdims=True)).sum(0), kind="stable")[:3])
    key = "mpnet.encoder.relative_attention_bias.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key][:, torch.tensor(shared)])
    v = student.state_dict()["mpnet.encoder.layer.0.attention.attn.v.weight"]
    heads_used = sorted({int(r) // 4 for r in np.nonzero(np.isin(
        teacher.state_dict()["mpnet.encoder.layer.1.attention.attn.v.weight"][:, 0].numpy(), v[:, 0].numpy()))[0]})
    assert heads_used == shared.tolist()


def test_uniform_and_scoreless_selection_are_evenly_spaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher = save_teacher("bert", tmp_path / "t")
    scores, _ = planted_scores()
    _, kept = cut("bert", tmp_path / "t", teacher, STUDENT, 2, scores, "uniform")
    assert kept.tolist() == [0, 2, 5, 8, 10, 13]  # floor(k * 16 / 6)
    with caplog.at_level(logging.INFO, logger="pipeline.student.model"):
        _, none = cut("bert", tmp_path / "t", teacher, STUDENT, 2, None, "activation")
    assert none.tolist() == kept.tolist()
    assert sum("no importance scores" in r.getMessage() for r in caplog.records) == 1


def attention_scores(state: dict[str, torch.Tensor], names: tuple[str, ...], layer: int, x: torch.Tensor,
                     heads: int, head_dim: int) -> torch.Tensor:
    """(heads, L, L) q.k / sqrt(head_dim) of one layer computed from its weights, for residual input x (L, d)."""
    prefix, q, k = names[:3]
    w = lambda m, p: state[f"{prefix}.{layer}.{m}.{p}"]  # noqa: E731
    qs = (x @ w(q, "weight").T + w(q, "bias")).reshape(len(x), heads, head_dim).transpose(0, 1)
    ks = (x @ w(k, "weight").T + w(k, "bias")).reshape(len(x), heads, head_dim).transpose(0, 1)
    return qs @ ks.transpose(1, 2) / math.sqrt(head_dim)


def test_q_rescale_gives_the_teachers_scores_on_the_kept_dims_and_a_mismatch_fails(tmp_path: Path) -> None:
    teacher = save_teacher("bert", tmp_path / "t")
    scores, want = planted_scores(seed=3)
    student, kept = cut("bert", tmp_path / "t", teacher, STUDENT, 2, scores)
    t, s = teacher.state_dict(), student.state_dict()
    x_s = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    x_t = torch.zeros(5, 16)
    x_t[:, torch.tensor(kept)] = x_s  # the teacher's residual on the kept channels, zero elsewhere
    # The teacher's scores summed over the kept dims only, at the teacher's 1/sqrt(4).
    names = NAMES["bert"]
    qw, qb = t[f"{names[0]}.1.{names[1]}.weight"], t[f"{names[0]}.1.{names[1]}.bias"]
    kw, kb = t[f"{names[0]}.1.{names[2]}.weight"], t[f"{names[0]}.1.{names[2]}.bias"]
    dims = torch.tensor(want["qk"][0])
    qt, kt = (x_t @ qw.T + qb)[:, dims], (x_t @ kw.T + kb)[:, dims]
    expected = torch.stack([qt[:, h * 2:h * 2 + 2] @ kt[:, h * 2:h * 2 + 2].T for h in range(3)]) / math.sqrt(4)
    got = attention_scores(s, names, 0, x_s, 3, 2)
    assert torch.allclose(got, expected, atol=1e-5)
    # Q/K pairing: a student whose K rows of one head came from other dims than its Q rows gives other scores.
    planted = dict(s)
    key = f"{names[0]}.0.{names[2]}.weight"
    planted[key] = planted[key].clone()
    head = want["heads"][0][0]
    other = [head * 4 + x for x in range(4) if head * 4 + x not in want["qk"][0][:2]]  # the head's dropped dims
    planted[key][[0, 1]] = t[f"{names[0]}.1.{names[2]}.weight"][other][:, torch.tensor(kept)]
    assert not torch.allclose(attention_scores(planted, names, 0, x_s, 3, 2), expected, atol=1e-5)
    # V/O pairing: with V's output fed through o, the student's attention output on one token equals the
    # teacher's restricted to the kept V dims and kept channels.
    vw, vb = t[f"{names[0]}.1.{names[3]}.weight"], t[f"{names[0]}.1.{names[3]}.bias"]
    ow = t[f"{names[0]}.1.{names[4]}.weight"]
    vdims = torch.tensor(want["v"][0])
    teacher_out = ((x_t @ vw.T + vb)[:, vdims] @ ow[:, vdims].T)[:, torch.tensor(kept)]
    sv = x_s @ s[f"{names[0]}.0.{names[3]}.weight"].T + s[f"{names[0]}.0.{names[3]}.bias"]
    assert torch.allclose(sv @ s[f"{names[0]}.0.{names[4]}.weight"].T, teacher_out, atol=1e-5)
    swapped = s[f"{names[0]}.0.{names[4]}.weight"][:, [1, 0, 2, 3, 4, 5]]  # o's columns out of step with V's rows
    assert not torch.allclose(sv @ swapped.T, teacher_out, atol=1e-5)


def test_refusals_are_one_line(tmp_path: Path) -> None:
    teacher = save_teacher("bert", tmp_path / "t")
    assert_refused(lambda: cut("bert", tmp_path / "t", teacher, select.Shape(20, 4, 5, 24), 2), "wider", "--hidden")
    assert_refused(lambda: cut("bert", tmp_path / "t", teacher, select.Shape(16, 8, 2, 24), 2), "more heads")
    assert_refused(lambda: cut("bert", tmp_path / "t", teacher, select.Shape(16, 2, 8, 24), 2), "larger head dim")
    assert_refused(lambda: cut("bert", tmp_path / "t", teacher, select.Shape(16, 4, 4, 32), 2), "larger FFN")
    assert_refused(lambda: TrainConfig(cache_dir=tmp_path, output_dir=tmp_path / "r", init_selection="magnitude"),
                   "--init-selection 'magnitude'", "activation, uniform")


def test_projection_scatter_puts_kept_channels_back() -> None:
    weight = select.scatter(np.array([1, 4, 5]), 8)
    h = torch.tensor([[2.0, 3.0, 4.0]])
    assert (h @ weight.T).tolist() == [[0, 2.0, 0, 0, 3.0, 4.0, 0, 0]]


# --------------------------------------------------------------------------- scores in the cache


@pytest.fixture(scope="module")
def scored_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, glue_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("scored") / "sst2"
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=48)
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, student_layers=2, shard_rows=16,
                                  device="cpu"))
    build_negatives(NegativesConfig(cache_dir=out, k=2))
    return out


def test_cache_scores_are_the_teachers_means_checksummed_and_reproducible(scored_cache: Path, tiny_teacher: Path,
                                                                         glue_dir: Path, tmp_path: Path) -> None:
    from conftest import ArrowRows

    manifest = read_manifest(scored_cache)
    entry = manifest["importance"]
    assert entry["sha256"] == sha256_file(scored_cache / importance.FILE)
    assert f"importance   importance.npz: channel, head and neuron scores over {entry['tokens']} train tokens" in \
        describe(open_cache(scored_cache))
    verified = CliRunner().invoke(app, ["inspect-cache", str(scored_cache), "--verify"])
    assert verified.exit_code == 0 and "importance scores" in verified.stdout
    scores = importance.load(scored_cache, manifest)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    rows = ArrowRows(scored_cache, "train")
    states, tokens = None, 0
    for r in range(48):  # one row at a time, no padding: mean |h| per channel from the teacher itself
        ids = torch.tensor([rows.example(r)["input_ids"].tolist()])
        with torch.no_grad():
            hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        part = torch.stack([h[0].double().abs().sum(0) for h in hs])
        states, tokens = part if states is None else states + part, tokens + ids.shape[1]
    assert entry["tokens"] == tokens
    assert np.allclose(scores["residual"], (states / tokens).numpy(), rtol=1e-5)
    assert scores["ffn"].shape == (4, 64) and scores["qk"].shape == scores["v"].shape == (4, 32)
    assert (scores["ffn"] > 0).all() and (scores["context"] > 0).all()
    # the same rows again: the sums re-assembled from the shards' sums, then every row extracted anew
    again = tmp_path / "again"
    shutil.copytree(scored_cache, again)
    (again / importance.FILE).unlink()
    (again / "manifest.json").unlink()
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=48)
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=again, student_layers=2, shard_rows=16,
                                  device="cpu"))
    assert read_manifest(again)["importance"]["sha256"] == entry["sha256"]
    assert read_manifest(again)["fingerprint"] == manifest["fingerprint"]
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=again, student_layers=2, shard_rows=16,
                                  device="cpu", overwrite=True))  # --overwrite owns a cache holding importance.npz
    assert read_manifest(again)["importance"]["sha256"] == entry["sha256"]


def test_a_narrow_teacher_init_trains_with_scattered_projections(scored_cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache_dir=scored_cache, output_dir=tmp_path / "run", layers=2, hidden=16, heads=2,
                         intermediate=40, init="teacher", k=2, max_steps=2, num_workers=0, device="cpu")
    maps = setup_run(config).model.projections.maps
    assert len(maps[0].weight.nonzero()) == 16 and torch.equal(maps[0].weight.sum(0), torch.ones(16))
    assert torch.equal(maps[0].weight, maps[1].weight)  # one channel set for every layer
    summary = train_student(replace(config, output_dir=tmp_path / "run2"))
    assert summary["steps"] == 2


def test_an_old_cache_without_scores_falls_back_with_one_line(scored_cache: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "old"
    shutil.copytree(scored_cache, old)
    # A cache whose extraction recorded no scores (a shard without its sums): no entry, no file, and a manifest
    # whose fingerprint and `files` say so, as assemble_manifest writes it then.
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["importance"], manifest["files"][importance.FILE]
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / importance.FILE).unlink()
    with caplog.at_level(logging.INFO):
        summary = train_student(TrainConfig(cache_dir=old, output_dir=tmp_path / "run", layers=2, hidden=16, heads=2,
                                            intermediate=40, init="teacher", k=2, negatives_source="in-batch",
                                            max_steps=1, num_workers=0, device="cpu", verify_cache="full"))
    assert summary["steps"] == 1
    assert sum("no importance scores" in r.getMessage() for r in caplog.records) == 1


def test_damaged_scores_are_refused_in_one_line(scored_cache: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(scored_cache, damaged)
    data = bytearray((damaged / importance.FILE).read_bytes())
    data[-20] ^= 0xFF
    (damaged / importance.FILE).write_bytes(bytes(data))
    assert_refused(lambda: train_student(TrainConfig(cache_dir=damaged, output_dir=tmp_path / "run", layers=2, hidden=16,
                                                     heads=2, intermediate=40, init="teacher", k=2, max_steps=1,
                                                     num_workers=0, device="cpu")),
                   "importance.npz", "does not match its checksum", "--overwrite")
    assert not (tmp_path / "run").exists()


def test_general_distillation_from_a_cut_teacher(corpus_cache: Path, tmp_path: Path) -> None:  # noqa: F811
    cache = tmp_path / "corpus"
    shutil.copytree(corpus_cache, cache)
    build_negatives(NegativesConfig(cache_dir=cache, k=2))
    assert "importance" in read_manifest(cache)
    summary = train_student(TrainConfig(cache_dir=cache, output_dir=tmp_path / "general", layers=2, hidden=16,
                                        heads=2, intermediate=32, init="teacher", k=2, max_steps=2, num_workers=0,
                                        device="cpu"))
    assert summary["kind"] == "general" and summary["steps"] == 2


def test_auto_init_cuts_the_teacher_where_the_student_fits_and_says_why_not(scored_cache: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    base = TrainConfig(cache_dir=scored_cache, output_dir=scored_cache.parent / "unused", layers=2, hidden=16,
                       heads=2, intermediate=40, k=2)
    assert base.init == "auto"
    assert resolve_init(base).init == "teacher"
    assert resolve_init(replace(base, init="random")).init == "random"  # an explicit choice stays
    with caplog.at_level(logging.INFO):
        for larger, why in (({"hidden": 64, "heads": 4}, "--hidden gives 64, the teacher has 32"),
                            ({"intermediate": 80}, "--intermediate gives 80, the teacher has 64"),
                            ({"heads": 8}, "--heads gives 8, the teacher has 4"),
                            ({"hidden": 32, "heads": 2}, "--hidden / --heads gives 16, the teacher has 8"),
                            ({"layers": 5, "layer_map": (1, 1, 2, 3, 4)}, "--layers gives 5, the teacher has 4")):
            caplog.clear()
            assert resolve_init(replace(base, **larger)).init == "random", larger
            assert why in caplog.text and "random weights" in caplog.text
    teacher = read_manifest(scored_cache)["teacher"]["config"]
    shape = student_config(teacher, 2, 16, 2, 40, read_manifest(scored_cache)["task"])
    assert resolve_auto_init(teacher, None, shape, None) == ("random", "the cache holds no teacher weights")
    assert resolve_auto_init(teacher, scored_cache / "teacher_weights", shape, "roberta")[0] == "random"


def test_auto_init_trains_from_the_cut_and_is_the_same_run_as_init_teacher(scored_cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache_dir=scored_cache, output_dir=tmp_path / "run", layers=2, hidden=16, heads=2,
                         intermediate=40, k=2, max_steps=1, num_workers=0, device="cpu")
    summary, status = train_or_reuse(config)
    assert status == "done" and summary["config"]["init"] == "teacher"  # what the run started from, recorded
    assert train_or_reuse(replace(config, init="teacher")) == (summary, "reused")
    refused = assert_refused(lambda: train_or_reuse(replace(config, init="random")), "init", "--overwrite")
    assert "differs in" in refused
