"""`lrc evaluate`: the task metric, parameters, size on disk and measured speed of model dirs (PyTorch, or ONNX
from `lrc export`)."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.apps.onnx_model import is_exported, parameter_count
from pipeline.core import atomic, outdir, runtime
from pipeline.core.apps_config import EvaluateConfig
from pipeline.core.errors import LrcError
from pipeline.core.metrics import compute_metrics
from pipeline.core.runtime import autocast, encode, pick_device, predict_logits
from pipeline.core.task_data import load_examples
from pipeline.core.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx")


WRITTEN_BY = "lrc evaluate"  # in every results file, so a rerun may replace its own and nothing else


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Results of `model_dir` (and of `compare`, with ratios) as a dict; also written to `output`.

    Both models are loaded first and timed together, interleaved (A, B, B, A, ...) on the same token ids, so a
    busy machine slows both alike and the ratios hold where the absolute times drift."""
    task = get_task(config.data.task)
    if config.output is not None:
        check_output_file(config.output, [config.model_dir, config.compare])
    dirs = [config.model_dir] + ([config.compare] if config.compare is not None else [])
    models = [load_model(path, task, config) for path in dirs]
    dev = load_examples(config.data, "dev")
    entries = [score(model, task, dev, config) for model in models]
    for entry, speed in zip(entries, measure_speeds(models, config)):
        entry.update(speed)
    results: dict[str, Any] = {"written_by": WRITTEN_BY, "task": task.name, "model": entries[0]}
    if config.compare is not None:
        results["compare"] = entries[1]
        results["ratios"] = ratios(entries[0], entries[1])
    if config.output is not None:
        atomic.write_json(config.output, results)
    return results


def check_output_file(output: Path, models: list[Path | None]) -> None:
    """Fail before the work, not after it, when --output cannot be written as a file, or would replace a file
    that an earlier `lrc evaluate` did not write, or lies inside a model dir being evaluated."""
    if output.is_dir():
        raise LrcError(f"--output {output} is a directory: name a file, e.g. {output / 'results.json'}")
    if not output.parent.is_dir():
        raise LrcError(f"--output {output}: its folder {output.parent} does not exist: create it or name another file")
    for model in models:
        if model is not None and Path(model).resolve() in output.resolve().parents:
            raise LrcError(f"--output {output} is inside the model dir {model}: write the results outside it")
    if output.exists() and not outdir.json_says(output, "written_by", WRITTEN_BY):
        raise LrcError(f"--output {output} exists and was not written by lrc evaluate: name a new file")


@dataclass
class Loaded:
    """A model ready to run: PyTorch or onnxruntime (pipeline/apps/onnx_model.py), its tokenizer and device."""

    path: Path
    model: Any
    tokenizer: Any
    device: torch.device
    segments: bool  # feed token_type_ids
    runtime: str  # "pytorch" or "onnxruntime"


def load_model(model_dir: Path, task: TaskSpec, config: EvaluateConfig) -> Loaded:
    """A teacher, student or `lrc export` dir, checked (task, head, label count) before any work."""
    if is_exported(model_dir):
        from pipeline.apps.onnx_model import load_exported

        model, tokenizer = load_exported(model_dir, task.num_labels, task.name, "model dir", config.allow_task_mismatch)
        if config.device == "cuda" or config.precision != "fp32":
            log.warning("%s is an ONNX model: it runs on the CPU (onnxruntime's CPU provider) with the weights it "
                        "was exported with, whatever --device and --precision say", model_dir)
        return Loaded(Path(model_dir), model, tokenizer, torch.device("cpu"), "token_type_ids" in model.input_names,
                      "onnxruntime")
    model, tokenizer = load_for_evaluation(model_dir, task, config.trust_remote_code, config.allow_task_mismatch)
    runtime.check_max_length(model.config, config.max_length, f"model dir {model_dir}")
    runtime.check_max_length(model.config, config.seq_length, f"model dir {model_dir}", "--seq-length")
    device = pick_device(config.device)
    model.to(device).eval()
    return Loaded(Path(model_dir), model, tokenizer, device, "token_type_ids" in tokenizer.model_input_names, "pytorch")


def score(loaded: Loaded, task: TaskSpec, dev: Any, config: EvaluateConfig) -> dict[str, Any]:
    """Dev metrics, parameters and size on disk of one model."""
    ids, types = encode(loaded.tokenizer, dev.text_a, dev.text_b, config.max_length)
    logits = predict_logits(loaded.model, ids, types, config.eval_batch_size, loaded.device, config.precision,
                            loaded.tokenizer.pad_token_id or 0, loaded.segments)
    return {
        "path": str(loaded.path),
        "runtime": loaded.runtime,
        "metrics": compute_metrics(task, logits, np.asarray(dev.labels)),
        "main_metric": task.main_metric,
        "examples": len(dev),
        "parameters": parameter_count(loaded.model),
        "size_mb": round(size_on_disk(loaded.path) / 1e6, 2),
    }


def load_for_evaluation(model_dir: Path, task: TaskSpec, trust_remote_code: bool = False,
                        allow_task_mismatch: bool = False) -> tuple[torch.nn.Module, Any]:
    """The PyTorch model dir `lrc evaluate` scores: `runtime.load_classifier`'s checks for this task, with hints
    worded for evaluate."""
    return runtime.load_classifier(model_dir, task.num_labels, task.name, "model dir", {
        "missing": "pass a teacher or student dir",
        "head": "evaluate a fine-tuned teacher or a trained student",
        "labels": "evaluate it on the task it was trained for",
    }, trust_remote_code, allow_task_mismatch)


def size_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in _WEIGHT_SUFFIXES)


@torch.inference_mode()
def measure_speeds(models: list[Loaded], config: EvaluateConfig) -> list[dict[str, Any]]:
    """Median latency of each model on (batch, seq_length) batches, for --batch-size and --also-batch-sizes.

    Every model gets the same random token ids (from the ids all vocabularies hold) with a full attention
    mask, so each does the same work. Two warm-up rounds, then `timing_batches` rounds; in each round every
    model runs once, in alternating order (A B, B A, ...), so neither always follows the other."""
    vocab = min(m.model.config.vocab_size for m in models)
    generator = torch.Generator().manual_seed(0)
    latencies: list[dict[str, float]] = [{} for _ in models]
    for batch in sorted({config.batch_size, *config.also_batch_sizes}):
        shape = (batch, config.seq_length)
        ids = torch.randint(min(1000, vocab // 2), vocab, shape, generator=generator)
        feeds = [_feed(ids, m) for m in models]
        times: list[list[float]] = [[] for _ in models]
        for round_ in range(config.timing_batches + 2):  # two warm-up rounds
            order = range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))
            for i in order:
                elapsed = _time_once(models[i], feeds[i], config.precision)
                if round_ >= 2:
                    times[i].append(elapsed)
        for i in range(len(models)):
            latencies[i][str(batch)] = round(1e3 * statistics.median(times[i]), 2)
    results = []
    for m, by_batch in zip(models, latencies):
        latency = by_batch[str(config.batch_size)] / 1e3
        results.append({"batch_size": config.batch_size, "seq_length": config.seq_length,
                        "latency_ms": by_batch[str(config.batch_size)], "latency_ms_by_batch": by_batch,
                        "throughput_per_s": round(config.batch_size / latency, 1), "device": m.device.type,
                        "timed_with": len(models)})
    return results


def _feed(ids: torch.Tensor, loaded: Loaded) -> dict[str, torch.Tensor]:
    feed = {"input_ids": ids.to(loaded.device), "attention_mask": torch.ones_like(ids, device=loaded.device)}
    if loaded.segments:
        feed["token_type_ids"] = torch.zeros_like(ids, device=loaded.device)
    return feed


def _time_once(loaded: Loaded, feed: dict[str, torch.Tensor], precision: str) -> float:
    start = time.perf_counter()
    with autocast(loaded.device, precision):
        loaded.model(**feed)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ratios(model: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """How much smaller and faster `model` is than `other` (the paper: 7.5x smaller, 9.6x faster)."""
    metric = model["main_metric"]
    by_batch = {b: round(other["latency_ms_by_batch"][b] / ms, 2) for b, ms in model["latency_ms_by_batch"].items()
                if b in other.get("latency_ms_by_batch", {})}
    return {
        "speedup": round(other["latency_ms"] / model["latency_ms"], 2),
        "speedup_by_batch": by_batch,
        "compression_parameters": round(other["parameters"] / model["parameters"], 2),
        "compression_size": round(other["size_mb"] / model["size_mb"], 2),
        "metric_retained_percent": round(100 * model["metrics"][metric] / other["metrics"][metric], 1)
        if other["metrics"][metric] else float("nan"),
    }


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one column per model, then the ratios."""
    columns = [("model", results["model"])] + ([("compare", results["compare"])] if "compare" in results else [])
    metric = results["model"]["main_metric"]
    rows = [("path", lambda r: Path(r["path"]).name)]
    rows += [(f"dev {name}", lambda r, n=name: f"{r['metrics'][n]:.4f}") for name in results["model"]["metrics"]]
    rows += [("runtime", lambda r: r["runtime"]), ("parameters", lambda r: f"{r['parameters'] / 1e6:.1f}M"),
             ("size on disk", lambda r: f"{r['size_mb']:.1f} MB")]
    rows += [(f"latency b{b}", lambda r, b=b: f"{r['latency_ms_by_batch'][b]:.1f} ms / batch {b}x{r['seq_length']}")
             for b in results["model"]["latency_ms_by_batch"]]
    rows += [("throughput", lambda r: f"{r['throughput_per_s']:.0f} examples/s at batch {r['batch_size']}")]
    lines = [f"{'':<14}" + "".join(f"{name:<34}" for name, _ in columns)]
    lines += [f"{label:<14}" + "".join(f"{fmt(r):<34}" for _, r in columns) for label, fmt in rows]
    if "ratios" in results:
        r = results["ratios"]
        faster = ", ".join(f"{x}x at batch {b}" for b, x in r["speedup_by_batch"].items())
        lines.append(f"model vs compare (timed interleaved): faster {faster}; {r['compression_parameters']}x fewer parameters, "
                     f"{r['compression_size']}x smaller on disk, keeps {r['metric_retained_percent']}% of dev {metric}")
    return "\n".join(lines)
