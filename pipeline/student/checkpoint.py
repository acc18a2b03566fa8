"""The training run's directory: resumable checkpoints, the best student, the metrics log.

The checkpoint is one safetensors file: every tensor (weights, optimizer moments, RNG states) as a
tensor, everything else (step, scheduler, parameter groups, Python and numpy RNG states) as JSON in
its header. Loading it parses data only: unlike a pickle (`torch.load`), a planted file cannot run code.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from pipeline.cache.negatives_file import recorded_sha256
from pipeline.core import atomic, options, outdir, reuse
from pipeline.core.config import TrainConfig
from pipeline.core.errors import LrcError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a pickle, written by older lrc versions: never loaded
_STATE_KEY = "lrc.state"  # the JSON half of the checkpoint, in the safetensors header
RUN_CONFIG = "train_config.json"
METRICS_LOG = "train_log.jsonl"
SUMMARY = "training_summary.json"
# Where the run dir, the cache and the negatives file live: never compared, so a run dir copied in from another
# machine is recognised; the inputs are compared by content instead (the cache's fingerprint, the negatives
# file's sha256).
_LOCATIONS = ("output_dir", "cache_dir", "negatives")
# How a refusal names an input that changed under a finished run (its recorded hash says nothing to a user).
_INPUT_LABELS = {"cache_fingerprint": "the cache (re-extracted since)",
                 "negatives_sha256": "the negatives file (rebuilt since)"}


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, float] | None = None


@dataclass(frozen=True)
class RunDir:
    output_dir: Path
    checkpoint_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_dir", self.output_dir / CHECKPOINT_DIR)


def comparable_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings recorded in train_config.json and compared on reuse and resume, as the config's fields say
    (pipeline/core/options.py): run-only settings (how a run is watched or where it runs) are left out, and so is a
    setting added after runs were recorded while it holds the value that reproduces the behaviour before it, so
    a run saved before the setting existed still compares equal (and is reused or resumed)."""
    run_only, added_at = options.run_only(type(config)), options.added_at(type(config))
    raw = {k: v for k, v in asdict(config).items()
           if k not in run_only and not (k in added_at and v == added_at[k])}
    return json.loads(json.dumps(raw, default=str))


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise LrcError(f"{path} is unreadable ({type(err).__name__}: {err}): {fix}") from None


def check_run_dir(config: TrainConfig) -> RunDir:
    """Resume or refuse, writing nothing: a run dir is only reused by `--resume` with the same settings.

    Called before any other check, so that a refused command leaves no run dir behind; the dir is
    created (or replaced, with --overwrite) by `start_run_dir` once everything else is in order.
    """
    run = RunDir(config.output_dir)
    out, saved = config.output_dir, config.output_dir / RUN_CONFIG
    init = Path(config.init) if config.init not in ("random", "teacher") else None
    outdir.refuse_nested(out, {"cache": config.cache_dir, "negatives file": config.negatives, "--init model": init})
    if config.resume:
        if not (run.checkpoint_dir / STATE_FILE).is_file():
            legacy = (run.checkpoint_dir / LEGACY_STATE_FILE).is_file()
            raise LrcError(f"--resume: the checkpoint in {out} is a pickle (state.pt) from an older lrc, which is never "
                           "loaded (unpickling can run code): start over with --overwrite" if legacy else
                           f"--resume: no checkpoint in {out}; start the run without --resume (add --overwrite to replace the dir)")
        # The inputs themselves are compared by content once they are open (`check_inputs`).
        changes = settings_changes(_read_json(saved, "start over with --overwrite"), config)
        reuse.decide(reuse.RESUMABLE, changes, overwrite=False, where=out, what="a checkpoint", resume=True)
        return run
    held = reuse.FINISHED if outdir.check(out, "run", config.overwrite) else reuse.EMPTY
    reuse.decide(held, [], overwrite=config.overwrite, where=out, what="a training run", resume=False)
    return run


def start_run_dir(config: TrainConfig) -> None:
    """Create (or, with --overwrite, replace) the run dir checked by `check_run_dir`; a resume keeps it."""
    out = config.output_dir
    if config.resume:
        return
    if out.exists() and any(out.iterdir()):
        outdir.clear(out, "run")  # only what a run writes: check_run_dir refused anything else
    outdir.mark(out, "run")
    atomic.write_json(out / RUN_CONFIG, comparable_settings(config), sort_keys=True)


def settings_changes(saved: dict[str, Any], config: TrainConfig) -> list[reuse.Change]:
    """How `config` differs from a run dir's recorded train_config.json: the one comparison behind resuming
    (`check_run_dir`) and reusing (`previous_run`)."""
    return reuse.diff(saved, comparable_settings(config), run_only=(*options.run_only(type(config)), *_LOCATIONS))


def run_inputs(cache_fingerprint: str, negatives_sha256: str | None) -> dict[str, str | None]:
    """What a run trains from, by content: recorded in every checkpoint and compared on resume."""
    return {"cache_fingerprint": cache_fingerprint, "negatives_sha256": negatives_sha256}


def recorded_inputs(path: Path) -> dict[str, Any] | None:
    """The inputs a checkpoint file records, read from its JSON header alone (no tensor is loaded); None for a
    checkpoint written before they were recorded."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {})[_STATE_KEY])
        entries = dict((k, v) for k, v in tree["__dict__"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise LrcError(f"checkpoint {path} is unreadable ({reason}): it was cut short or damaged; start the run "
                       "over with --overwrite") from None
    return _decode(entries["inputs"], {}) if "inputs" in entries else None


def check_inputs(run: RunDir, config: TrainConfig, inputs: dict[str, str | None]) -> None:
    """--resume continues only on the inputs the checkpoint was trained on: the same cache fingerprint and the
    same negatives content, wherever they now live. A checkpoint from before inputs were recorded falls back to
    the rule it was written under: the same paths."""
    path = run.checkpoint_dir / STATE_FILE
    recorded = recorded_inputs(path)
    fix = "resume with the inputs it was trained on, or start over with --overwrite"
    if recorded is None:
        saved = _read_json(config.output_dir / RUN_CONFIG, "start over with --overwrite")
        current = comparable_settings(config)
        paths = ("cache_dir", "negatives")
        moved = [c.key for c in reuse.diff({k: saved.get(k) for k in paths}, {k: current.get(k) for k in paths})]
        if moved:
            raise LrcError(f"--resume: the checkpoint in {config.output_dir} records no input fingerprints (an older "
                           f"lrc) and {', '.join(moved)} differ(s) from the recorded path(s): {fix}")
        return
    what = {"cache_fingerprint": ("the cache", f"--cache {config.cache_dir}", "re-extracted or another cache"),
            "negatives_sha256": ("the negatives file", f"{config.negatives_path}", "rebuilt or another file")}
    for change in reuse.diff({k: recorded.get(k) for k in what}, {k: inputs.get(k) for k in what}):
        name, now, why = what[change.key]
        raise LrcError(f"--resume: the checkpoint in {config.output_dir} was trained on {name} with "
                       f"{change.key.split('_')[-1]} {str(change.recorded)[:12]}, but {now} has "
                       f"{str(change.requested)[:12]} ({why} since): {fix}")


def _remove_stale_temp_files(run: RunDir) -> None:
    """Temp files of a checkpoint write that was killed (a SIGKILL runs no cleanup): never trusted."""
    if run.checkpoint_dir.is_dir():
        for tmp in run.checkpoint_dir.glob(f".{STATE_FILE}.tmp-*"):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the checkpoint file


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON tree for `value`; tensors (and numpy arrays) go to `tensors` under `path`, the tree names them.

    Dicts become {"__dict__": [[key, value], ...]} (keeps int keys, as the optimizer's, and order) and
    tuples {"__tuple__": [...]} (numpy's and Python's RNG states are tuples and must come back as such).
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()  # a copy: no storage shared between keys
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": path, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint entry {path} has keys that are neither str nor int")
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entry {path} is a {type(value).__name__}, which a checkpoint does not store")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    return {k: _decode(v, tensors) for k, v in tree["__dict__"]}


def write_state(path: Path, payload: dict[str, Any]) -> None:
    """`payload` (nested dicts, lists, tuples, tensors, numpy arrays, plain values) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(payload, tensors, "state"))
    with atomic.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={_STATE_KEY: tree})


def read_state(path: Path) -> dict[str, Any]:
    """What `write_state` wrote, parsed without unpickling anything; a damaged file is a one-line LrcError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _decode(tree, tensors)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise LrcError(f"checkpoint {path} is unreadable ({reason}): it was cut short or damaged; start the run "
                       "over with --overwrite") from None


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, numpy, Python, CUDA)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(run: RunDir, state: TrainState, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, rng_by_rank: list[dict[str, Any]] | None = None,
         inputs: dict[str, str | None] | None = None) -> None:
    """Everything a resumed run needs to continue as if never stopped, written atomically, with the `inputs`
    (`run_inputs`) it trained on. Under torchrun rank 0 writes it with every rank's RNG state (`rng_by_rank`,
    in rank order)."""
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "state": asdict(state),
        "student": student.state_dict(),
        "projections": projections.state_dict() if projections is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    if inputs is not None:
        payload["inputs"] = inputs
    if rng_by_rank is not None and len(rng_by_rank) > 1:
        payload["rng_by_rank"] = rng_by_rank
    _remove_stale_temp_files(run)
    write_state(run.checkpoint_dir / STATE_FILE, payload)


def load(run: RunDir, student: torch.nn.Module, projections: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, world_size: int = 1) -> TrainState:
    """Restore a checkpoint into the run's objects; each rank takes its own RNG state. Resumed with another
    number of processes, weights, optimizer and data order carry over (--batch-size is the global batch)
    but dropout draws do not: every rank then starts from rank 0's generators, offset by its rank."""
    _remove_stale_temp_files(run)
    path = run.checkpoint_dir / STATE_FILE
    payload = read_state(path)
    try:
        student.load_state_dict(payload["student"])
        if projections is not None:
            projections.load_state_dict(payload["projections"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise LrcError(f"checkpoint {path} does not fit this run ({reason}): start the run over with --overwrite") from None
    by_rank = payload.get("rng_by_rank") or [payload["rng"]]
    if len(by_rank) == world_size:
        _set_rng_state(by_rank[rank])
    else:
        log.warning("the checkpoint was written by %d process(es), this run has %d: dropout draws differ from an "
                    "uninterrupted run", len(by_rank), world_size)
        _set_rng_state(payload["rng"])
        if rank > 0:
            torch.manual_seed(int(torch.randint(2**31, ())) + rank)
    return TrainState(**payload["state"])


def save_student(run: RunDir, student: torch.nn.Module, tokenizer: Any) -> None:
    """The student in Hugging Face format at the top of the run dir (config, weights, tokenizer).

    Written to a temp dir, then moved file by file: each move is atomic and only the weights
    change between saves, so a reader never sees a half-written model.
    """
    with atomic.staging_dir(run.output_dir / "student") as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.move_files(tmp, run.output_dir, last=lambda path: path.suffix == ".safetensors")


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    atomic.write_json(run.output_dir / SUMMARY, summary)


class MetricsLog:
    """Every logged step and evaluation as one JSON line (and to TensorBoard when it is installed)."""

    def __init__(self, run: RunDir, keep_until: int | None) -> None:
        """`keep_until`: resuming from that step, drop records a killed run wrote after its checkpoint."""
        self.path = run.output_dir / METRICS_LOG
        if keep_until is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= keep_until]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run.output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            values = record.get("eval", record)
            prefix = "eval/" if "eval" in record else "train/"
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(prefix + key, value, record["step"])
            self._tensorboard.flush()


def _step_of(line: str) -> float:
    """The step of a log line; a line cut short by a kill or a full disk counts as after any checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


@dataclass(frozen=True)
class PreviousRun:
    """What a run dir already holds, as far as starting `config` there is concerned."""

    state: str  # empty | foreign (not an lrc run) | unfinished | finished
    changed: list[reuse.Change]  # settings (and, for a finished run, inputs) that differ from `config`
    summary: dict[str, Any] | None  # the finished run's training summary
    resumable: bool  # an unfinished run with a checkpoint


def previous_run(config: TrainConfig, fingerprint: str) -> PreviousRun:
    """Inspect config.output_dir for a run of the same settings on the cache with this fingerprint and on the
    negatives file it names (by content). `config.init` is concrete (run.resolve_init): runs record what
    `--init auto` resolved to. An unfinished run's inputs are compared when it resumes."""
    out = config.output_dir
    if not out.is_dir() or not any(out.iterdir()):
        return PreviousRun("empty", [], None, False)
    if not (out / RUN_CONFIG).is_file():
        return PreviousRun("foreign", [], None, False)
    changed = settings_changes(_read_json(out / RUN_CONFIG, "remove the dir or pass --overwrite"), config)
    if not (out / SUMMARY).is_file():
        return PreviousRun("unfinished", changed, None, (out / CHECKPOINT_DIR / STATE_FILE).is_file())
    summary = _read_json(out / SUMMARY, "remove the dir or pass --overwrite")
    negatives = recorded_sha256(config.negatives_path) if config.uses_negatives and config.negatives_source == "file" \
        else None
    # summaries written before the negatives hash was recorded have none: their runs compare by cache alone
    recorded = {"cache_fingerprint": summary["cache_fingerprint"],
                "negatives_sha256": summary.get("negatives_sha256", negatives)}
    changed += reuse.diff(recorded, {"cache_fingerprint": fingerprint, "negatives_sha256": negatives})
    return PreviousRun("finished", changed, summary, False)


def decide(config: TrainConfig, previous: PreviousRun) -> str:
    """reuse.decide for a run dir found by `previous_run` (sweep, demo and the benchmarks go through here)."""
    held = {"finished": reuse.FINISHED, "unfinished": reuse.RESUMABLE if previous.resumable else reuse.UNFINISHED}
    return reuse.decide(held.get(previous.state, reuse.EMPTY), previous.changed, overwrite=config.overwrite,
                        where=config.output_dir, what=f"a {previous.state} run", labels=_INPUT_LABELS)
