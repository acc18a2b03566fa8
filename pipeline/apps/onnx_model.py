"""An exported model dir run by onnxruntime, shaped like the PyTorch classifier the stages already use.

`OnnxClassifier(dir)(input_ids=..., attention_mask=..., token_type_ids=...)` returns an object with `.logits`,
like a transformers model, so `runtime.predict_logits` and `evaluate`'s timing loop run either kind unchanged.
onnxruntime is imported only here and in pipeline/apps/export.py: it is the optional extra `lrc[onnx]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import LrcError

MODEL_FILE = "model.onnx"
EXPORT_INFO = "export_info.json"
INSTALL_HINT = 'install the extra: pip install "lrc[onnx]"'


def is_exported(model_dir: Path) -> bool:
    """A dir `lrc export` wrote (or any dir holding a model.onnx beside its config)."""
    return (Path(model_dir) / MODEL_FILE).is_file()


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a one-line error saying how to get it."""
    try:
        import onnxruntime
    except ImportError:
        raise LrcError(f"ONNX models need onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def read_export_info(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise LrcError(f"{path} is not valid JSON: export the model again with `lrc export`") from None
    return info if isinstance(info, dict) else {}


def session(path: Path, threads: int | None = None, profile_prefix: str | None = None) -> Any:
    """An onnxruntime CPU session. `threads` defaults to torch's intra-op threads, so a PyTorch model and its
    export timed side by side use the same cores (onnxruntime would otherwise take every physical core).
    `profile_prefix`: record every node's time (onnxruntime's profiler; `end_profiling()` names the file)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: spinning worker threads would steal the cores of whatever runs next (the
    # PyTorch model timed interleaved with this one, the tokenizer), slowing it by orders of magnitude.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own classes for a damaged or foreign file
        reason = " ".join(str(err).split())[:200]
        raise LrcError(f"{path} could not be loaded by onnxruntime ({reason}): export the model again") from None


class OnnxClassifier:
    """Logits from input ids, like `AutoModelForSequenceClassification`, computed by onnxruntime on the CPU."""

    def __init__(self, model_file: Path, config: Any, threads: int | None = None) -> None:
        self.model_file = Path(model_file)
        self.config = config  # the student's transformers config (num_labels, id2label, vocab_size)
        self.session = session(self.model_file, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.info = read_export_info(self.model_file.parent)
        self.training = False

    # The few nn.Module methods the stages call: an ONNX graph has no training mode and lives on the CPU.
    def eval(self) -> "OnnxClassifier":
        return self

    def train(self, mode: bool = True) -> "OnnxClassifier":
        return self

    def to(self, device: Any) -> "OnnxClassifier":
        return self

    def num_parameters(self) -> int:
        """The source model's parameter count (recorded at export): int8 weights are the same parameters."""
        if "parameters" in self.info:
            return int(self.info["parameters"])
        import onnx

        graph = onnx.load(str(self.model_file), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer)

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                 **_: Any) -> SimpleNamespace:
        """(B, C) float32 logits as a torch tensor in `.logits`. Inputs the graph does not take (segment ids of a
        family that ignores them) are dropped, as the PyTorch model ignores them."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if given["attention_mask"] is None:
            given["attention_mask"] = np.ones(np.shape(input_ids), dtype=np.int64)
        if given["token_type_ids"] is None:
            given["token_type_ids"] = np.zeros(np.shape(input_ids), dtype=np.int64)
        feed = {name: _int64(given[name]) for name in self.input_names}
        logits = self.session.run(["logits"], feed)[0]  # (B, C)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _int64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.int64)


def parameter_count(model: Any) -> int:
    """Parameters of a PyTorch model or of an exported one."""
    if isinstance(model, OnnxClassifier):
        return model.num_parameters()
    return sum(p.numel() for p in model.parameters())


def load_exported(model_dir: Path, num_labels: int, task_name: str, role: str,
                  allow_task_mismatch: bool = False) -> tuple[OnnxClassifier, Any]:
    """An exported classifier and its tokenizer, checked like `runtime.load_classifier` checks a PyTorch dir:
    a tokenizer, the recorded task, a label count that fits the task."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.core.runtime import check_recorded_task, from_pretrained, require_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise LrcError(f"{role} {model_dir} holds a {MODEL_FILE} but no config.json (label names, vocabulary size): "
                       "export it with `lrc export`, which writes both")
    require_tokenizer(model_dir, role)
    check_recorded_task(model_dir, task_name, role, allow_task_mismatch)
    config = from_pretrained(AutoConfig.from_pretrained, model_dir, role, False)
    if config.num_labels != num_labels:
        raise LrcError(f"{role} {model_dir} predicts {config.num_labels} labels but task {task_name} has {num_labels}: "
                       "evaluate it on the task it was trained for")
    model = OnnxClassifier(model_dir / MODEL_FILE, config)
    return model, from_pretrained(AutoTokenizer.from_pretrained, model_dir, role, False)
