"""`lrc build-negatives`' config (NegativesConfig), its fields declared like TrainConfig's (pipeline/core/options.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.options import CACHE_CHECKS, check_real, check_seed, check_whole, help_of, option, require
from pipeline.core.train_config import TrainConfig

NEGATIVE_STRATEGIES = ("random", "hard", "mixed")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


@dataclass(frozen=True)
class NegativesConfig:
    """`lrc build-negatives`: cache dir -> negatives.arrow (M candidates per train row)."""

    # Declared like TrainConfig's fields (pipeline/core/options.py), so cli.py builds build-negatives' options from them.
    cache_dir: Path = option(help="A cache dir written by `lrc extract-teacher`.", flags=("--cache",))
    k: int = option(4, flags=("--k",), help="Negatives per example used in each training step (K).")
    candidates: int | None = option(None, help="Candidates stored per example (M >= K); default max(4K, 16).")
    strategy: str = option("random", help="random (uniform, the paper's), hard (nearest other-label neighbours) or mixed.")
    index: str = option("auto", help="auto (exact when small, approximate when large), flat, ivf or hnsw.")
    output: Path | None = option(None, help="Output file; default <cache>/negatives.arrow.")
    hard_pool: int | None = option(None, help=(
        "Width of the nearest-neighbour list hard candidates are drawn from; default 4M."))
    regression_margin: float = option(0.5, help="Regression tasks: hard negatives differ in label by at least this.")
    exact_max_rows: int = 50_000  # `auto` uses exact search up to this many rows (no flag)
    recall_sample: int = 1000  # queries checked against exact search for an approximate index (no flag)
    seed: int = option(0, help="Random seed; the same seed gives the same file.")
    verify_cache: str = option("auto", flags=("--verify-cache",), help=help_of(TrainConfig, "verify_cache"))
    overwrite: bool = option(False, help="Replace a negatives file built with other settings (the same settings reuse it).")

    def __post_init__(self) -> None:
        check_whole("--k", self.k)
        if self.candidates is not None:
            check_whole("--candidates", self.candidates)
        require(
            self.candidates is None or self.candidates >= self.k,
            f"--candidates (M={self.candidates}) must be >= --k ({self.k})",
        )
        if self.hard_pool is not None:
            check_whole("--hard-pool", self.hard_pool)
        check_whole("exact_max_rows", self.exact_max_rows, 0)
        check_whole("recall_sample", self.recall_sample, 0)
        check_seed("--seed", self.seed)
        require(
            self.strategy in NEGATIVE_STRATEGIES,
            f"unknown --strategy {self.strategy!r}: choose one of {', '.join(NEGATIVE_STRATEGIES)}",
        )
        require(
            self.index in INDEX_TYPES,
            f"unknown --index {self.index!r}: choose one of {', '.join(INDEX_TYPES)}",
        )
        check_real("--regression-margin", self.regression_margin, low_open=False)
        require(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}, got {self.verify_cache!r}")

    @property
    def num_candidates(self) -> int:
        return self.candidates if self.candidates is not None else max(4 * self.k, 16)

    @property
    def output_path(self) -> Path:
        return self.output if self.output is not None else self.cache_dir / "negatives.arrow"
