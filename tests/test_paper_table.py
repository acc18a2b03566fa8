"""benchmarks/paper_table.py in its smoke mode (a tiny random teacher, 48 rows of real MRPC, a sliver of the
paper's budget): the whole recipe runs on the CPU and writes the table. Catches: a stage of the recipe that no
longer fits the library's API, a method row missing from the table, a student that is not kept LAST, the
student budget not following the paper's epochs (90 for a task under 10k rows), predictions not recorded
beside the measured times, and a rerun that retrains instead of reusing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def run(work: Path, glue_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "LRC_DATA_DIR": str(glue_dir)}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_table.py"), "--smoke", "--tasks", "mrpc",
                           "--work-dir", str(work)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_mode_writes_the_table_and_a_rerun_reuses_everything(tmp_path: Path, glue_dir: Path, minilm_dir: Path) -> None:
    work = tmp_path / "paper"
    first = run(work, glue_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((work / "paper_table.json").read_text())
    entry = results["tasks"]["mrpc"]
    assert set(entry["students"]) == {"LRC", "KD-only", "Hidden-MSE"}
    # 48 rows -> 3 batches of 16 per epoch; 90 epochs x budget 0.01 = 0.9 epochs -> 3 steps
    assert entry["student_steps"] == 3
    for stage in ("teacher", "extract", "negatives", "LRC", "KD-only", "Hidden-MSE"):
        assert entry["predicted_s"][stage] > 0 and entry["measured_s"][stage] >= 0
    for method in ("LRC", "KD-only", "Hidden-MSE"):
        summary = json.loads((work / "mrpc" / "students" / method / "training_summary.json").read_text())
        assert summary["kept"] == "last" and summary["best"]["step"] == 3
    assert entry["speed_and_size"]["ratios"]["compression_parameters"] > 1
    table = (work / "paper_table.md").read_text()
    for row in ("| teacher |", "| LRC 2x24 |", "| KD-only 2x24 |", "| Hidden-MSE 2x24 |"):
        assert row in table

    second = run(work, glue_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("reusing") >= 4, second.stderr[-3000:]  # the teacher and the three students
