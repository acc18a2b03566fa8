"""The cache's manifest (docs/DESIGN.md §3): assembled last from the shards present, read back and checked.

Everything a later stage reads is covered by a checksum in the manifest: each shard in its split's
entries, every other file (`CONTENT_PATHS`) in `files`. The fingerprint is the sha256 of the manifest's
own content (all of it but the fingerprint), so it covers those checksums, the settings and the task, and
it is recomputed wherever a manifest is read: a hand edit of any of them is refused, and a cache with other
content never shares a fingerprint with this one (negatives files and checkpoints record it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cache.format import (
    CONTENT_PATHS, FORMAT, FORMAT_VERSION, MANIFEST, SETTINGS, SHARD_DIR, SHARD_RE, STORAGE, present_shards,
    read_sidecar, sample_sha256, sha256_file, sidecar_path,
)
from pipeline.core import atomic
from pipeline.core.errors import LrcError


def content_files(cache_dir: Path) -> list[str]:
    """Relative paths (with `/`) of the files under CONTENT_PATHS that exist in `cache_dir`, sorted."""
    found = []
    for name in CONTENT_PATHS:
        top = Path(cache_dir) / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        found += [p.relative_to(cache_dir).as_posix() for p in paths]
    return sorted(found)


def file_record(path: Path) -> dict[str, Any]:
    """Size, sha256 and sampled sha256 of one file: what the manifest records of it, checked at each level."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "sample_sha256": sample_sha256(path)}


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content except the fingerprint itself (canonical JSON: sorted keys)."""
    content = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def assemble_manifest(cache_dir: Path, settings: dict[str, Any], extra: dict[str, Any],
                      importance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that each split's shards tile its rows, record their checksums (from the sidecars written
    with them, or checked by `trusted_shards` on resume) and those of every other file later stages read,
    fingerprint the whole, and write manifest.json last. `importance`: the entry of the cache's importance
    scores (pipeline/cache/importance.py), with its own checksum, so in the fingerprint too."""
    splits: dict[str, Any] = {}
    for split, info in settings["splits"].items():
        shards, expected_start = [], 0
        for start, stop, path in present_shards(cache_dir, split):
            if start != expected_start:
                raise LrcError(
                    f"cache {cache_dir} is incomplete: split {split!r} has no shard for rows "
                    f"[{expected_start}, {start}); rerun `lrc extract-teacher` with the same settings to finish it"
                )
            record = read_sidecar(path)
            if record is None or record["bytes"] != path.stat().st_size:
                raise LrcError(f"shard {path} has no valid checksum record ({sidecar_path(path).name}): rerun "
                               "`lrc extract-teacher` with the same settings to extract it again")
            shards.append({"file": f"{SHARD_DIR}/{path.name}", "start": start, "stop": stop, "bytes": record["bytes"],
                           "sha256": record["sha256"], "sample_sha256": record["sample_sha256"]})
            expected_start = stop
        if expected_start != info["rows"]:
            raise LrcError(
                f"cache {cache_dir} is incomplete: split {split!r} has rows [0, {expected_start}) of "
                f"{info['rows']}; rerun `lrc extract-teacher` with the same settings to finish it"
            )
        splits[split] = {**info, "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    manifest = {
        "kind": "task",  # a caller that names no kind writes a task cache, as manifests before kinds existed
        **settings,
        **extra,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lrc_version": __version__,
        "splits": splits,
        "files": {rel: file_record(Path(cache_dir) / rel) for rel in content_files(cache_dir)},
    }
    if importance is not None:
        manifest["importance"] = importance
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    atomic.write_json(cache_dir / MANIFEST, manifest, sort_keys=True)
    return manifest


# --------------------------------------------------------------------------- the manifest, read back


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """The manifest of a complete cache of this format version, every shard entry checked; or a one-line LrcError."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise LrcError(f"cache dir {cache_dir} does not exist: create one with `lrc extract-teacher`")
    if not (cache_dir / MANIFEST).is_file():
        if (cache_dir / SETTINGS).is_file():
            raise LrcError(
                f"cache {cache_dir} is incomplete (its extraction did not finish): rerun "
                "`lrc extract-teacher` with the same settings to resume it"
            )
        raise LrcError(f"{cache_dir} is not an lrc cache (no {MANIFEST}): create one with `lrc extract-teacher`")
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LrcError(f"{cache_dir / MANIFEST} is not valid JSON ({err}): re-extract the cache") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        format_ = manifest.get("format") if isinstance(manifest, dict) else None
        raise LrcError(f"{cache_dir} is not an lrc cache (manifest format {format_!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LrcError(
            f"cache {cache_dir} has format version {manifest.get('format_version')} (written by lrc "
            f"{manifest.get('lrc_version')}), this lrc {__version__} reads version {FORMAT_VERSION}: "
            "re-extract it with `lrc extract-teacher --overwrite`"
        )
    try:
        _check_schema(manifest)
        for split, info in manifest["splits"].items():
            _check_tiling(cache_dir, split, info)
        for rel in manifest["files"]:
            content_path(cache_dir, rel)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise LrcError(f"{cache_dir / MANIFEST} is malformed ({type(err).__name__}: {err}): re-extract the cache "
                       "with `lrc extract-teacher --overwrite`") from None
    if manifest_fingerprint(manifest) != manifest["fingerprint"]:
        raise LrcError(f"{cache_dir / MANIFEST} does not match its fingerprint: it was edited or damaged after "
                       "extraction (its task, settings or checksums are no longer those the cache was written with): "
                       "re-extract the cache with `lrc extract-teacher --overwrite`")
    return manifest


# What every stage reads from a manifest, with its type: a manifest missing one, or holding another type, is
# refused in one line at open instead of failing with a KeyError or TypeError wherever it is first used.
_NONE = type(None)
_SCHEMA: dict[str, tuple[type, ...]] = {
    "format": (str,), "format_version": (int,), "lrc_version": (str,), "fingerprint": (str,), "kind": (str,),
    "teacher": (dict,), "task": (dict, _NONE), "layers": (list,), "hidden_size": (int,), "hidden_dtype": (str,),
    "max_length": (int,), "splits": (dict,), "files": (dict,),
}
_TEACHER_SCHEMA = {"config": (dict,), "weights_sha256": (str,), "num_layers": (int,), "hidden_size": (int,)}
_TASK_SCHEMA = {"name": (str,), "labels": (list, _NONE), "num_labels": (int,), "is_regression": (bool,), "metric": (str,)}
_SPLIT_SCHEMA = {"rows": (int,), "hidden": (bool,), "bytes": (int,), "shards": (list,)}
_SHARD_SCHEMA = {"file": (str,), "start": (int,), "stop": (int,), "bytes": (int,), "sha256": (str,), "sample_sha256": (str,)}
_FILE_SCHEMA = {"bytes": (int,), "sha256": (str,), "sample_sha256": (str,)}


def _check_keys(where: str, value: Any, schema: dict[str, tuple[type, ...]]) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{where} is a {type(value).__name__}, not a mapping")
    for key, types in schema.items():
        if key not in value:
            raise KeyError(f"{where} has no {key!r}")
        # bool is an int to Python, never to a manifest: a count of True rows is damage, not data
        if not isinstance(value[key], types) or (isinstance(value[key], bool) and bool not in types):
            raise TypeError(f"{where}[{key!r}] is a {type(value[key]).__name__}, not "
                            f"{' or '.join(t.__name__ for t in types)}")


def _check_schema(manifest: dict[str, Any]) -> None:
    """Every key the stages read is there with its type (see _SCHEMA); raises KeyError or TypeError."""
    _check_keys("the manifest", manifest, _SCHEMA)
    _check_keys("teacher", manifest["teacher"], _TEACHER_SCHEMA)
    if manifest["task"] is not None:
        _check_keys("task", manifest["task"], _TASK_SCHEMA)
    if not all(isinstance(j, int) and not isinstance(j, bool) for j in manifest["layers"]):
        raise TypeError(f"layers {manifest['layers']!r} are not all integers")
    if manifest["hidden_dtype"] not in STORAGE:
        raise ValueError(f"hidden_dtype {manifest['hidden_dtype']!r} is not one of {', '.join(STORAGE)}")
    for split, info in manifest["splits"].items():
        _check_keys(f"split {split!r}", info, _SPLIT_SCHEMA)
        for i, entry in enumerate(info["shards"]):
            _check_keys(f"split {split!r} shard {i}", entry, _SHARD_SCHEMA)
    for rel, entry in manifest["files"].items():
        _check_keys(f"file {rel!r}", entry, _FILE_SCHEMA)


def content_path(cache_dir: Path, rel: str) -> Path:
    """The file a manifest `files` entry names, confined to CONTENT_PATHS inside the cache (the manifest is data
    from disk: an absolute path, a `..` or any other file must never be opened or hashed)."""
    parts = str(rel).split("/")
    if (not parts or parts[0] not in CONTENT_PATHS or any(p in ("", ".", "..") for p in parts)
            or Path(str(rel)).is_absolute() or "\\" in str(rel)):
        raise LrcError(f"{Path(cache_dir) / MANIFEST} names {rel!r} as a cache file: only files under "
                       f"{', '.join(CONTENT_PATHS)} inside the cache are accepted (the manifest was edited or "
                       "corrupted): re-extract the cache with `lrc extract-teacher --overwrite`")
    return Path(cache_dir).joinpath(*parts)


def _check_tiling(cache_dir: Path, split: str, info: dict[str, Any]) -> None:
    """Every entry names a shard of this cache, and the entries cover rows [0, rows) in order."""
    expected = 0
    for entry in info["shards"]:
        shard_path(cache_dir, split, entry)
        if entry["start"] != expected or not entry["start"] < entry["stop"] or int(entry["bytes"]) < 0:
            raise ValueError(f"shard entry {entry['file']!r} does not continue at row {expected}")
        expected = entry["stop"]
    if expected != info["rows"]:
        raise ValueError(f"split {split!r} has shards for {expected} rows, not {info['rows']}")


def shard_path(cache_dir: Path, split: str, entry: dict[str, Any]) -> Path:
    """The file a manifest entry names, confined to the cache's shards/ dir. The manifest is data read
    from disk: an absolute path or a `..` in it must never be opened (nor hashed), so only the exact
    name the writer gives (`shards/<split>-<start>-<stop>.arrow`, matching the entry) is accepted."""
    name = str(entry["file"])
    match = SHARD_RE.match(name.removeprefix(f"{SHARD_DIR}/"))
    if (not name.startswith(f"{SHARD_DIR}/") or match is None or match["split"] != split
            or (int(match["start"]), int(match["stop"])) != (entry["start"], entry["stop"])):
        raise LrcError(f"{Path(cache_dir) / MANIFEST} names {name!r} as a shard of split {split!r}: only "
                       f"{SHARD_DIR}/{split}-START-STOP.arrow inside the cache is accepted (the manifest was edited "
                       "or corrupted): re-extract the cache with `lrc extract-teacher --overwrite`")
    return Path(cache_dir) / SHARD_DIR / match.group(0)
