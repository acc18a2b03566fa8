"""What every stage's config shares: the data-dir variable and default, the bundled backbones, the default layer
map, where a task's examples come from (DataConfig) and reading a --config file. The configs themselves are one
frozen dataclass per stage, validated on construction, and hold the only defaults: teacher_config.py (finetune-teacher,
extract-teacher), negatives_config.py, train_config.py (train-student, sweep) and apps_config.py (evaluate, export,
demo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import LrcError
from pipeline.core.options import check_seed, check_whole, option, require

DATA_DIR_ENV = "LRC_DATA_DIR"
BUNDLED_BACKBONE = "bundled:all-MiniLM-L6-v2"
BUNDLED_MPNET = "bundled:all-mpnet-base-v2"  # 12 x 768, the optional extra lrc[mpnet]


def default_data_dir() -> Path | None:
    """The GLUE data root from $LRC_DATA_DIR, or None (then tasks fall back to the hub)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """phi(i) = round_half_up(i * N / M) for i = 1..M: the last student layer maps to the last teacher layer."""
    n, m = teacher_layers, student_layers
    return [(2 * i * n + m) // (2 * m) for i in range(1, m + 1)]


def data_dir_option() -> Any:
    """--data-dir, declared once for DataConfig and the demo: $LRC_DATA_DIR when not given."""
    return option(default_factory=default_data_dir, flags=("--data-dir",), envvar=DATA_DIR_ENV, help=(
        f"A glue_data/ folder in the standard GLUE layout (or set ${DATA_DIR_ENV}). Unset: load from the Hugging Face hub."))


@dataclass(frozen=True)
class DataConfig:
    """Where a task's examples come from: a glue_data/ root, the hub, or explicit files."""

    # Declared once for every command that reads task data (finetune-teacher, extract-teacher, evaluate nest it).
    task: str = option(flags=("--task",), help=(
        "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, wnli."))
    data_dir: Path | None = data_dir_option()
    train_file: Path | None = option(None, help="Your own train file (.csv, .tsv, .jsonl, .parquet) instead of GLUE's.")
    dev_file: Path | None = option(None, help="Your own dev file (same formats) instead of GLUE's.")
    text_column: str | None = option(None, help=(
        "Column of the first text in --train-file/--dev-file (default: the task's)."))
    text_pair_column: str | None = option(None, help="Column of the second text, for pair tasks (default: the task's).")
    label_column: str | None = option(None, help="Label column in --train-file/--dev-file (default: label).")
    # a seeded random subset of train, None = all
    max_train_examples: int | None = option(None, help=(
        "Use a seeded random subset of this many train examples (default: all)."))
    subsample_seed: int = option(0, help="Seed of the --max-train-examples subset.")

    def __post_init__(self) -> None:
        require(bool(self.task), "no task given: pass --task (e.g. --task sst2)")
        if self.max_train_examples is not None:
            check_whole("--max-train-examples", self.max_train_examples)
        check_seed("--subsample-seed", self.subsample_seed)
        require(
            self.text_pair_column is None or self.text_column is not None,
            "--text-pair-column needs --text-column too",
        )


def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML or YAML mapping of option names to values (dashes or underscores)."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise LrcError(f"config file {path} must end in .toml, .yaml or .yml")
    if not path.is_file():
        raise LrcError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        import tomllib

        parse = tomllib.loads
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LrcError(f"reading {path} needs pyyaml: `pip install pyyaml`, or write the file as TOML") from None
        parse = yaml.safe_load
    try:
        data = parse(path.read_text()) or {}
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: one line, not a traceback
        raise LrcError(f"config file {path} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LrcError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
