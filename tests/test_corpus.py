"""Corpus caches (general distillation): reading unlabeled text, windows of long passages, a cache with
no labels or logits and `kind: corpus`, negatives over it, and the kind checks between task and corpus."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoTokenizer, BertModel

from conftest import CORPUS_MAX_LENGTH as MAX_LENGTH, assert_refused, corpus_lines
from pipeline.cache.manifest import read_manifest
from pipeline.cache.reader import Cache, open_cache
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig
from pipeline.core.train_config import SweepConfig, TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.sampler import NegativeSampler
from pipeline.teacher.corpus import cache_kind, glue_sentences, read_passages
from pipeline.teacher.extract import extract_teacher

def test_corpus_cache_windows_without_labels(corpus_cache: Path, encoder: Path, glue_dir: Path) -> None:
    manifest = read_manifest(corpus_cache)
    assert manifest["kind"] == "corpus" and manifest["task"] is None
    assert list(manifest["splits"]) == ["train"]  # no dev split: nothing to score without labels
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    passages = [p for p in corpus_lines(glue_dir) if p]
    body = MAX_LENGTH - 2  # [CLS] and [SEP] in every window
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
    expected = [[tokenizer.cls_token_id, *t[s : s + body], tokenizer.sep_token_id]
                for t in pieces for s in range(0, len(t), body)]
    assert len(pieces[-2]) > 3 * body  # the long passage really is cut into several windows
    assert manifest["corpus"]["passages"] == len(passages) and manifest["splits"]["train"]["rows"] == len(expected)
    split = open_cache(corpus_cache).split("train").reader(pooled=True)
    got = [split.example(i)["input_ids"].tolist() for i in range(split.num_rows)]
    assert got == expected  # every token once, in order, each window with its own [CLS] ... [SEP]

    first = sorted((corpus_cache / "shards").glob("train-*.arrow"))[0]
    schema = pa.ipc.open_stream(pa.memory_map(str(first))).schema
    assert "label" not in schema.names and "logits" not in schema.names
    assert {"hidden_2", "hidden_4", "pooled"} <= set(schema.names)
    row = split.example(len(expected) - 3)  # a window from the middle of the long passage
    assert "label" not in row and "logits" not in row
    with torch.no_grad():  # the stored states are the encoder's on that window alone
        out = BertModel.from_pretrained(encoder)(input_ids=torch.from_numpy(row["input_ids"][None].astype(np.int64)), output_hidden_states=True)
    np.testing.assert_allclose(row["hidden"][4].astype(np.float32), out.hidden_states[4][0].numpy(), atol=2e-3)
    np.testing.assert_allclose(row["pooled"].astype(np.float32), out.hidden_states[4][0].mean(0).numpy(), atol=2e-3)


def test_corpus_cache_reused_and_refused_over_a_task_cache(corpus_cache: Path, encoder: Path, tiny_cache: Path,
                                                            tmp_path: Path) -> None:
    manifest = read_manifest(corpus_cache)
    config = ExtractConfig(teacher=encoder, data=None, output_dir=corpus_cache, student_layers=2,
                           max_length=MAX_LENGTH, shard_rows=8, corpus=CorpusConfig(manifest["corpus"]["source"]))
    assert extract_teacher(config)["fingerprint"] == manifest["fingerprint"]  # finished: reused, not redone
    task_copy = tmp_path / "task-cache"
    shutil.copytree(tiny_cache, task_copy)
    assert_refused(lambda: extract_teacher(replace(config, output_dir=task_copy)), "other settings", "--overwrite")


def test_kinds_task_and_corpus(corpus_cache: Path, tiny_cache: Path, tmp_path: Path) -> None:
    task_manifest = read_manifest(tiny_cache)
    assert cache_kind(task_manifest) == "task" == open_cache(tiny_cache).kind
    old = {k: v for k, v in task_manifest.items() if k != "kind"}  # written before corpus caches existed
    assert Cache(tiny_cache, old).kind == "task"
    corpus = open_cache(corpus_cache)
    assert corpus.kind == "corpus"
    assert_refused(lambda: corpus.task, "corpus cache", "--task")
    from pipeline.student.sweep import run_sweep  # a sweep reports a task metric: refused on unlabeled text

    base = TrainConfig(cache_dir=corpus_cache, output_dir=tmp_path / "sweep")
    assert_refused(lambda: run_sweep(SweepConfig(base=base, grid=(("k", (1, 2)),), output_dir=tmp_path / "sweep")),
                   "corpus cache")


def test_negatives_over_a_corpus(corpus_cache: Path, tmp_path: Path) -> None:
    split = open_cache(corpus_cache).split("train")
    keys = split.input_keys()
    duplicates = [i for i in range(len(keys)) if (keys == keys[i]).sum() > 1]
    assert len(duplicates) == 2  # the repeated sentence
    for strategy in ("random", "hard"):
        out = tmp_path / f"{strategy}.arrow"
        build_negatives(NegativesConfig(cache_dir=corpus_cache, k=2, candidates=8, strategy=strategy, output=out))
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["task"] is None and meta["strategy"] == strategy
        sampler = NegativeSampler(out, 2, 0, open_cache(corpus_cache).fingerprint)
        drawn = sampler.sample(np.arange(split.num_rows), 0)
        for row, negatives in enumerate(drawn):  # never the row itself nor a copy of its input
            assert not np.any(keys[negatives] == keys[row]), (strategy, row, negatives)


def test_read_passages_formats_and_errors(tmp_path: Path) -> None:
    texts = ["first passage", "second, with a comma", '"quoted" start']
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f'{i},"{t.replace(chr(34), chr(34) * 2)}"\n'
                                                         for i, t in enumerate(texts)))
    (tmp_path / "c.tsv").write_text("id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts, "id": [0, 1, 2]}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.csv", "c.tsv", "c.parquet"):
        assert read_passages(CorpusConfig(str(tmp_path / name), text_column="body")) == texts, name
    assert read_passages(CorpusConfig(str(tmp_path / "c.parquet"), text_column="body", max_passages=2)) == texts[:2]
    assert_refused(lambda: read_passages(CorpusConfig(str(tmp_path / "c.csv"))), "no column 'text'", "--text-column")
    assert_refused(lambda: read_passages(CorpusConfig(str(tmp_path / "c.jsonl"))), "no column 'text'", "--text-column")
    assert_refused(lambda: read_passages(CorpusConfig(str(tmp_path / "missing.txt"))), "not found")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_refused(lambda: read_passages(CorpusConfig(str(tmp_path / "blank.txt"))), "no non-blank passage")
    assert_refused(lambda: CorpusConfig(str(tmp_path / "c.txt"), max_passages=0), "--max-passages")


def test_extract_config_needs_task_or_corpus(tmp_path: Path, encoder: Path) -> None:
    from pipeline.core.config import DataConfig

    assert_refused(lambda: ExtractConfig(teacher=None, data=None, output_dir=tmp_path), "--task", "--corpus")
    assert_refused(lambda: ExtractConfig(teacher=encoder, data=DataConfig(task="sst2"), output_dir=tmp_path,
                                         corpus=CorpusConfig("x.txt")), "not both")
    assert_refused(lambda: ExtractConfig(teacher=None, data=DataConfig(task="sst2"), output_dir=tmp_path), "--teacher")
    assert ExtractConfig(teacher=None, data=None, output_dir=tmp_path, corpus=CorpusConfig("x.txt")).teacher_source \
        == "bundled:all-MiniLM-L6-v2"


def test_glue_sentences_never_read_a_dev_split(glue_dir: Path) -> None:
    sentences = glue_sentences(glue_dir)
    assert len(sentences) == len(set(sentences))
    seen = set(sentences)
    cola_train = {line.split("\t")[3] for line in (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()}
    cola_dev_only = [line.split("\t")[3] for line in (glue_dir / "CoLA" / "dev.tsv").read_text().splitlines()
                     if line.split("\t")[3] not in cola_train]
    assert cola_dev_only and not seen & set(cola_dev_only)
    assert cola_train <= seen  # every train sentence is in, labels ignored
    qnli_test = (glue_dir / "QNLI" / "test.tsv").read_text().splitlines()[1].split("\t")
    assert qnli_test[1] in seen and qnli_test[2] in seen


def test_cli_general_recipe(encoder: Path, glue_dir: Path, tmp_path: Path) -> None:
    """The README's recipe through the commands: corpus cache, negatives, general student, task student from it."""
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(glue_dir)) + "\n", encoding="utf-8")
    common = ["--teacher", str(encoder), "-o", str(tmp_path / "cache"), "--student-layers", "2", "--max-length", "16"]
    for bad, needle in ((["--task", "sst2", "--corpus", str(corpus)], "exactly one"), ([], "exactly one"),
                        (["--corpus", str(corpus), "--max-train-examples", "5"], "--max-train-examples")):
        result = runner.invoke(app, ["extract-teacher", *common, *bad])
        assert result.exit_code == 1 and needle in result.stderr and "Traceback" not in result.output, result.output
    assert not (tmp_path / "cache").exists()
    result = runner.invoke(app, ["extract-teacher", *common, "--corpus", str(corpus), "--max-passages", "10"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "cache")["corpus"]["passages"] == 10
    assert runner.invoke(app, ["build-negatives", "--cache", str(tmp_path / "cache"), "--k", "2",
                                  "--candidates", "4"]).exit_code == 0
    inspect = runner.invoke(app, ["inspect-cache", str(tmp_path / "cache")])
    assert inspect.exit_code == 0 and "10 passages" in inspect.stdout, inspect.output
    student = ["--layers", "2", "--hidden", "16", "--heads", "2", "--intermediate", "32", "--k", "2",
               "--max-steps", "2", "--device", "cpu"]
    result = runner.invoke(app, ["train-student", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "gen"),
                                 *student])
    assert result.exit_code == 0 and "general student" in result.stdout and "--init" in result.stdout, result.output
    none = runner.invoke(app, ["train-student", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "none"),
                               *student, "--intermediate-loss", "none"])
    assert none.exit_code == 1 and "--intermediate-loss none" in none.stderr, none.output
