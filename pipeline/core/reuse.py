"""Fresh, resume, reuse or refuse: what a stage does when its output already holds an artifact of its kind.

Every stage records beside its artifact the settings that decide its bytes (teacher_info.json, settings.json,
negatives.json, train_config.json, export_info.json). A rerun compares them with what it is asked for by one
rule, `diff`, and acts by one function, `decide`, so that every stage, and sweep and demo through them, answers
the same question the same way:

| the output holds        | same settings | other settings | --overwrite |
|-------------------------|---------------|----------------|-------------|
| nothing                 | fresh         | fresh          | fresh       |
| a finished artifact     | reuse         | refuse         | replace     |
| an unfinished one       | resume        | refuse         | replace     |
| one with nothing to     | replace       | refuse         | replace     |
| resume from             |               |                |             |

A refusal is one line naming the settings that differ, with both values, and the two ways out: `--overwrite`,
or another output. `outdir` decides first whether the output is an lrc artifact of the stage's kind at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.core.errors import LrcError

# What an output holds (the rows of the table above).
EMPTY = "empty"
FINISHED = "finished"
RESUMABLE = "resumable"
UNFINISHED = "unfinished"  # an artifact of this kind with nothing to resume from (killed before a checkpoint)

# What the stage does.
FRESH = "fresh"  # nothing there: write it
REPLACE = "replace"  # the caller empties (outdir.clear) what is there, then writes it
RESUME = "resume"
REUSE = "reuse"

_SHOWN = 5  # differing settings shown with their values in a refusal; the rest by name
_LONG = 40  # characters of a value shown


class _Missing:
    def __repr__(self) -> str:
        return "unset"


MISSING: Any = _Missing()  # a key one side does not record


@dataclass(frozen=True)
class Change:
    key: str  # dotted for nested settings: "teacher.weights_sha256"
    recorded: Any  # MISSING when absent
    requested: Any


def diff(recorded: Mapping[str, Any], requested: Mapping[str, Any], run_only: Iterable[str] = ()) -> list[Change]:
    """The settings that differ between what an artifact recorded and what a rerun asks for, sorted by key.

    Keys in `run_only` (top level) are ignored on both sides: they change how a stage runs or where, not what it
    writes. Nested mappings are compared key by key, so a refusal names `data.max_train_examples`, not all of
    `data`. A key recorded on one side only differs from any value on the other (absent on both is equal).
    Values compare with `==`: callers pass what JSON gives back (a tuple and a list of the same items differ).
    """
    skip = set(run_only)
    return sorted(_diff(recorded, requested, "", skip), key=lambda change: change.key)


def _diff(recorded: Mapping[str, Any], requested: Mapping[str, Any], prefix: str, skip: set[str]) -> list[Change]:
    changes = []
    for key in recorded.keys() | requested.keys():
        if key in skip:
            continue
        before, after = recorded.get(key, MISSING), requested.get(key, MISSING)
        name = f"{prefix}{key}"
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changes += _diff(before, after, f"{name}.", set())
        elif before != after:  # MISSING equals nothing: a key on one side only always differs
            changes.append(Change(name, before, after))
    return changes


def _show(value: Any) -> str:
    if value is MISSING:
        return "unset"
    if value is None:
        return "none"
    text = str(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):  # a sha256: its head tells two apart
        return text[:12]
    return text if len(text) <= _LONG else text[: _LONG - 3] + "..."


def describe(changes: Sequence[Change], labels: Mapping[str, str] | None = None) -> str:
    """`seed (was 0, now 7), lr (was 0.0001, now 0.0003)`: every key, the values of the first few (a new teacher
    changes dozens of nested settings; the line stays readable and still names them all). A key in `labels` is
    shown as its label alone (an input whose recorded hash says nothing to a user: "the cache (re-extracted
    since)")."""
    labels = labels or {}
    parts = [labels.get(c.key) or (f"{c.key} (was {_show(c.recorded)}, now {_show(c.requested)})" if i < _SHOWN
                                   else c.key) for i, c in enumerate(changes)]
    return ", ".join(parts)


def decide(held: str, changes: Sequence[Change], *, overwrite: bool, where: Path | str, what: str,
           option: str = "--output-dir", resume: bool | None = None, labels: Mapping[str, str] | None = None) -> str:
    """FRESH, REPLACE, RESUME or REUSE for an output that holds `held`, whose recorded settings differ from the
    requested ones by `changes`; a one-line LrcError for a refusal. `what` names the artifact with its article
    ("a teacher"), `option` the flag that chose `where`.

    `resume`: None, the stage resumes and reuses by itself (every stage but train-student); True, the user asked
    for --resume: only a resumable artifact with the same settings is accepted; False, the user did not, and a
    stage that resumes only when asked refuses any artifact there without --overwrite.
    """
    def refuse(fix: str, prefix: str) -> LrcError:
        return LrcError(f"{prefix}{where} holds {what} with other settings (differs in: {describe(changes, labels)}): "
                        f"{fix}")

    if resume:
        if held != RESUMABLE:
            raise LrcError(f"--resume: {where} holds nothing to resume from: start without --resume")
        if changes:
            raise refuse("resume with the same settings, or start over with --overwrite", "--resume: ")
        return RESUME
    if held == EMPTY:
        return FRESH
    if overwrite:
        return REPLACE
    if resume is False:
        raise LrcError(f"{option} {where} holds {what}: pass --resume to continue it or --overwrite to start over")
    if changes:
        raise refuse(f"pass --overwrite to replace it, or choose another {option}", f"{option} ")
    return {FINISHED: REUSE, RESUMABLE: RESUME, UNFINISHED: REPLACE}[held]


def decide_whole(held: bool, record: Path, requested: Mapping[str, Any], *, overwrite: bool, what: str,
                 labels: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """`decide` for an artifact dir that appears whole by rename (a teacher, an export), so it is finished or
    absent, and records its settings under "settings" in the JSON file `record` inside it. Returns the decision
    and that file's content ({} where it was not read: nothing there, or --overwrite)."""
    info = json.loads(record.read_text()) if held and not overwrite and record.is_file() else {}
    changes = diff(info.get("settings", {}), requested)
    return decide(FINISHED if held else EMPTY, changes, overwrite=overwrite, where=record.parent, what=what,
                  labels=labels), info
