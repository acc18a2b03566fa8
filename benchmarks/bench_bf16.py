"""Does `--precision bf16` pay on this CPU? fp32 against bf16 autocast, timed interleaved on one model.

Times what the stages run: a fine-tuning step (forward with a loss, backward, AdamW) as finetune-teacher does,
and an inference forward with every hidden state as extract-teacher does, each in fp32 and under
torch.autocast("cpu", bfloat16) (the library's `--precision bf16`), alternating fp32 and bf16 rounds so a change
of machine load hits both. A CPU with AMX or AVX-512 BF16 (`amx_bf16` / `avx512_bf16` in /proc/cpuinfo) runs bf16
matmuls in hardware; without them bf16 is emulated and slower than fp32. Prints one line per round and the CPU flags.

    python benchmarks/bench_bf16.py --model data/mpnet_cut/teacher --threads 1
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(amx_bf16|avx512_bf16|avx512f)\b", text)))


def timed(call: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model dir with a classification head")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per round and precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    ids = torch.randint(5, model.config.vocab_size - 5, (args.batch_size, args.length))
    mask, labels = torch.ones_like(ids), torch.randint(0, model.config.num_labels, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-12)  # a real update that leaves the weights alone

    def train_step(bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def forward(bf16: bool) -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    print(f"cpu flags: {' '.join(cpu_flags()) or 'none of amx_bf16/avx512_bf16/avx512f'}; threads {args.threads}; "
          f"batch {args.batch_size} x {args.length}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    for name, step in (("fine-tuning step", train_step), ("extraction forward", forward)):
        step(False), step(True)  # warm-up: allocator, autocast caches, oneDNN kernels
        ratios = []
        for round_ in range(args.rounds):
            fp32 = timed(lambda: step(False), args.repeats)
            bf16 = timed(lambda: step(True), args.repeats)
            ratios.append(fp32 / bf16)
            print(f"{name}, round {round_ + 1}: fp32 {fp32:.2f} s, bf16 {bf16:.2f} s, bf16 {fp32 / bf16:.2f}x faster")
        print(f"{name}: bf16 median {statistics.median(ratios):.2f}x faster (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
