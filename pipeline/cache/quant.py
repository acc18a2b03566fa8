"""8-bit hidden states (docs/DESIGN.md §3, `--hidden-dtype int8`): symmetric absmax quantisation, one scale per
token per layer.

A token vector x (d' values) is stored as q = round(x / s) in [-127, 127] (int8) with s = max|x| / 127
(float32, in a column of its own beside the values). Dequantised, x' = q * s, so |x - x'| <= s / 2 =
max|x| / 254 per value: the error is relative to the token's own largest value, which is what a cosine
sees. A scale per token (not per layer or per tensor) keeps one outlier token (e.g. [CLS] or [SEP], often
10x the others in BERT-like teachers) from costing every other token its precision; it costs 4 bytes per
d' bytes. An all-zero token gets scale 0 and dequantises to zeros exactly.

Quantising runs in torch at extraction (before the copy off the device); dequantising runs in torch in
the training data path (`pipeline/student/batches.py: to_device`), on the device the step runs on, so a GPU
receives half the bytes.
"""

from __future__ import annotations

from typing import Any

import torch

INT8 = "int8"
QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable
SCHEME = {  # recorded in the manifest (`hidden_quant`); a manifest without it holds floats (float16/float32)
    "scheme": "int8-symmetric-absmax",
    "scale": "one per token per layer: max|x| / 127",
    "scale_column": "hidden_<layer>_scale",
    "scale_dtype": "float32",
    "dequantize": "x = q * scale",
    "pooled_dtype": "float16",  # the pooled vectors (negatives index) stay floats
}


def scale_column(layer: int) -> str:
    return f"hidden_{layer}_scale"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, d') float -> (T, d') int8 values, (T,) float32 scales. Non-finite input gives a non-finite scale."""
    x = x.float()
    scale = x.abs().amax(-1) / QMAX  # (T,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token: q = 0, scale 0
    q = torch.round(x / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (T, d')
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., d') int8 and (...) scales -> (..., d') `dtype`; padding (q = 0, scale 0) stays zero."""
    return (q.to(dtype) * scale.to(dtype).unsqueeze(-1))


def settings_entry(hidden_dtype: str) -> dict[str, Any]:
    """What an int8 cache adds to its settings (so to its fingerprint and manifest); float caches add
    nothing, so their settings stay those of caches written before int8 existed."""
    return {"hidden_quant": SCHEME} if hidden_dtype == INT8 else {}

