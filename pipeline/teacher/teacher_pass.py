"""The teacher pass every cache is made by (task caches in pipeline/teacher/extract.py, corpus caches in
pipeline/teacher/corpus.py): the output dir, the tokenizer and weights copied in, the teacher run over each split's
missing shards, the importance scores and the manifest (docs/DESIGN.md §3). It knows nothing of where the
rows came from; both callers tokenise, build their settings and hand over the rows."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline.cache import format as cache, importance, manifest as cache_manifest, quant
from pipeline.core import atomic, distributed, outdir, reuse
from pipeline.core.config import layer_map
from pipeline.core.errors import LrcError
from pipeline.core.families import require_layer_outputs
from pipeline.core.runtime import all_finite, autocast, pad_batch
from pipeline.core.task_data import Examples
from pipeline.core.tasks import TaskSpec
from pipeline.core.teacher_config import ExtractConfig

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _InputSpec:
    """How this tokenizer pads and whether the model takes segment ids."""

    pad_id: int
    segments: bool


def write_cache(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: ExtractConfig, settings: dict[str, Any],
    splits: dict[str, tuple[list[list[int]], list[list[int]], Examples | None]], layers: list[int],
    task: TaskSpec | None, extra: dict[str, Any],
) -> tuple[dict[str, Any], tuple[int, float] | None]:
    """What every cache (task or corpus) does once its settings are known: refuse a model without one hidden
    state per layer, create, resume or refuse the output dir, copy the tokenizer and weights in, run the
    teacher over each split's missing shards and assemble the manifest. `splits`: name -> (ids, types,
    examples or None for a corpus). Returns the manifest and (rows extracted now, seconds), or None for the
    second when the cache was already complete."""
    first_ids = next(iter(splits.values()))[0][0]
    require_layer_outputs(model, first_ids)  # COS-NCE needs (B, L, d') per layer: refuse now, not mid-run
    out, ranks = config.output_dir, distributed.current()
    outdir.refuse_nested(out, {"teacher dir": config.teacher})
    # Rank 0 alone creates, resumes or refuses the dir and copies the tokenizer and weights in; the others
    # wait, then find the dir ready (or complete, with a manifest).
    if ranks.is_main and prepare_output_dir(out, settings, config.overwrite):
        log.info("cache %s is already complete with these settings: nothing to do", out)
    elif ranks.is_main:
        save_tokenizer(tokenizer, out)
        save_teacher_weights(model, out)
    distributed.barrier(ranks)
    if (out / cache.MANIFEST).is_file():
        return cache_manifest.read_manifest(out), None

    device = distributed.device_for(ranks, config.device)
    model.to(device).eval()
    # Models without segment embeddings (MPNet, RoBERTa) reject token_type_ids; their pad id may not be 0.
    inputs = _InputSpec(tokenizer.pad_token_id or 0, "token_type_ids" in tokenizer.model_input_names)
    started, rows_done = time.perf_counter(), 0
    for split, (ids, types, examples) in splits.items():
        rows_done += extract_split(model, config, device, inputs, split, ids, types, examples, layers, task, ranks)
    # Every rank's shards are on disk (with their sidecars) before rank 0 assembles the manifest from them.
    distributed.barrier(ranks)
    manifest = None
    if ranks.is_main:
        hidden = [split for split, info in settings["splits"].items() if info["hidden"]]
        scores = importance.assemble(out, [p for split in hidden for _, _, p in cache.present_shards(out, split)])
        manifest = cache_manifest.assemble_manifest(out, settings, extra, scores)
    distributed.barrier(ranks)
    return manifest or cache_manifest.read_manifest(out), (rows_done, time.perf_counter() - started)


def resolve_layers(config: ExtractConfig, num_layers: int) -> list[int]:
    if config.all_layers:
        return list(range(1, num_layers + 1))
    if config.layers is not None:
        outside = [j for j in config.layers if j > num_layers]
        if outside:
            raise LrcError(f"--layers {outside} outside the teacher's depth: it has layers 1..{num_layers}")
        return sorted(config.layers)
    if config.student_layers > num_layers:
        raise LrcError(
            f"--student-layers {config.student_layers} is deeper than the teacher ({num_layers} layers): "
            "pass a smaller depth or --layers explicitly"
        )
    return layer_map(num_layers, config.student_layers)


def hash_weights(teacher_dir: Path) -> str:
    files = sorted(p for p in Path(teacher_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + cache.sha256_file(path).encode())
    return digest.hexdigest()


def hash_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_output_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create, resume or refuse the output dir; True when it already holds the finished cache."""
    is_cache = outdir.check(out, "cache", overwrite)  # refuses a dir that is not an lrc cache
    recorded = is_cache and not overwrite and (out / cache.SETTINGS).is_file()
    previous = json.loads((out / cache.SETTINGS).read_text()) if recorded else {}
    # A cache without its manifest is an extraction that stopped: it resumes from the shards present.
    held = reuse.EMPTY if not is_cache else reuse.FINISHED if (out / cache.MANIFEST).is_file() else reuse.RESUMABLE
    decision = reuse.decide(held, reuse.diff(previous, settings), overwrite=overwrite, where=out, what="a cache")
    if decision == reuse.REUSE:
        return True
    if decision == reuse.REPLACE:
        outdir.clear(out, "cache")
    elif decision == reuse.RESUME:
        cache.remove_temp_files(out)
        log.info("resuming the unfinished cache in %s", out)
    outdir.mark(out, "cache")
    atomic.write_json(out / cache.SETTINGS, settings, sort_keys=True)
    return False


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Copy the tokenizer into the cache so later stages never open the teacher dir."""
    _save_once(tokenizer, out / cache.TOKENIZER_DIR)


def save_teacher_weights(model: torch.nn.Module, out: Path) -> None:
    """The teacher's weights, so `train-student --init teacher` copies layers without the teacher dir."""
    _save_once(model, out / cache.TEACHER_WEIGHTS_DIR)


def _save_once(saveable: Any, final: Path) -> None:
    """A resumed extraction keeps the copy it made: the dir appears whole (atomic.save_pretrained) or not at all."""
    if not final.is_dir():
        atomic.save_pretrained(final, saveable)


# --------------------------------------------------------------------------- the teacher pass


def extract_split(
    model: torch.nn.Module, config: ExtractConfig, device: torch.device, inputs: _InputSpec, split: str,
    ids: list[list[int]], types: list[list[int]], examples: Examples | None, layers: list[int], task: TaskSpec | None,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> int:
    """Write every missing shard of this rank's share of a split; returns the number of rows extracted now.

    task None: a corpus split (unlabeled windows), written without labels and logits. Rank r of W owns the
    shards r, r + W, ...: whole shards, so no two ranks ever write (or check) the same file, and the files
    and bytes are those of one process (a shard's rows do not depend on who runs them).
    """
    with_hidden = split == "train"
    schema = cache.shard_schema(layers, model.config.hidden_size, task.num_labels if task else None,
                                task is not None and task.is_regression, config.hidden_dtype, with_hidden)
    out, n = config.output_dir, len(ids)
    mine = [(s, min(s + config.shard_rows, n)) for s in range(0, n, config.shard_rows)][ranks.rank :: ranks.world_size]
    done = {(start, stop) for start, stop, _ in cache.trusted_shards(out, split, set(mine))}  # what a killed run left
    todo = [r for r in mine if r not in done]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shards already present, extracting the rest", split, len(done), len(done) + len(todo))
    labels = None if task is None or examples is None else \
        np.asarray(examples.labels, dtype=np.float32 if task.is_regression else np.int64)
    total = sum(stop - start for start, stop in todo)

    def write(start: int, stop: int, shard: dict[str, Any]) -> None:
        if "importance" in shard:  # before the shard: a shard on disk always has its sums
            (out / cache.SHARD_DIR).mkdir(parents=True, exist_ok=True)
            importance.write_arrays(importance.sums_path(out / cache.SHARD_DIR / cache.shard_name(split, start, stop)),
                                    shard["importance"])
        batch = cache.make_record_batch(
            schema, np.arange(start, stop), [np.asarray(x) for x in ids[start:stop]],
            [np.asarray(x) for x in types[start:stop]], labels[start:stop] if labels is not None else None,
            shard.get("logits"),
            shard.get("hidden"), shard.get("pooled"), shard.get("scales"),
        )
        cache.write_shard(out, split, start, stop, batch)

    # One writer thread encodes and writes shard i while the teacher runs shard i+1 (Arrow and file
    # I/O release the GIL); waiting on the previous write first bounds memory to two shards.
    with ThreadPoolExecutor(max_workers=1) as writer, \
            tqdm(total=total, desc=f"extract {split}", unit="ex", dynamic_ncols=True, disable=not ranks.is_main) as bar:
        pending = None
        for start, stop in todo:
            shard = run_shard(model, config, device, inputs, ids[start:stop], types[start:stop], layers, with_hidden, bar,
                              with_logits=task is not None)
            check_finite_outputs(shard, [len(x) for x in ids[start:stop]], split, start, config)
            if pending is not None:
                pending.result()
            pending = writer.submit(write, start, stop, shard)
        if pending is not None:
            pending.result()
    return total


@torch.inference_mode()
def run_shard(
    model: torch.nn.Module, config: ExtractConfig, device: torch.device, inputs: _InputSpec, ids: list[list[int]],
    types: list[list[int]], layers: list[int], with_hidden: bool, bar: tqdm, with_logits: bool = True,
) -> dict[str, Any]:
    """Teacher outputs for one shard's rows, in row order; batches are length-sorted to cut padding."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    width, last = model.config.hidden_size, model.config.num_hidden_layers
    (dtype, pooled_dtype), quantized = cache.STORAGE[config.hidden_dtype], config.hidden_dtype == quant.INT8
    logits = np.empty((len(ids), model.config.num_labels), np.float32) if with_logits else None  # an encoder has none
    hidden = {j: np.empty((offsets[-1], width), dtype) for j in layers} if with_hidden else None
    scales = {j: np.empty(offsets[-1], np.float32) for j in layers} if with_hidden and quantized else None
    pooled = np.empty((len(ids), width), pooled_dtype) if with_hidden else None
    order = np.argsort(-lengths, kind="stable")
    # Scores for a narrower `--init teacher`, from this same forward (pipeline/cache/importance.py).
    recorder = importance.Recorder(model) if with_hidden else None
    with recorder if recorder is not None else contextlib.nullcontext():
        for b in range(0, len(order), config.batch_size):
            rows = order[b : b + config.batch_size]
            input_ids, token_types, mask = pad_batch([ids[r] for r in rows], [types[r] for r in rows], inputs.pad_id,
                                                     device)
            segments = {"token_type_ids": token_types} if inputs.segments else {}
            with autocast(device, config.precision), \
                    recorder.batch(mask) if recorder is not None else contextlib.nullcontext():
                output = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=with_hidden, **segments)
            if logits is not None:
                logits[rows] = output.logits.float().cpu().numpy()
            if with_hidden:
                recorder.add_states(output.hidden_states, mask)
                real = mask.bool()  # (B, L); padding is on the right, so real tokens come out in row order
                dest = _token_destinations(offsets[rows], lengths[rows])
                for j in layers:
                    states = output.hidden_states[j][real]  # (T, d')
                    if scales is not None:  # quantised on the device: a quarter of the float32 bytes cross to the host
                        q, s = quant.quantize(states)
                        hidden[j][dest], scales[j][dest] = q.cpu().numpy(), s.cpu().numpy()
                    else:
                        hidden[j][dest] = states.to(getattr(torch, config.hidden_dtype)).cpu().numpy()  # float16/32
                top = output.hidden_states[last].float() * real.unsqueeze(-1)  # (B, L, d')
                pooled[rows] = (top.sum(1) / real.sum(1, keepdim=True)).cpu().numpy().astype(pooled.dtype)  # (B, d')
            bar.update(len(rows))
    result: dict[str, Any] = {"logits": logits} if logits is not None else {}
    if with_hidden:
        result |= {"hidden": hidden, "pooled": pooled, "importance": recorder.totals()}
    if scales is not None:
        result["scales"] = scales
    return result


def check_finite_outputs(shard: dict[str, Any], lengths: list[int], split: str, start: int,
                         config: ExtractConfig) -> None:
    """Refuse NaN or inf in a shard's teacher outputs before it is written, naming the rows. The
    teacher's weights were checked at load, so what is left is overflow: in bf16 compute, or of
    hidden states beyond float16's range (65504) in storage."""
    def rows(bad_rows: np.ndarray) -> str:
        found = (start + np.flatnonzero(bad_rows)).tolist()
        return f"{split} row(s) {', '.join(map(str, found[:5]))}{' ...' if len(found) > 5 else ''} ({len(found)} in all)"

    # int8 values are always finite: a non-finite teacher output shows in its token's scale (absmax / 127).
    floats = shard.get("scales") or shard.get("hidden") or {}
    outputs = [shard.get("logits"), shard.get("pooled"), *floats.values()]
    if all(all_finite(v) for v in outputs if v is not None):  # a corpus shard has no logits
        return
    teacher = config.teacher_source
    bad = ~np.isfinite(shard["logits"]).all(axis=1) if "logits" in shard else np.zeros(len(lengths), bool)
    if bad.any():
        raise LrcError(f"teacher {teacher} gives non-finite logits for {rows(bad)}: its activations overflow "
                       f"in --precision {config.precision}; use --precision fp32, or check the teacher with `lrc evaluate`")
    offsets = np.cumsum([0, *lengths])
    for layer, values in floats.items():
        bad_tokens = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        if bad_tokens.size:
            bad = np.zeros(len(lengths), bool)
            bad[np.searchsorted(offsets, bad_tokens, side="right") - 1] = True
            raise LrcError(f"teacher {teacher} gives non-finite hidden states at layer {layer} for {rows(bad)}: "
                           f"they overflow --hidden-dtype {config.hidden_dtype} or --precision {config.precision}; "
                           "pass --hidden-dtype float32 (and --precision fp32)")
    pooled = shard.get("pooled")
    if pooled is not None and not np.isfinite(pooled).all():
        raise LrcError(f"teacher {teacher} gives non-finite pooled vectors for "
                       f"{rows(~np.isfinite(pooled).all(axis=1))}: pass --hidden-dtype float32 (and --precision fp32)")


def _token_destinations(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat token positions [s, s+len) of each row, concatenated: where a batch's real tokens go."""
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(lengths.sum()) + np.repeat(starts - before, lengths)
