"""Checking a cache's files against its manifest at open (docs/DESIGN.md §3): the check levels and the checks.

How much of a cache is checked when it is opened (`open_cache(check=...)`; numbers in docs/RELIABILITY.md). The
same levels apply to the shards and to every other file the manifest records (`files`: tokenizer, teacher
weights); the manifest itself is checked against its fingerprint whenever it is read (`manifest.read_manifest`):
- `size`: every shard exists with its recorded byte size (a stat per shard).
- `quick`: also the sha256 of each shard's size, first and last 64 KiB and 16 sampled blocks, against
  the manifest: catches truncation, a damaged header or footer and large-scale damage, in a few reads
  per shard whatever its size.
- `full`: the sha256 of every byte against the manifest: catches any changed byte.
- `auto`: `full` when the cache fits in half the RAM (an epoch reads every byte anyway, and the hash
  leaves them in the page cache for it), else `quick` (hashing would cost one more pass over the disk).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.cache.format import CONTENT_PATHS, sample_sha256, sha256_file
from pipeline.cache.manifest import content_files, content_path, shard_path
from pipeline.core.errors import LrcError

log = logging.getLogger(__name__)

CHECKS = ("size", "quick", "full", "auto")
REEXTRACT = "re-extract with `lrc extract-teacher --overwrite`"


def half_the_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def resolve_check(check: str, total_bytes: int) -> str:
    """`auto` -> `full` for a cache that fits in half the RAM, else `quick`; other levels unchanged."""
    if check not in CHECKS:
        raise LrcError(f"unknown cache check {check!r}: choose one of {', '.join(CHECKS)}")
    if check != "auto":
        return check
    return "full" if total_bytes <= half_the_ram() else "quick"


def verify_shards(cache_dir: Path, manifest: dict[str, Any], check: str) -> None:
    """Every shard and every other recorded file exists with its recorded size, and (`quick`, `full`) its
    recorded hash; no file the manifest does not record sits among the tokenizer or teacher weights."""
    total = sum(info["bytes"] for info in manifest["splits"].values()) + \
        sum(entry["bytes"] for entry in manifest["files"].values())
    check = resolve_check(check, total)
    verify_files(cache_dir, manifest, check)
    unsampled = 0
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            path = shard_path(cache_dir, split, entry)
            if not path.is_file():
                raise LrcError(f"cache {cache_dir} is missing shard {entry['file']}: {REEXTRACT}")
            if path.stat().st_size != entry["bytes"]:
                raise LrcError(f"shard {path} has {path.stat().st_size} bytes, manifest says {entry['bytes']}: {REEXTRACT}")
            if check == "full" and sha256_file(path) != entry["sha256"]:
                raise LrcError(f"shard {path} does not match its checksum in the manifest (corrupted or changed): "
                               f"{REEXTRACT}")
            if check == "quick" and "sample_sha256" not in entry:
                unsampled += 1
            elif check == "quick" and sample_sha256(path) != entry["sample_sha256"]:
                raise LrcError(f"shard {path} does not match its sampled checksum in the manifest (corrupted or "
                               f"changed): {REEXTRACT}")
    if unsampled:  # written by an lrc before sampled checksums: sizes only, unless asked for `full`
        log.warning("%d shard(s) of %s have no sampled checksum (an older cache): only their sizes were checked; "
                    "`lrc inspect-cache --verify` checks every byte", unsampled, cache_dir)
    log.debug("cache %s: %s check of %.1f MB passed", cache_dir, check, total / 1e6)


def verify_files(cache_dir: Path, manifest: dict[str, Any], check: str) -> None:
    """The files besides the shards (CONTENT_PATHS) at a resolved check level. A file added by hand (e.g. an
    added_tokens.json that changes what the tokenizer does) is refused too: the loaders read whatever is there."""
    recorded = manifest["files"]
    extra = sorted(set(content_files(cache_dir)) - set(recorded))
    if extra:
        raise LrcError(f"cache {cache_dir} holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} in "
                       f"{' or '.join(CONTENT_PATHS)}, which its manifest does not record (added or changed by hand "
                       f"since extraction): {REEXTRACT}")
    for rel, entry in recorded.items():
        path = content_path(cache_dir, rel)
        if not path.is_file():
            raise LrcError(f"cache {cache_dir} is missing {rel}: {REEXTRACT}")
        if path.stat().st_size != entry["bytes"]:
            raise LrcError(f"{path} has {path.stat().st_size} bytes, manifest says {entry['bytes']}: {REEXTRACT}")
        if (check == "full" and sha256_file(path) != entry["sha256"]) or \
                (check == "quick" and sample_sha256(path) != entry["sample_sha256"]):
            raise LrcError(f"{path} does not match its {'sampled ' if check == 'quick' else ''}checksum in the "
                           f"manifest (changed since extraction): {REEXTRACT}")
