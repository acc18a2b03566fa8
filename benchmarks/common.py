"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this imports as `common`)."""

from __future__ import annotations

import time

import torch


def gemm_probe() -> float:
    """fp32 GFLOP/s of a 1024^3 matmul: this machine's speed drifts, so benchmarks report it before and after."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
