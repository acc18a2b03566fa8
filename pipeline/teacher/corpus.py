"""Unlabeled text for general distillation: reading a corpus, cutting it into windows, the corpus cache.

A corpus cache is a cache (docs/DESIGN.md §3) whose manifest says `kind: "corpus"`: one split, `train`, of
`max_length` token windows with the pre-trained encoder's hidden states and pooled vectors, and no
labels, no logits and no dev split. Task caches say `kind: "task"`; a manifest without the key was
written before corpus caches existed and is a task cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from pipeline.cache import format as cache
from pipeline.core.config import DataConfig
from pipeline.core.data_files import read_table, readable
from pipeline.core.errors import LrcError
from pipeline.core.runtime import check_vocabulary, from_pretrained, require_tokenizer
from pipeline.core.teacher_config import CorpusConfig, ExtractConfig
from pipeline.teacher.teacher_pass import hash_tokenizer, hash_weights, resolve_layers, write_cache

log = logging.getLogger(__name__)

KIND_TASK, KIND_CORPUS = "task", "corpus"
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TEXT_SUFFIXES = (".txt", ".text")
# The unlabeled text this repository has (labels ignored, never a dev split: dev is what students are scored on).
GLUE_TRAIN_TASKS = ("cola", "sst2", "mrpc", "stsb", "wnli")
_QNLI_TEST = ("QNLI", "test.tsv", ("question", "sentence"))


def cache_kind(manifest: dict[str, Any]) -> str:
    return manifest.get("kind", KIND_TASK)  # written before corpus caches existed: a task cache


# --------------------------------------------------------------------------- reading passages


def read_passages(config: CorpusConfig) -> list[str]:
    """The corpus's non-blank passages (stripped), in order, at most `max_passages` of them."""
    path = Path(config.source).expanduser()
    if path.is_dir():
        raise LrcError(f"--corpus {path} is a directory: pass a .txt file (one passage per line) or a "
                       f"{'/'.join(TABLE_SUFFIXES)} file with --text-column")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            texts = _read_table_column(path, config.text_column)
        else:  # any other file is plain text, one passage per line
            with path.open(encoding="utf-8") as f, readable(path):
                texts = [line.rstrip("\n") for line in f]
    elif path.suffix.lower() in TABLE_SUFFIXES + TEXT_SUFFIXES or "/" in config.source and path.parent.is_dir():
        raise LrcError(f"corpus file not found: {path}: check the --corpus path")
    else:
        texts = _read_dataset(config)
    passages = [t.strip() for t in texts if t is not None and str(t).strip()]
    if config.max_passages is not None:
        passages = passages[: config.max_passages]
    if not passages:
        raise LrcError(f"--corpus {config.source} holds no non-blank passage: point at a file with text")
    log.info("read %d passages from %s (%d blank or missing skipped)", len(passages), config.source,
             len(texts) - len(passages) if config.max_passages is None else 0)
    return passages


def _read_table_column(path: Path, column: str) -> list[Any]:
    """One column of a .csv/.tsv/.jsonl/.parquet corpus, read by the task loaders' reader (one set of rules
    and one-line errors for every data file: quoting, encodings, over-long fields)."""
    table = read_table(path)
    _check_column(path, column, list(table))
    return table[column]


def _check_column(path: Path, column: str, names: list[str]) -> None:
    if column not in names:
        raise LrcError(f"{path} has no column {column!r} (it has: {', '.join(names) or 'none'}): "
                       "pass --text-column naming the text column")


def _read_dataset(config: CorpusConfig) -> list[Any]:
    """A Hugging Face dataset (online users): streamed when only the first `max_passages` are wanted."""
    streaming = config.max_passages is not None
    try:
        import datasets

        ds = datasets.load_dataset(config.source, config.dataset_config, split=config.dataset_split, streaming=streaming)
        if streaming:
            return [row[config.text_column] for row in ds.take(config.max_passages)]
        return list(ds[config.text_column])
    except Exception as exc:  # offline, no such dataset or column: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LrcError(f"--corpus {config.source!r} is not a file and did not load as a Hugging Face dataset "
                       f"({reason}): pass a local text file, or check the name, --corpus-config and --text-column") from None


def glue_sentences(data_dir: Path) -> list[str]:
    """Every sentence of the GLUE train splits in data_dir (both sides of pairs) and of QNLI test, deduplicated
    in first-seen order. Labels are ignored and no dev split is read: dev is what students are scored on."""
    from pipeline.core.task_data import load_examples

    texts: list[str] = []
    for task in GLUE_TRAIN_TASKS:
        examples = load_examples(DataConfig(task=task, data_dir=Path(data_dir)), "train")
        texts += examples.text_a + (examples.text_b or [])
    folder, name, columns = _QNLI_TEST
    path = Path(data_dir) / folder / name
    if not path.is_file():
        raise LrcError(f"{path} not found: pass --data-dir pointing at a glue_data/ folder that has QNLI/test.tsv")
    table = read_table(path)  # GLUE's TSV rules: quoting off, BOM and header handled
    texts += [text for row in zip(*(table[c] for c in columns)) for text in row]  # row order: question, sentence
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


# --------------------------------------------------------------------------- windows


def windows(tokenizer: PreTrainedTokenizerBase, passages: list[str], max_length: int,
            chunk: int = 10_000) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Cut each passage into consecutive token windows of at most `max_length` tokens, each with the
    special tokens the tokenizer adds ([CLS] ... [SEP] for BERT). Returns ids, segment ids, and the
    passage index of each window."""
    if not getattr(tokenizer, "is_fast", False):
        raise LrcError("cutting passages into windows needs a fast tokenizer (tokenizer.json): pass a --teacher "
                       "whose tokenizer has one")
    ids: list[list[int]] = []
    types: list[list[int]] = []
    passage_of: list[int] = []
    for start in range(0, len(passages), chunk):  # bounded batches: the tokenizer's output for all at once is large
        enc = tokenizer(passages[start : start + chunk], truncation=True, max_length=max_length,
                        return_overflowing_tokens=True, stride=0)
        ids += enc["input_ids"]
        types += enc["token_type_ids"] if "token_type_ids" in enc else [[0] * len(x) for x in enc["input_ids"]]
        passage_of += [start + i for i in enc["overflow_to_sample_mapping"]]
    return ids, types, passage_of


# --------------------------------------------------------------------------- the corpus cache


def load_encoder(source: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The encoder without any task head (AutoModel drops one if the dir has it) and its tokenizer, with the
    checks every model dir gets: tokenizer files present, no code run unless asked, damage as one line."""
    if "/" in source and not Path(source).exists() and Path(source).parent.is_dir():
        raise LrcError(f"--teacher {source} does not exist: pass a model dir (any encoder; default: the bundled "
                       "all-MiniLM-L6-v2)")
    require_tokenizer(Path(source), "--teacher")
    model = from_pretrained(AutoModel.from_pretrained, source, "--teacher", trust_remote_code)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "--teacher", trust_remote_code)
    check_vocabulary(model, tokenizer, f"--teacher {source}")
    return model, tokenizer


def extract_corpus(config: ExtractConfig) -> dict[str, Any]:
    """Encoder + unlabeled text -> corpus cache dir; resumes a killed run; returns the manifest."""
    from pipeline.teacher.finetune import resolve_backbone

    assert config.corpus is not None
    source = resolve_backbone(config.teacher_source)
    model, tokenizer = load_encoder(source, config.trust_remote_code)
    layers = resolve_layers(config, model.config.num_hidden_layers)
    passages = read_passages(config.corpus)
    ids, types, _ = windows(tokenizer, passages, config.max_length)
    weights = hash_weights(Path(source)) if Path(source).is_dir() else f"hub:{source}"
    settings = corpus_settings(config, model, hash_tokenizer(tokenizer), weights, layers, passages, len(ids))
    manifest, work = write_cache(model, tokenizer, config, settings, {"train": (ids, types, None)}, layers, None,
                                 {"teacher_path": source})
    if work is None:
        return manifest
    done, elapsed = work
    info = manifest["splits"]["train"]
    log.info("corpus cache written to %s: %d passages -> %d windows, %d tokens, %.1f MB; %d windows extracted in "
             "%.0f s (%.1f windows/s)", config.output_dir, len(passages), info["rows"], sum(map(len, ids)), info["bytes"] / 1e6,
             done, elapsed, done / max(elapsed, 1e-9))
    return manifest


def corpus_settings(config: ExtractConfig, model: torch.nn.Module, tokenizer_sha256: str, weights_sha256: str,
                    layers: list[int], passages: list[str], rows: int) -> dict[str, Any]:
    """Everything that decides a corpus cache's bytes; a resumed run must match it exactly."""
    assert config.corpus is not None
    digest = hashlib.sha256()
    for passage in passages:
        digest.update(passage.encode() + b"\n")
    source = Path(config.corpus.source).expanduser()
    settings = {
        "kind": KIND_CORPUS,
        "teacher": {"config": model.config.to_dict(), "weights_sha256": weights_sha256,
                    "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size},
        "tokenizer_sha256": tokenizer_sha256,
        "task": None,
        "corpus": {"source": str(source.resolve()) if source.is_file() else config.corpus.source,
                   "text_column": config.corpus.text_column, "dataset_config": config.corpus.dataset_config,
                   "dataset_split": config.corpus.dataset_split, "max_passages": config.corpus.max_passages,
                   "passages": len(passages), "windows": rows, "sha256": digest.hexdigest(),
                   "windowing": "consecutive max_length token windows of each passage, special tokens added per window"},
        **cache.storage_settings(config, model.config, layers),
        "splits": {"train": {"rows": rows, "hidden": True}},
    }
    return json.loads(json.dumps(settings))  # compared with the JSON copy on resume: normalise now
