"""Stage `build-negatives`: cache -> negatives.arrow (M candidate negatives per train row) + negatives.json.

`build_negatives` reads a cache, refuses or reuses its output, and writes the files; the candidates come from
`find_candidates` (`pipeline/negatives/candidates.py`), which knows nothing of caches.
The file format and its reader live in `pipeline/cache/negatives_file.py`, the sampler `train-student` draws
with in `pipeline/student/sampler.py`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.cache.manifest import read_manifest
from pipeline.cache.negatives_file import (
    FORMAT, FORMAT_VERSION, is_negatives_file, manifest_path, read_negatives, write_negatives,
)
from pipeline.cache.reader import open_cache
from pipeline.core import atomic, outdir, reuse
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.negatives.candidates import find_candidates

logger = logging.getLogger(__name__)

# Where the inputs and output live and how the cache is checked: not what the file holds (the cache is compared by
# its fingerprint, so a cache copied elsewhere keeps its negatives).
_RUN_ONLY = ("cache_dir", "output", "verify_cache", "overwrite")


def check_outputs(out: Path) -> None:
    """Refuse before any work to replace a file this command did not write: `--output X` writes X and
    X's .json sibling (e.g. --output cache/manifest.arrow would otherwise replace cache/manifest.json)."""
    meta = manifest_path(out)
    fix = "choose another --output (a new .arrow name)"
    if meta == out:
        raise LrcError(f"--output {out} ends in .json, the name of its metadata file: {fix}")
    if out.is_dir():
        raise LrcError(f"--output {out} is a directory: {fix}")
    if out.exists() and not is_negatives_file(out):
        raise LrcError(f"--output {out} exists and is not a negatives file written by lrc: {fix}")
    if meta.exists() and not outdir.json_says(meta, "format", FORMAT):
        raise LrcError(f"--output {out} would replace {meta}, which build-negatives did not write: {fix}")


def build_negatives(config: NegativesConfig) -> Path:
    """`lrc build-negatives`: read the cache's train split, find candidates, write the Arrow file and manifest."""
    read_manifest(config.cache_dir)  # a missing or unfinished cache is refused before the lock creates anything in it
    with outdir.lock(config.output_path, "build-negatives"):
        return _build(config)


def settings(config: NegativesConfig, cache_fingerprint: str) -> dict[str, Any]:
    """What decides the file's content, recorded in negatives.json: a rerun with the same reuses the file."""
    raw = {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY}
    return json.loads(json.dumps(raw | {"candidates": config.num_candidates, "cache_fingerprint": cache_fingerprint}))


def _readable(path: Path) -> bool:
    """The file passes the checks training makes (format, checksum, ids): only such a file is reused."""
    try:
        read_negatives(path)
    except LrcError:
        return False
    return True


def _decide(config: NegativesConfig, wanted: dict[str, Any]) -> str:
    out, meta = config.output_path, manifest_path(config.output_path)
    recorded = json.loads(meta.read_text(encoding="utf-8")) if out.is_file() and meta.is_file() else None
    if recorded is None:  # nothing, or a build killed before its manifest: nothing to reuse
        held, changes = (reuse.UNFINISHED if out.exists() else reuse.EMPTY), []
    elif "settings" not in recorded or not _readable(out):  # built by an lrc that did not record them, or
        held, changes = reuse.UNFINISHED, []  # damaged since: rebuilt, as it always was
    else:
        held, changes = reuse.FINISHED, reuse.diff(recorded["settings"], wanted, run_only=_RUN_ONLY)
    return reuse.decide(held, changes, overwrite=config.overwrite, where=out, what="a negatives file",
                        option="--output", labels={"cache_fingerprint": "the cache (re-extracted or another cache)"})


def _build(config: NegativesConfig) -> Path:
    start = time.perf_counter()
    check_outputs(config.output_path)
    cache = open_cache(config.cache_dir, config.verify_cache)
    wanted = settings(config, cache.fingerprint)
    if _decide(config, wanted) == reuse.REUSE:
        logger.info("%s already holds these negatives: reusing it", config.output_path)
        return config.output_path
    task = cache.manifest["task"]  # None for a corpus cache
    train = cache.split("train")
    # A corpus cache has no labels: `hard` there means the nearest other windows, excluding only the row itself
    # and exact duplicates of its input (no label to exclude same-class rows by).
    vectors, labels, keys = train.pooled(), train.labels() if task else None, train.input_keys()
    logger.info("read %d train rows of %s (pooled width %d) in %.1f s", train.num_rows, cache.path,
                vectors.shape[1], time.perf_counter() - start)
    regression = bool(task and task["is_regression"])
    labels = labels.astype(np.float32 if regression else np.int64) if labels is not None else None
    ids, scores, stats = find_candidates(vectors, labels, keys, regression, config)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lrc_version": __version__,
        "cache_fingerprint": cache.fingerprint, "cache_dir": str(cache.path), "task": task["name"] if task else None,
        "strategy": config.strategy, "k": config.k, "candidates": config.num_candidates, "seed": config.seed,
        "regression_margin": config.regression_margin if regression else None, "rows": train.num_rows,
        **stats, "settings": wanted,
    }
    out = config.output_path
    manifest_path(out).unlink(missing_ok=True)  # a manifest beside a file being replaced would vouch for it
    write_negatives(out, ids, scores, meta)
    meta["seconds"] = round(time.perf_counter() - start, 2)
    atomic.write_json(manifest_path(out), meta, sort_keys=True)  # last: its presence says the build finished
    logger.info("wrote %s (%d rows x %d candidates, %s) in %.1f s", out, len(ids), ids.shape[1], config.strategy,
                meta["seconds"])
    return out
