"""int8 against float16 hidden states on real caches of the same teacher and rows.

Reports, for a float16 cache and an int8 cache extracted from the same teacher over the same rows:
- bytes per train example of each, against tokens x layers x d' x 2 (the float16 size rule);
- per stored layer, the cosine between each dequantised int8 token vector and its float16 original over
  every real token of the train split: min, 1st percentile, mean;
- COS-NCE (flat, token, cls) on the same batch (the same 16 anchors and K = 4 negatives) read from both
  caches, with two stand-in students: random vectors, and the teacher's vectors plus noise (cosine ~0.9,
  the regime a trained student is in).

    python benchmarks/bench_int8.py --fp16 /work/qual/mrpc-float16 --int8 /work/qual/mrpc-int8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reader import open_cache
from pipeline.student import losses
from pipeline.student.batches import CacheDataset, to_device


class FixedNegatives:
    """K = 4 negatives per anchor, the same for both caches: (row + 97 d) mod N."""

    def __init__(self, n: int) -> None:
        self.n = n

    def sample(self, row_ids: np.ndarray, epoch: int) -> np.ndarray:
        return np.stack([(np.asarray(row_ids) + 97 * d) % self.n for d in (1, 2, 3, 4)], axis=1)


def size_line(path: Path) -> tuple[float, float]:
    cache = open_cache(path, "size")
    m, train = cache.manifest, cache.manifest["splits"]["train"]
    tokens = int(np.sum(cache.split("train").column("input_ids").combine_chunks().value_lengths().to_numpy()))
    rule = tokens * len(m["layers"]) * m["hidden_size"] * 2
    return train["bytes"] / train["rows"], train["bytes"] / rule


def cosines(fp16: Path, int8: Path) -> dict[int, np.ndarray]:
    a, b = open_cache(fp16, "size").split("train").reader(), open_cache(int8, "size").split("train").reader()
    out = {}
    for j in a.layers:
        per = []
        for row in range(a.num_rows):
            x, y = a.dequantized(row, j), b.dequantized(row, j)
            per.append((x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30))
        out[j] = np.concatenate(per)
    return out


def cos_nce_both(fp16: Path, int8: Path) -> list[tuple[str, str, float, float]]:
    n = open_cache(fp16, "size").manifest["splits"]["train"]["rows"]
    rows = list(np.random.default_rng(0).permutation(n)[:16])
    layers = open_cache(fp16, "size").layers
    batches = [to_device(CacheDataset(p, "train", layers, FixedNegatives(n)).__getitems__(rows), torch.device("cpu"))
               for p in (fp16, int8)]
    g = torch.Generator().manual_seed(0)
    teacher = batches[0]["teacher_hidden"].float()  # (N, B, L, D): the stand-in students are built from fp16 once
    students = {"random": torch.randn(teacher.shape, generator=g),
                "teacher + noise": teacher + 0.5 * teacher.std() * torch.randn(teacher.shape, generator=g)}
    out = []
    for name, student in students.items():
        for granularity in ("flat", "token", "cls"):
            values = []
            for batch in batches:
                total = sum(losses.cos_nce(student[s], batch["teacher_hidden"][s].float(), batch["attention_mask"],
                                           batch["negative_hidden"][s].float(), batch["negative_mask"], granularity)
                            for s in range(len(layers)))
                values.append(float(total))
            out.append((name, granularity, values[0], values[1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (b16, r16), (b8, r8) = size_line(args.fp16), size_line(args.int8)
    print(f"| cache | bytes/example | vs tokens x layers x d' x 2 |\n|---|---:|---:|")
    print(f"| float16 | {b16:,.0f} | {r16:.3f}x |\n| int8 | {b8:,.0f} | **{r8:.3f}x** ({b8 / b16:.3f}x of float16) |")
    print("\n| layer | tokens | cosine min | 1st percentile | mean |\n|---|---:|---:|---:|---:|")
    for j, c in cosines(args.fp16, args.int8).items():
        print(f"| {j} | {len(c):,} | {c.min():.6f} | {np.percentile(c, 1):.6f} | {c.mean():.6f} |")
    print("\n| student | granularity | COS-NCE from float16 | from int8 | difference |\n|---|---|---:|---:|---:|")
    for name, granularity, a, b in cos_nce_both(args.fp16, args.int8):
        print(f"| {name} | {granularity} | {a:.6f} | {b:.6f} | {b - a:+.2e} |")


if __name__ == "__main__":
    main()
