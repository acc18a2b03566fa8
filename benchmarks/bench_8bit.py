"""8-bit schemes for hidden states compared on one real float16 cache (keep the better).

Every real token vector of the train split, per stored layer, is quantised in memory by each scheme and
dequantised, then compared with its float16 original: the cosine (min, 1st percentile, mean), which is
what COS-NCE reads, and the relative L2 error. Schemes (bytes per token of d' values in brackets):
  int8 per token      lrc's `--hidden-dtype int8`: absmax scale per token per layer       (d' + 4)
  fp8 e4m3 per token  float8_e4m3fn values, scale max|x| / 448 per token per layer        (d' + 4)
  int8 per channel    absmax scale per channel per layer, over the whole split            (d')
  fp8 e4m3 per channel  the same with e4m3 values                                         (d')
  fp8 e4m3 raw        a plain cast, no scale                                              (d')

    python benchmarks/bench_8bit.py --cache DIR     # a float16 (or float32) cache
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import quant
from pipeline.cache.reader import open_cache

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def _per_token_fp8(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp_min(1e-30)
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def _per_channel(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    scale = (x.abs().amax(0, keepdim=True) / (E4M3_MAX if fp8 else quant.QMAX)).clamp_min(1e-30)
    if fp8:
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    return torch.round(x / scale).clamp(-quant.QMAX, quant.QMAX) * scale


SCHEMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8 per token (lrc)": lambda x: quant.dequantize(*quant.quantize(x)),
    "fp8 e4m3 per token": _per_token_fp8,
    "int8 per channel": lambda x: _per_channel(x, fp8=False),
    "fp8 e4m3 per channel": lambda x: _per_channel(x, fp8=True),
    "fp8 e4m3 raw": lambda x: x.to(torch.float8_e4m3fn).float(),
}


def layer_tokens(cache_dir: Path) -> dict[int, torch.Tensor]:
    """Every real token vector of the train split, per stored layer: (tokens, d') float32."""
    reader = open_cache(cache_dir, "size").split("train").reader()
    return {j: torch.from_numpy(np.concatenate([reader.dequantized(r, j) for r in range(reader.num_rows)]).astype(np.float32))
            for j in reader.layers}


def compare(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30).double().numpy()
    rel = ((x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).double().numpy()
    return {"min": cos.min(), "p1": np.percentile(cos, 1), "mean": cos.mean(), "rel": rel.mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="a float16 or float32 cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = layer_tokens(args.cache)
    print("| scheme | layer | tokens | max abs | cosine min | 1st pct | mean | rel. L2 error |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, scheme in SCHEMES.items():
        for j, x in tokens.items():
            r = compare(x, scheme(x))
            print(f"| {name} | {j} | {len(x):,} | {x.abs().max():.1f} | {r['min']:.5f} | {r['p1']:.5f} | "
                  f"{r['mean']:.6f} | {r['rel']:.5f} |")


if __name__ == "__main__":
    main()
