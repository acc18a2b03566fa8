"""The cache: the contract between the stages (docs/DESIGN.md §3). Schema, writing, checksums, manifest.

A cache directory holds `settings.json` (written first: what the run promised to produce),
`shards/<split>-<start>-<stop>.arrow` (Arrow IPC stream files, one row per example, written
atomically, each with a `.sha256.json` sidecar written before it), `tokenizer/`, `teacher_weights/` and,
last, `manifest.json` assembled from the shards present. A cache without `manifest.json` is incomplete
and no later stage trusts it. Reading a complete cache: `pipeline/cache/reader.py`.

Everything a later stage reads is covered by a checksum in the manifest: each shard in its split's
entries, every other file (`CONTENT_PATHS`) in `files`. The fingerprint is the sha256 of the manifest's
own content (all of it but the fingerprint), so it covers those checksums, the settings and the task, and
it is recomputed wherever a manifest is read: a hand edit of any of them is refused, and a cache with other
content never shares a fingerprint with this one (negatives files and checkpoints record it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.cache.quant import INT8, scale_column, settings_entry
from pipeline.core import atomic
from pipeline.core.errors import LrcError
from pipeline.core.runtime import check_max_length

log = logging.getLogger(__name__)

FORMAT = "lrc-cache"
# 2: every file later stages read is checksummed (`files`) and the fingerprint is the hash of the manifest's
# content, recomputed where it is read. A version-1 cache is refused with the fix (re-extract): its fingerprint
# covered neither the tokenizer, the teacher weights nor the task, so it cannot be checked the same way.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
TEACHER_WEIGHTS_DIR = "teacher_weights"  # for `--init teacher`; read, never run, by train-student
IMPORTANCE_FILE = "importance.npz"  # the cache's importance scores: pipeline/cache/importance.py's FILE
# Besides the shards, every file under these paths (a file or a dir) is read by a later stage (the tokenizer by
# train-student, the teacher weights and importance scores by `--init teacher`): each is checksummed in the
# manifest's `files` and so covered by the fingerprint, and checked at open at the shards' level. A new file that
# later stages read is added here.
CONTENT_PATHS = (TOKENIZER_DIR, TEACHER_WEIGHTS_DIR, IMPORTANCE_FILE)
POOLED_DEFINITION = "mean over real tokens of the last teacher layer's hidden states, computed in float32"
SIDECAR_SUFFIX = ".sha256.json"  # <shard stem>.sha256.json: the shard's size and hashes, written before it
IMPORTANCE_SUFFIX = ".importance.npz"  # <shard stem>.importance.npz: its importance sums (pipeline/cache/importance.py)
_SHARD_RE = re.compile(r"^(?P<split>[a-z_]+)-(?P<start>\d{9})-(?P<stop>\d{9})\.arrow$")
# The quick check reads the first and last 64 KiB (Arrow schema and batch metadata, the end-of-stream
# marker) and 16 blocks of 4 KiB spread over the body: a few reads per shard whatever its size.
_SAMPLE_EDGE = 64 << 10
_SAMPLE_BLOCK = 4 << 10
_SAMPLE_COUNT = 16
# How each --hidden-dtype is stored, (hidden-state values, pooled vector), as numpy dtypes (the Arrow types follow
# from them): the one table of storage dtypes, for the writer, the reader and the teacher pass. The pooled vector
# (one per example, for the negatives index) stays a float: int8 caches keep it in float16.
STORAGE: dict[str, tuple[type, type]] = {"float16": (np.float16, np.float16), "float32": (np.float32, np.float32),
                                         INT8: (np.int8, np.float16)}


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def storage_settings(config: Any, model_config: Any, layers: list[int]) -> dict[str, Any]:
    """The settings that say how a cache stores the teacher's states, the same for task and corpus caches;
    `config` is the ExtractConfig, `model_config` the teacher's. Both cache kinds build these from the loaded
    teacher before any shard, so a --max-length the teacher cannot read is refused here, before work starts."""
    check_max_length(model_config, config.max_length, "the teacher")
    return {
        "max_length": config.max_length,
        "layers": layers,
        "hidden_size": model_config.hidden_size,
        "hidden_dtype": config.hidden_dtype,
        **settings_entry(config.hidden_dtype),
        "pooled": {"layer": model_config.num_hidden_layers, "definition": POOLED_DEFINITION},
        "precision": config.precision,
        "shard_rows": config.shard_rows,
    }


def shard_name(split: str, start: int, stop: int) -> str:
    return f"{split}-{start:09d}-{stop:09d}.arrow"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_sha256(path: Path) -> str:
    """sha256 of the file size and sampled blocks (the whole file when small): the quick check's hash."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE_EDGE + _SAMPLE_COUNT * _SAMPLE_BLOCK:
            digest.update(f.read())
            return digest.hexdigest()
        body = range(_SAMPLE_EDGE, size - _SAMPLE_EDGE - _SAMPLE_BLOCK, (size - 2 * _SAMPLE_EDGE) // _SAMPLE_COUNT)
        for offset, length in [(0, _SAMPLE_EDGE), *((o, _SAMPLE_BLOCK) for o in body), (size - _SAMPLE_EDGE, _SAMPLE_EDGE)]:
            f.seek(offset)
            digest.update(f.read(length))
    return digest.hexdigest()


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".arrow") + SIDECAR_SUFFIX)


class _HashingFile:
    """A write-only file that hashes what passes through it, so a shard's sha256 costs no second read."""

    def __init__(self, f: Any) -> None:
        self._f, self.digest, self._pos = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self._pos += len(memoryview(data))
        return self._f.write(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed


# --------------------------------------------------------------------------- writing


def shard_schema(
    layers: list[int], hidden_size: int, num_labels: int | None, regression: bool, hidden_dtype: str, with_hidden: bool
) -> pa.Schema:
    """One row per example; token-level columns hold real tokens only (no padding).

    num_labels None: a corpus cache (unlabeled text), with no label and no logits columns at all.
    """
    values, pooled = (pa.from_numpy_dtype(t) for t in STORAGE[hidden_dtype])
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
    ]
    if num_labels is not None:
        fields += [pa.field("label", pa.float32() if regression else pa.int64()),
                   pa.field("logits", pa.list_(pa.float32(), num_labels))]
    if with_hidden:
        # (tokens, d') per example: a list of fixed-size rows keeps the shape readable by any Arrow tool.
        for j in layers:
            fields.append(pa.field(hidden_column(j), pa.list_(pa.list_(values, hidden_size))))
            if hidden_dtype == INT8:  # (tokens,) float32: each token's absmax / 127 (pipeline/cache/quant.py)
                fields.append(pa.field(scale_column(j), pa.list_(pa.float32())))
        fields.append(pa.field("pooled", pa.list_(pooled, hidden_size)))
    return pa.schema(fields, metadata={"lrc.format": FORMAT, "lrc.format_version": str(FORMAT_VERSION)})


def make_record_batch(
    schema: pa.Schema,
    row_ids: np.ndarray,  # (n,)
    input_ids: list[np.ndarray],  # n arrays of (len_i,)
    token_type_ids: list[np.ndarray],  # n arrays of (len_i,)
    labels: np.ndarray | None,  # (n,); None with logits for a corpus cache
    logits: np.ndarray | None,  # (n, C)
    hidden: dict[int, np.ndarray] | None = None,  # layer -> (sum len_i, d') rows in row order
    pooled: np.ndarray | None = None,  # (n, d')
    scales: dict[int, np.ndarray] | None = None,  # layer -> (sum len_i,) float32, with int8 `hidden`
) -> pa.RecordBatch:
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def token_list(parts: list[np.ndarray], dtype: type) -> pa.Array:
        flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(offsets, pa.array(flat))

    columns: list[pa.Array] = [
        pa.array(row_ids.astype(np.int64)),
        token_list(input_ids, np.int32),
        token_list(token_type_ids, np.int8),
    ]
    if labels is not None and logits is not None:
        num_labels = schema.field("logits").type.list_size
        columns += [pa.array(labels, type=schema.field("label").type),
                    pa.FixedSizeListArray.from_arrays(pa.array(logits.astype(np.float32).reshape(-1)), num_labels)]
    if hidden is not None and pooled is not None:
        for layer, rows in hidden.items():  # dict order == schema order (extract builds both from one list)
            width = rows.shape[1]
            token_rows = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
            columns.append(pa.ListArray.from_arrays(offsets, token_rows))
            if scales is not None:
                columns.append(pa.ListArray.from_arrays(offsets, pa.array(scales[layer].astype(np.float32, copy=False))))
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1)), pooled.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_shard(cache_dir: Path, split: str, start: int, stop: int, batch: pa.RecordBatch) -> Path:
    """Write one shard atomically: a killed run leaves either the whole file or none, and a failed
    write no temp file. Its sidecar (size, sha256, sample hash) is renamed into place first, so a
    shard present on disk always has the record a resumed run checks it against."""
    shard_dir = cache_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / shard_name(split, start, stop)
    with atomic.replacing(final) as tmp:
        with open(tmp, "wb") as f:
            sink = _HashingFile(f)
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
        record = {"bytes": tmp.stat().st_size, "sha256": sink.digest.hexdigest(), "sample_sha256": sample_sha256(tmp)}
        atomic.write_json(sidecar_path(final), record, sort_keys=True)
    return final


def present_shards(cache_dir: Path, split: str) -> list[tuple[int, int, Path]]:
    """(start, stop, path) of the complete shards of a split, sorted by start."""
    shard_dir = cache_dir / SHARD_DIR
    found = []
    for path in shard_dir.glob(f"{split}-*.arrow") if shard_dir.is_dir() else []:
        match = _SHARD_RE.match(path.name)
        if match and match["split"] == split:
            found.append((int(match["start"]), int(match["stop"]), path))
    return sorted(found)


def remove_temp_files(cache_dir: Path) -> None:
    """Leftovers of a killed writer (temp files, a sidecar whose shard never arrived): never trusted."""
    shard_dir = cache_dir / SHARD_DIR
    for tmp in shard_dir.glob(".*.tmp-*") if shard_dir.is_dir() else []:
        tmp.unlink()
    for suffix in (SIDECAR_SUFFIX, IMPORTANCE_SUFFIX):
        for sidecar in shard_dir.glob(f"*{suffix}") if shard_dir.is_dir() else []:
            if not sidecar.with_name(sidecar.name.removesuffix(suffix) + ".arrow").is_file():
                sidecar.unlink()


def _sidecar(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"bytes", "sha256", "sample_sha256"} <= record.keys() else None


def trusted_shards(cache_dir: Path, split: str, ranges: set[tuple[int, int]] | None = None) -> list[tuple[int, int, Path]]:
    """The present shards of a split that match their sidecar's sha256 (every byte read); any other
    shard (changed since it was written, or without a sidecar) is removed, so a resumed extraction
    writes it again instead of blessing it into the manifest. `ranges`: check only these (start, stop)
    shards, the ones this rank owns, so ranks never hash or remove each other's files."""
    trusted = []
    for start, stop, path in present_shards(cache_dir, split):
        if ranges is not None and (start, stop) not in ranges:
            continue
        record = _sidecar(path)
        if record is not None and record["bytes"] == path.stat().st_size and record["sha256"] == sha256_file(path):
            trusted.append((start, stop, path))
            continue
        log.warning("shard %s does not match its checksum record (%s): extracting it again", path,
                    "none" if record is None else "corrupted or changed since it was written")
        path.unlink()
        sidecar_path(path).unlink(missing_ok=True)
        path.with_name(path.name.removesuffix(".arrow") + IMPORTANCE_SUFFIX).unlink(missing_ok=True)
    return trusted


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
            record = _sidecar(path)
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
    match = _SHARD_RE.match(name.removeprefix(f"{SHARD_DIR}/"))
    if (not name.startswith(f"{SHARD_DIR}/") or match is None or match["split"] != split
            or (int(match["start"]), int(match["stop"])) != (entry["start"], entry["stop"])):
        raise LrcError(f"{Path(cache_dir) / MANIFEST} names {name!r} as a shard of split {split!r}: only "
                       f"{SHARD_DIR}/{split}-START-STOP.arrow inside the cache is accepted (the manifest was edited "
                       "or corrupted): re-extract the cache with `lrc extract-teacher --overwrite`")
    return Path(cache_dir) / SHARD_DIR / match.group(0)
