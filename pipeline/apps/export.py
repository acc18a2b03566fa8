"""`lrc export`: a trained student (or teacher) dir -> an ONNX model dir, optionally with int8 weights.

The output loads like a Hugging Face model dir (config.json with id2label, the tokenizer) with `model.onnx`
in place of the weights, and `export_info.json` beside it: opset, what was quantised, sizes, the source's
fingerprint and how far the export's logits are from the PyTorch model's. `lrc evaluate` takes it like any
model dir (pipeline/apps/onnx_model.py runs it).

Export uses torch's TorchScript exporter (`dynamo=False`): it handles every family of pipeline/core/families.py
that transformers 5 traces, needs only the `onnx` package, and gives one graph with dynamic batch and
sequence axes. Quantisation is onnxruntime's dynamic int8 (weights int8 once, activations per batch at run
time), which needs no calibration data. Every export is checked before it is kept: the graph runs on random
ids of a shape other than the traced one and must give the PyTorch model's logits, so a family whose graph
froze a shape is refused in one line instead of shipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pipeline import __version__
from pipeline.apps.onnx_model import EXPORT_INFO, INSTALL_HINT, MODEL_FILE, OnnxClassifier, require_onnxruntime
from pipeline.cache.format import sha256_file
from pipeline.core import atomic, outdir, reuse
from pipeline.core.apps_config import ExportConfig
from pipeline.core.errors import LrcError
from pipeline.core.families import FAMILIES, reads_segments
from pipeline.core.runtime import check_finite_weights, from_pretrained, recorded_task, require_tokenizer

log = logging.getLogger(__name__)

_SOURCE_KINDS = ("run", "teacher")  # lrc dirs that hold a sequence classifier
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What dynamic quantisation turns a MatMul/Gemm with int8 weights into.
_QUANTIZED_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm")


def export_model(config: ExportConfig) -> dict[str, Any]:
    """Source model dir -> exported dir; returns its export_info."""
    with outdir.lock(config.output_dir, "export"):
        return _export(config)


def _export(config: ExportConfig) -> dict[str, Any]:
    onnx = _require_onnx()
    source, out = config.source, config.output_dir
    _check_source(source)
    outdir.refuse_nested(out, {"source": source})
    held = outdir.check(out, "export", config.overwrite)  # refuses a dir that is not an lrc export
    settings = _settings(config, source)
    decision, info = reuse.decide_whole(held, out / EXPORT_INFO, settings, overwrite=config.overwrite,
                                        what="a model export",
                                        labels={"source_fingerprint": "the source model (other weights)"})
    if decision == reuse.REUSE:
        log.info("%s already holds this export of %s: reusing it", out, source)
        return info

    started = time.perf_counter()
    model_config = from_pretrained(AutoConfig.from_pretrained, source, "source", False)
    _check_family(model_config, source)
    # Eager attention: the SDPA path traces into extra mask ops (Where, Expand) that onnxruntime runs as such,
    # so the eager graph runs faster as int8, with the same logits (docs/PERFORMANCE.md).
    model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, source, "source", False,
                            attn_implementation="eager").eval()
    check_finite_weights(model, f"source {source}")
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "source", False)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if reads_segments(model_config) else [])

    # A refused family, a full disk, Ctrl-C: nothing half-written is left behind; the export dir appears only once
    # it is complete and checked.
    with atomic.staging_dir(out) as tmp:
        fp32_diff, quantized = _write_graph(model, names, tmp, config)
        model_config.save_pretrained(tmp)  # config.json with id2label: the dir reads like a HF model dir
        tokenizer.save_pretrained(tmp)
        info = {
            "format": "onnx", "quantize": config.quantize, "opset": config.opset,
            "ops_quantized": list(config.quantize_ops) if config.quantize == "int8" else [],
            "quantized_nodes": quantized,
            "inputs": names, "family": model_config.model_type, "task": (recorded_task(source) or (None,))[0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "source": str(source), "source_fingerprint": settings["source_fingerprint"],
            "source_bytes": _weight_bytes(source), "model_bytes": (tmp / MODEL_FILE).stat().st_size,
            "max_abs_logit_diff_fp32": fp32_diff,
            "max_abs_logit_diff": _max_logit_diff(model, tmp / MODEL_FILE, names),
            "export_seconds": round(time.perf_counter() - started, 1),
            "versions": _versions(onnx), "lrc_version": __version__, "settings": settings,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        outdir.mark(tmp, "export")
        # empty, or an lrc export that --overwrite replaces (outdir.check above)
        atomic.publish_dir(tmp, out, empty=lambda path: outdir.clear(path, "export"))
    log.info("exported %s to %s (%s, %.1f MB, max logit diff %.2g, %.1f s)", source, out, config.quantize,
             info["model_bytes"] / 1e6, info["max_abs_logit_diff"], info["export_seconds"])
    return info


def _write_graph(model: torch.nn.Module, names: list[str], tmp: Path, config: ExportConfig) -> tuple[float, dict]:
    """tmp/model.onnx, float32 or int8; returns the float32 graph's largest logit difference to PyTorch and
    the quantised node counts. Refuses a float32 graph that does not reproduce PyTorch's logits."""
    import onnx

    fp32 = tmp / (MODEL_FILE if config.quantize == "none" else "model-fp32.onnx")
    _to_onnx(model, names, fp32, config.opset)
    onnx.checker.check_model(str(fp32))
    fp32_diff = _max_logit_diff(model, fp32, names)
    if fp32_diff > config.tolerance:
        raise LrcError(f"the ONNX export of {config.source} ({model.config.model_type}) gives logits up to "
                       f"{fp32_diff:.2g} away from PyTorch's (tolerance {config.tolerance:g}): this family does not "
                       "export correctly with this torch/transformers; use the PyTorch model")
    quantized: dict[str, int] = {}
    if config.quantize == "int8":
        quantized = _quantize_int8(fp32, tmp / MODEL_FILE, config.quantize_ops)
        fp32.unlink()
    return fp32_diff, quantized


def _require_onnx() -> Any:
    require_onnxruntime()
    try:
        import onnx
    except ImportError:
        raise LrcError(f"lrc export needs the onnx package, which is not installed: {INSTALL_HINT}") from None
    return onnx


def _check_source(source: Path) -> None:
    """Only an lrc student or teacher with a classification head is exported."""
    if not source.is_dir():
        raise LrcError(f"source {source} does not exist: pass a train-student output dir")
    kind = outdir.kind_of(source)
    if kind not in _SOURCE_KINDS:
        what = f"an lrc {outdir.KINDS[kind].what}" if kind in outdir.KINDS else "not a dir lrc wrote"
        raise LrcError(f"source {source} is {what}, not a student or teacher dir: pass a train-student output dir")
    if not (source / "config.json").is_file():
        raise LrcError(f"source {source} has not saved a model yet (no config.json): let train-student finish first")
    require_tokenizer(source, "source")


def _check_family(config: Any, source: Path) -> None:
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LrcError(f"source {source} has no classification head (architectures: {architectures or 'none'}): "
                       "export a task student, not a general one")
    row = FAMILIES.get(config.model_type)
    if row is None or not row.onnx:
        exportable = ", ".join(name for name, r in FAMILIES.items() if r.onnx)
        raise LrcError(f"the family {config.model_type!r} of {source} cannot be exported to ONNX (exportable: "
                       f"{exportable}): use the PyTorch model")


def _settings(config: ExportConfig, source: Path) -> dict[str, Any]:
    """What decides the exported bytes; a rerun with the same settings reuses the export."""
    return {"format": config.format, "quantize": config.quantize, "opset": config.opset,
            "quantize_ops": list(config.quantize_ops), "source_fingerprint": _fingerprint(source)}


def _fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files' names and hashes (as a cache records its teacher's weights)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()


def _weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


class _Logits(torch.nn.Module):
    """The classifier as positional inputs -> logits: the exporter traces positional arguments."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def _random_inputs(config: Any, names: list[str], batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """Ids of ordinary tokens (above the special ones), a padded last row, zero segment ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size // 10, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return [given[name] for name in names]


def _to_onnx(model: torch.nn.Module, names: list[str], path: Path, opset: int) -> None:
    wrapper = _Logits(model, names).eval()  # eval on the wrapper too: the exporter traces in its mode
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in transformers' code: checked below
        torch.onnx.export(wrapper, tuple(_random_inputs(model.config, names, 2, 8, 0)), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)


@torch.no_grad()
def _max_logit_diff(model: torch.nn.Module, path: Path, names: list[str]) -> float:
    """Largest |logit difference| between PyTorch and the graph in `path` on a shape other than the traced one
    (a graph that froze the batch or sequence length fails here)."""
    inputs = dict(zip(names, _random_inputs(model.config, names, 3, 13, 1)))
    expected = model(**inputs).logits.numpy()
    got = OnnxClassifier(path, model.config)(**inputs).logits.numpy()
    return float(np.abs(expected - got).max())


def _quantize_int8(fp32: Path, int8: Path, ops: tuple[str, ...]) -> dict[str, int]:
    """Dynamic int8 weights for `ops`; returns how many nodes of each quantised op type the graph holds."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a line per tensor to the root logger, and advises "pre-processing" (shape inference and
    # graph optimisation first): without it every weight MatMul/Gemm is quantised already (26 nodes in a 4-layer
    # BERT: 6 per layer, pooler, classifier; export_info.json counts them). Errors only.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=list(ops))
    finally:
        root.setLevel(level)
    counts = Counter(node.op_type for node in onnx.load(str(int8)).graph.node)
    return {op: counts[op] for op in _QUANTIZED_OPS if counts[op]}


def _versions(onnx: Any) -> dict[str, str]:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
