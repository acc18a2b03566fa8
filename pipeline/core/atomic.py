"""Writing a file or a directory atomically: a reader (a later stage, a resumed run, another rank) sees the old
version or the whole new one, never a part, and a write that fails (a full disk, Ctrl-C, an error in the
caller's block) leaves the old version and no temp file behind.

Every writer in lrc goes through here, so the temp names are the same everywhere and `outdir` can tell them
from a user's files (`TEMP_PATTERNS`):

- a file is written to `.NAME.tmp-PID` beside it and renamed over it (`os.replace`, atomic on one filesystem).
  The pid keeps two processes that write the same name (ranks, a stale lock taken over) off each other's temp.
- a directory is built in `.NAME.tmp` beside it and renamed into place once complete. No pid: the name is fixed
  so that a rerun finds and removes what a killed run left (a SIGKILL runs no cleanup), rather than leaving a
  growing pile of half-built model dirs beside the user's output.

A SIGKILL can still leave a temp file: readers never trust one, and the stages that resume
(`cache.remove_temp_files`, `checkpoint`) delete them on start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

# Names of lrc's temp files and staging dirs (for `outdir`, which may remove them as its own).
TEMP_PATTERNS = (".*.tmp", ".*.tmp-*")


def temp_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def staging_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for the block to write; when the block ends cleanly the temp file replaces
    `path` in one rename. When it raises, the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temp_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, payload: Any, *, sort_keys: bool = False) -> None:
    """`payload` as indented JSON with a final newline (sorted keys where the bytes must not depend on the order
    a dict was built in: the cache's manifest and sidecars are hashed)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


# --------------------------------------------------------------------------- directories


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """An empty dir beside `final` for the block to fill, removed when the block ends however it ends: the block
    makes it `final` with `publish_dir` once complete, so a failure anywhere before leaves `final` as it was.
    What a killed run left under the same name is removed first."""
    tmp = staging_name(Path(final))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(ready: Path, final: Path, empty: Callable[[Path], None] | None = None) -> None:
    """Rename the complete dir `ready` to `final`. An existing `final` must be empty, or be emptied by `empty`
    (the caller's --overwrite: it alone knows which entries it may delete)."""
    if final.exists():
        if empty is not None:
            empty(final)
        final.rmdir()
    ready.rename(final)


def move_files(ready: Path, dest: Path, last: Callable[[Path], bool] = lambda path: False) -> None:
    """Move every entry of `ready` into the existing dir `dest`, each by its own rename, the ones `last` picks
    after the others: for a model saved into a dir that holds more than the model (a run dir), where a reader
    that finds the new weights (moved last) finds the config and tokenizer that go with them."""
    for path in sorted(ready.iterdir(), key=last):
        os.replace(path, dest / path.name)


def save_pretrained(final: Path, *saveables: Any) -> None:
    """`save_pretrained` of each of `saveables` (a model, a tokenizer, a config) into one dir that appears whole
    or not at all; an existing `final` must be empty."""
    with staging_dir(final) as tmp:
        for saveable in saveables:
            saveable.save_pretrained(tmp)
        publish_dir(tmp, final)
