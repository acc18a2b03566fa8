"""Small helpers every stage needs: device choice, seeding, autocast, logging setup."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.core.errors import LrcError
from pipeline.core.families import usable_positions
from pipeline.core.tasks import TASKS, get_task

log = logging.getLogger(__name__)

# A model dir holds its tokenizer in one of these (fast, WordPiece, BPE, SentencePiece). Without any,
# transformers builds a tokenizer of special tokens only and every word becomes [UNK], silently.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# Files that record the task a model was trained on: a teacher's (finetune), a finished student run's, an export's.
TASK_RECORDS = ("teacher_info.json", "training_summary.json", "export_info.json")


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrcError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What ran a stage, for its summary: `cpu` or `cuda:0 (NVIDIA H200)`."""
    if device.type == "cuda":
        return f"{device.type}:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return device.type


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> ContextManager[None]:
    """bf16 autocast (faster on CPUs and GPUs with bf16 units; docs/PERFORMANCE.md) or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers and datasets are chatty at INFO; their warnings still show.
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "filelock", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def pad_batch(
    ids: list[list[int]], types: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch of unpadded sequences: (input_ids, token_type_ids, attention_mask), each (B, L)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    token_types = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    for i, (a, t) in enumerate(zip(ids, types)):
        input_ids[i, : len(a)] = torch.tensor(a)
        token_types[i, : len(t)] = torch.tensor(t)
        mask[i, : len(a)] = 1
    return input_ids.to(device), token_types.to(device), mask.to(device)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    ids: list[list[int]],
    types: list[list[int]],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    pad_id: int = 0,
    segments: bool = True,
) -> np.ndarray:
    """(N, C) float32 logits in input order; batches are length-sorted to cut padding.

    Runs in eval mode (no dropout) and leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.empty((len(ids), model.config.num_labels), np.float32)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        input_ids, token_types, mask = pad_batch([ids[r] for r in rows], [types[r] for r in rows], pad_id, device)
        extra = {"token_type_ids": token_types} if segments else {}
        with autocast(device, precision):
            out[rows] = model(input_ids=input_ids, attention_mask=mask, **extra).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def encode(tokenizer: Any, text_a: list[str], text_b: list[str] | None, max_length: int) -> tuple[list, list]:
    """Unpadded input ids and segment ids (zeros for models without segments), truncated to max_length."""
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    types = enc["token_type_ids"] if "token_type_ids" in enc else [[0] * len(x) for x in ids]
    return ids, types


def load_classifier(model_dir: Path, num_labels: int, task_name: str, role: str, fixes: dict[str, str],
                    trust_remote_code: bool = False, allow_task_mismatch: bool = False) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer, checked before any work: the dir exists, is a complete
    model dir with a tokenizer, was trained on this task (where it records one), has a classification
    head predicting the task's label count, and finite weights. `fixes` holds the hint each check's
    one-line error ends with (keys: missing, head, labels), worded for the calling command."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LrcError(f"{role} {model_dir} does not exist: {fixes['missing']}")
    if not (model_dir / "config.json").is_file():
        unfinished = (model_dir / "train_config.json").is_file()
        raise LrcError(f"{role} {model_dir} is a train-student run that has not saved a student yet (no config.json): "
                       "let it finish, or resume it with `lrc train-student --resume`" if unfinished else
                       f"{role} {model_dir} is not a model dir (no config.json): {fixes['missing']}")
    require_tokenizer(model_dir, role)
    check_recorded_task(model_dir, task_name, role, allow_task_mismatch)
    config = from_pretrained(AutoConfig.from_pretrained, model_dir, role, trust_remote_code)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LrcError(f"{role} {model_dir} has no classification head (architectures: {architectures or 'none'}): "
                       f"{fixes['head']}")
    if config.num_labels != num_labels:
        raise LrcError(f"{role} {model_dir} predicts {config.num_labels} labels but task {task_name} has "
                       f"{num_labels}: {fixes['labels']}")
    model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, model_dir, role, trust_remote_code)
    check_finite_weights(model, f"{role} {model_dir}")
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_dir, role, trust_remote_code)
    check_vocabulary(model, tokenizer, f"{role} {model_dir}")
    return model, tokenizer


def check_max_length(model_config: Any, max_length: int, source: str, flag: str = "--max-length") -> None:
    """A length option within the positions the model can read: a longer input fails only when a long enough
    example comes, mid-run, with a size-mismatch traceback from the position embeddings."""
    positions = usable_positions(model_config)
    if max_length > positions:
        raise LrcError(f"{flag} {max_length} is longer than {source} reads ({positions} positions): pass "
                       f"{flag} {positions} or less")


def check_vocabulary(model: torch.nn.Module, tokenizer: Any, source: str) -> None:
    """Every id the tokenizer can produce has a row in the model's input embeddings. A larger tokenizer (another
    model's, or one with added tokens the embeddings were never resized for) fails in the first batch that meets
    such a token, with an IndexError deep in the embedding, or on a GPU with a device-side assert."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model without one token table (e.g. CANINE reads characters)
        return
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise LrcError(f"{source}: its tokenizer has {len(tokenizer)} tokens but the model's input embeddings hold "
                       f"{rows}: use the tokenizer the model was trained with, or resize the embeddings to the "
                       "tokenizer (model.resize_token_embeddings(len(tokenizer))) and save both")


def from_pretrained(loader: Callable[..., Any], path: str | Path, role: str, trust_remote_code: bool,
                    **kwargs: Any) -> Any:
    """`loader(path, trust_remote_code=...)`, its failures on a damaged or foreign dir as one line.

    trust_remote_code is always passed: left unset, transformers asks on the terminal, and a "y" (or
    a piped one) runs Python shipped inside the model dir.
    """
    try:
        return loader(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        reason = " ".join(str(err).split())
        if "trust_remote_code" in reason or "custom code" in reason:
            raise LrcError(f"{role} {path} needs Python code shipped in its dir to load; lrc does not run it unless "
                           "you pass --trust-remote-code (read that code first: it runs with your permissions)") from None
        raise LrcError(f"{role} {path} could not be loaded ({type(err).__name__}: {reason[:200]}): its files are "
                       "damaged or incomplete (e.g. a truncated model.safetensors); save or copy it again") from None


def require_tokenizer(model_dir: Path, role: str) -> None:
    """A local model dir must hold tokenizer files (see TOKENIZER_FILES for why)."""
    model_dir = Path(model_dir)
    if model_dir.is_dir() and not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise LrcError(f"{role} {model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}), so every "
                       "word would read as [UNK]: save the tokenizer into it, e.g. "
                       f"`AutoTokenizer.from_pretrained(BACKBONE).save_pretrained('{model_dir}')`")


def recorded_task(model_dir: Path) -> tuple[str, str] | None:
    """(task, file) that a model dir records it was fine-tuned or distilled on, or None."""
    for name in TASK_RECORDS:
        path = Path(model_dir) / name
        if path.is_file():
            try:
                task = json.loads(path.read_text(encoding="utf-8")).get("task")
            except (ValueError, AttributeError):
                raise LrcError(f"{path} is not valid JSON: restore it or remove it") from None
            if task in TASKS:  # a general student records "corpus": no task to compare with
                return task, name
    return None


def check_recorded_task(model_dir: Path, task_name: str, role: str, allow: bool) -> None:
    """Refuse a model trained on another task (mnli and mnli-mm are one task) unless `allow`."""
    record = recorded_task(model_dir)
    if record is None or get_task(record[0]).hf_config == get_task(task_name).hf_config:
        return
    if allow:
        log.warning("%s %s was trained on %s (%s), used on %s as asked (--allow-task-mismatch)", role, model_dir,
                    record[0], record[1], task_name)
        return
    raise LrcError(f"{role} {model_dir} was trained on {record[0]} ({record[1]}), not {task_name}: pass --task "
                   f"{record[0]}, or --allow-task-mismatch to use it on {task_name} deliberately")


# Exponent bits: a float is NaN or inf exactly when they are all ones.
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(values: np.ndarray | torch.Tensor) -> bool:
    """No NaN or inf in `values`. On the CPU, float16/32 are tested by their exponent bits (an integer
    max): several times faster than isfinite, which matters for per-batch checks of fp16 hidden states."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu" or values.dtype not in (torch.float16, torch.float32):
            return bool(torch.isfinite(values).all())
        values = values.numpy()
    if values.size == 0:
        return True
    if values.dtype not in _EXPONENT_BITS:
        return bool(np.isfinite(values).all())
    as_int, mask = _EXPONENT_BITS[values.dtype]
    return int((values.view(as_int) & mask).max()) != mask


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse weights holding NaN or inf (a diverged fine-tuning, a damaged file) where they are loaded or saved."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LrcError(f"{source} has non-finite weights ({bad} of {tensor.numel()} values of {name} are NaN or "
                           "inf): it is damaged or its training diverged; restore it, or train it again with a lower --lr")


def apply_update(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                 max_grad_norm: float) -> float:
    """Clip the global gradient norm to `max_grad_norm` (0 = no clipping), step, advance the schedule and
    zero the gradients in place (the buffers, 30522 x d for the word embeddings, are reused rather than
    reallocated). Returns the gradient norm before clipping."""
    if max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=False)
    return norm
