"""`lrc evaluate`: the task metric, parameters, size on disk and measured speed of model dirs."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import runtime
from pipeline.config import EvaluateConfig
from pipeline.errors import LrcError
from pipeline.metrics import compute_metrics
from pipeline.runtime import autocast, encode, pick_device, predict_logits
from pipeline.tasks import TaskSpec, get_task, load_examples

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


WRITTEN_BY = "lrc evaluate"  # in every results file, so a rerun may replace its own and nothing else


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Results of `model_dir` (and of `compare`, with ratios) as a dict; also written to `output`."""
    task = get_task(config.data.task)
    if config.output is not None:
        check_output_file(config.output, [config.model_dir, config.compare])
    results: dict[str, Any] = {"written_by": WRITTEN_BY, "task": task.name,
                               "model": evaluate_model(config.model_dir, task, config)}
    if config.compare is not None:
        other = evaluate_model(config.compare, task, config)
        results["compare"] = other
        results["ratios"] = ratios(results["model"], other)
    if config.output is not None:
        write_json_atomic(config.output, results)
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
    if output.exists():
        try:
            ours = json.loads(output.read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise LrcError(f"--output {output} exists and was not written by lrc evaluate: name a new file")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate_model(model_dir: Path, task: TaskSpec, config: EvaluateConfig) -> dict[str, Any]:
    model, tokenizer = load_classifier(model_dir, task, config.trust_remote_code, config.allow_task_mismatch)
    runtime.check_max_length(model.config, config.max_length, f"model dir {model_dir}")
    runtime.check_max_length(model.config, config.seq_length, f"model dir {model_dir}", "--seq-length")
    device = pick_device(config.device)
    model.to(device)
    dev = load_examples(config.data, "dev")
    ids, types = encode(tokenizer, dev.text_a, dev.text_b, config.max_length)
    segments = "token_type_ids" in tokenizer.model_input_names
    logits = predict_logits(model, ids, types, config.eval_batch_size, device, config.precision,
                            tokenizer.pad_token_id or 0, segments)
    speed = measure_speed(model, config, device, segments)
    return {
        "path": str(model_dir),
        "metrics": compute_metrics(task, logits, np.asarray(dev.labels)),
        "main_metric": task.main_metric,
        "examples": len(dev),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": round(size_on_disk(model_dir) / 1e6, 2),
        **speed,
    }


def load_classifier(model_dir: Path, task: TaskSpec, trust_remote_code: bool = False,
                    allow_task_mismatch: bool = False) -> tuple[torch.nn.Module, Any]:
    """A sequence classifier whose label count matches the task, or a one-line error."""
    return runtime.load_classifier(model_dir, task.num_labels, task.name, "model dir", {
        "missing": "pass a teacher or student dir",
        "head": "evaluate a fine-tuned teacher or a trained student",
        "labels": "evaluate it on the task it was trained for",
    }, trust_remote_code, allow_task_mismatch)


def size_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in _WEIGHT_SUFFIXES)


@torch.inference_mode()
def measure_speed(model: torch.nn.Module, config: EvaluateConfig, device: torch.device, segments: bool) -> dict[str, float]:
    """Median latency of one (batch_size, seq_length) batch of random tokens, after warm-up."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, config.seq_length)
    inputs = {"input_ids": torch.randint(1000, model.config.vocab_size, shape, generator=generator).to(device),
              "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}
    if segments:
        inputs["token_type_ids"] = torch.zeros(shape, dtype=torch.long, device=device)
    times = []
    for i in range(config.timing_batches + 2):  # two warm-up batches
        start = time.perf_counter()
        with autocast(device, config.precision):
            model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    return {"batch_size": config.batch_size, "seq_length": config.seq_length, "latency_ms": round(1e3 * latency, 2),
            "throughput_per_s": round(config.batch_size / latency, 1), "device": device.type}


def ratios(model: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """How much smaller and faster `model` is than `other` (the paper: 7.5x smaller, 9.6x faster)."""
    metric = model["main_metric"]
    return {
        "speedup": round(other["latency_ms"] / model["latency_ms"], 2),
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
    rows += [("parameters", lambda r: f"{r['parameters'] / 1e6:.1f}M"), ("size on disk", lambda r: f"{r['size_mb']:.1f} MB"),
             ("latency", lambda r: f"{r['latency_ms']:.1f} ms / batch {r['batch_size']}x{r['seq_length']}"),
             ("throughput", lambda r: f"{r['throughput_per_s']:.0f} examples/s")]
    lines = [f"{'':<14}" + "".join(f"{name:<34}" for name, _ in columns)]
    lines += [f"{label:<14}" + "".join(f"{fmt(r):<34}" for _, r in columns) for label, fmt in rows]
    if "ratios" in results:
        r = results["ratios"]
        lines.append(f"model vs compare: {r['speedup']}x faster, {r['compression_parameters']}x fewer parameters, "
                     f"{r['compression_size']}x smaller on disk, keeps {r['metric_retained_percent']}% of dev {metric}")
    return "\n".join(lines)
