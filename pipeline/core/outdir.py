"""Output dirs lrc owns: a marker of each artifact's kind, the one rule for writing into, reusing or replacing
a dir, and a lock so that one process writes a dir at a time.

lrc deletes or replaces only what it can tell it wrote. A dir is an artifact of kind K when it holds K's
marker (or, from an lrc older than the marker, K's signature file). Whatever the stage, `--overwrite`
replaces a dir only when it is an artifact of the same kind AND every entry in it is a name K writes: a
user's folder that happens to hold a `settings.json` beside their sources is refused with one line naming
the entries lrc did not write, never emptied.

The lock is a file beside the dir (`.<name>.lrc-lock`), created with O_EXCL, holding the pid, host and
start time of its process; it exists whether or not the dir does (a teacher dir appears by rename at the
end). A lock whose process is gone (killed, same host) is stale: it is taken over with a log line, so a
SIGKILLed run resumes with the same command. One on another host cannot be checked: the message says how to
remove it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline import __version__
from pipeline.core import atomic
from pipeline.core.errors import LrcError

log = logging.getLogger(__name__)

MARKER = ".lrc-artifact.json"
_TEMP = (*atomic.TEMP_PATTERNS, ".*.tmp.*", ".*.lrc-lock")  # lrc's own temp files and locks (never a user's .git)
# What `save_pretrained` writes for a model and its tokenizer.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "spm.model",
                "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja")


@dataclass(frozen=True)
class Kind:
    what: str  # how messages name it
    signature: tuple[str, ...]  # any of these marks an artifact written before the marker existed
    names: tuple[str, ...]  # glob patterns of every top-level entry this kind writes


KINDS: dict[str, Kind] = {
    "teacher": Kind("teacher", ("teacher_info.json",), ("teacher_info.json", *_MODEL_FILES)),
    "cache": Kind("cache", ("settings.json", "manifest.json"),
                  ("settings.json", "manifest.json", "shards", "tokenizer", "teacher_weights", "importance.npz",
                   "negatives*.arrow",
                   "negatives*.json")),
    "run": Kind("training run", ("train_config.json",),
                ("train_config.json", "training_summary.json", "train_log.jsonl", "report.md", "losses.png",
                 "dev_metric.png", "checkpoint", "tensorboard", "projections.safetensors", *_MODEL_FILES)),
    "sweep": Kind("sweep", ("results.csv",), ("results.csv", "results.md", "results-shard-*", "run-*")),
    "export": Kind("model export", ("export_info.json",), ("export_info.json", "model.onnx", *_MODEL_FILES)),
    "demo": Kind("demo dir", ("demo_results.json", "demo_general_results.json"),
                 ("demo_results.*", "demo_general_results.*", "teacher-*", "cache-*", "student-*", "general-student",
                  "corpus-glue-*.txt")),
}


def _owned(name: str, kind: Kind) -> bool:
    return name == MARKER or any(fnmatch.fnmatchcase(name, p) for p in (*kind.names, *_TEMP))


def kind_of(path: Path) -> str | None:
    """The kind in `path`'s marker; else, for a dir an older lrc wrote, the kind whose signature file it holds
    when it holds nothing that kind does not write (a signature name alone proves nothing: users have
    settings.json files too)."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LrcError(f"{marker} is unreadable: it is not an lrc marker; move {path} aside and rerun") from None
    for name, kind in KINDS.items():
        if any((path / s).is_file() for s in kind.signature) and not foreign_entries(path, name):
            return name
    return None


def foreign_entries(path: Path, kind: str) -> list[str]:
    """Entries of `path` that an artifact of `kind` never writes."""
    return sorted(p.name for p in path.iterdir() if not _owned(p.name, KINDS[kind]))


def check(path: Path, kind: str, overwrite: bool, option: str = "--output-dir", adopt: bool = False) -> bool:
    """May a stage that writes a `kind` write `path`? True when it holds such an artifact (to reuse, resume or,
    with `overwrite`, replace); False when it is absent or empty. One-line LrcError otherwise. `adopt`: an
    unmarked dir holding only names this kind writes counts as one (for kinds that never delete anything,
    whose signature file may not exist yet after an interrupted run)."""
    what = KINDS[kind].what
    if path.exists() and not path.is_dir():
        raise LrcError(f"{option} {path} is a file, not a directory: name a new directory for the {what}")
    if not path.exists() or not any(path.iterdir()):
        return False
    found = kind_of(path)
    if found is None and adopt and not foreign_entries(path, kind):
        found = kind
    if found is None:
        raise LrcError(f"{option} {path} is not empty and holds no lrc {what}: choose a new or empty {option}")
    if found != kind:
        raise LrcError(f"{option} {path} holds an lrc {KINDS[found].what if found in KINDS else found}, not a {what}: "
                       f"choose another {option}")
    foreign = foreign_entries(path, kind)
    if overwrite and foreign:
        raise LrcError(f"--overwrite refused: {path} holds entries lrc did not write ({', '.join(foreign[:5])}"
                       f"{', ...' if len(foreign) > 5 else ''}): move them out or choose a new {option}")
    return True


def clear(path: Path, kind: str) -> None:
    """Remove an artifact's contents for --overwrite, after `check`: only names this kind writes (checked again
    here, so no caller can empty a dir it has not checked)."""
    foreign = foreign_entries(path, kind)
    if foreign:
        raise LrcError(f"refusing to empty {path}: it holds entries lrc did not write ({', '.join(foreign[:5])})")
    log.info("--overwrite: removing the %s in %s", KINDS[kind].what, path)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark(path: Path, kind: str) -> None:
    """Create `path` if needed and record that lrc writes a `kind` there (kept across reuse and resume)."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.is_file():
        atomic.write_text(marker, json.dumps({"kind": kind, "lrc_version": __version__}) + "\n")


def json_says(path: Path, key: str, value: object) -> bool:
    """Whether the JSON file at `path` records `key: value`: how a single file lrc writes (evaluate's results, the
    negatives file's metadata) is told apart from a user's file of the same name before it is replaced."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False


def refuse_nested(output: Path, inputs: dict[str, Path | None], option: str = "--output-dir") -> None:
    """An output inside an input artifact, or an input inside the output, is refused: replacing one would
    delete the other."""
    out = output.resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        inp = Path(path).resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise LrcError(f"{option} {output} and the {name} {path} overlap (one is inside the other): "
                           f"write the output to a separate directory")


# --------------------------------------------------------------------------- one writer


def _require_folders(path: Path) -> None:
    """Every existing ancestor of an output is a directory: a file there would make mkdir fail with a bare
    FileExistsError (or NotADirectoryError) instead of a line naming it."""
    for parent in Path(path).absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise LrcError(f"{path}: {parent} is a file, not a directory: choose an output path whose folders are "
                           "directories")


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lrc-lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux /proc), so a pid reused by another process is not
    mistaken for the holder; None where /proc is unavailable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True  # another user's process, or a lock we cannot read: assume it is alive
    started = _start_time(int(holder["pid"]))
    return started is None or holder.get("proc_start") in (None, started)


@contextlib.contextmanager
def lock(path: Path, command: str, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of output `path` while the block runs (one writer). Under torchrun only rank 0 takes it
    (`enabled`): the ranks of one job share its outputs."""
    if not enabled:
        yield
        return
    file = lock_path(path)
    _require_folders(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time(),
          "proc_start": _start_time(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(file)
            if holder is not None and holder.get("host") == me["host"] and not _alive(holder):
                log.warning("taking over the lock %s of a %s process (pid %s) that is no longer running", file,
                            holder.get("command"), holder.get("pid"))
                file.unlink(missing_ok=True)
                continue
            if holder is None:  # being written this instant, or damaged: look again shortly
                time.sleep(0.2)
                holder = _read_lock(file) or {}
            raise LrcError(
                f"{path} is being written by another lrc process ({holder.get('command', '?')}, pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                f"{time.strftime('%H:%M:%S', time.localtime(holder.get('since', 0)))}): wait for it to finish, or "
                f"if that process is gone, delete {file}") from None
        except OSError as err:  # a read-only or full folder: name the output the user asked for, not the lock
            raise OSError(err.errno, err.strerror, str(path)) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise LrcError(f"could not take the lock {file}: delete it if no lrc process is writing {path}")
    try:
        yield
    finally:
        if _read_lock(file) == me:
            file.unlink(missing_ok=True)


def _read_lock(file: Path) -> dict | None:
    try:
        holder = json.loads(file.read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None
