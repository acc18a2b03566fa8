"""The two copy paths of pipeline/student/gather.py side by side, to place its SLICE_BYTES threshold.

One batch's hidden states of one layer (64 anchors + 256 negatives = 320 rows) copied into a reused
padded (320, width, D) block from a synthetic shard of 20,000 rows: by the fancy-index gather (`_take`
into a temporary, then scattered) and by one slice copy per row (`_copy_rows`), for several row sizes.
Best of 7 rounds of 20 batches each, so a busy machine inflates both alike.

    python benchmarks/bench_gather.py
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.student import gather

ROWS, SHARD_ROWS = 320, 20_000
CASES = [(768, "float16", 25), (768, "float16", 60), (384, "float16", 25), (384, "int8", 25), (384, "int8", 60),
         (128, "float16", 25)]  # (D, dtype, longest row + 1): 25 ~ SST-2 rows, 60 ~ sentence pairs


def case(d: int, dtype: str, longest: int, rng: np.random.Generator) -> dict[str, float]:
    lengths = rng.integers(3, longest, SHARD_ROWS)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = (rng.standard_normal((int(offsets[-1]), d)) * 20).astype(dtype)
    out = np.zeros((ROWS, longest, d), dtype)
    flat = out.reshape(-1, d)

    def part() -> gather._Part:
        rows = rng.integers(0, SHARD_ROWS, ROWS)
        out_rows = np.arange(ROWS)
        src, dst = gather._token_ranges(offsets[rows], lengths[rows], out_rows, longest)
        return gather._Part(0, out_rows, rows, offsets[rows], lengths[rows], src, dst)

    paths = {"gather": lambda p: flat.__setitem__(p.dst, gather._take(values, p.src)),
             "slices": lambda p: gather._copy_rows(values, p, out)}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(7):
        for name, copy in paths.items():
            parts = [part() for _ in range(20)]
            start = time.perf_counter()
            for p in parts:
                copy(p)
            best[name] = min(best[name], (time.perf_counter() - start) / len(parts) * 1e3)
    row_bytes = float(lengths.mean()) * d * np.dtype(dtype).itemsize
    return {"row_bytes": round(row_bytes), **{f"{k}_ms": round(v, 3) for k, v in best.items()}}


def main() -> None:
    rng = np.random.default_rng(0)
    print("| D | dtype | mean row bytes | gather ms/batch | slices ms/batch | chosen (SLICE_BYTES "
          f"{gather.SLICE_BYTES}) |\n|---:|---|---:|---:|---:|---|")
    for d, dtype, longest in CASES:
        r = case(d, dtype, longest, rng)
        chosen = "slices" if r["row_bytes"] >= gather.SLICE_BYTES else "gather"
        print(f"| {d} | {dtype} | {r['row_bytes']} | {r['gather_ms']} | {r['slices_ms']} | {chosen} |")


if __name__ == "__main__":
    main()
