#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (run from the repository root on a GPU machine):
#   1. the CUDA tests (tests/test_cuda.py: CUDA against CPU, exact resume, nccl, every stage command);
#   2. training throughput of the 4 x 312 student (batch 16 and 64, file and in-batch negatives, fp16 and int8);
#   3. peak tensor memory of cached training against online distillation (BERT-base-shaped teacher), SST-2 and
#      MRPC lengths.
# Logs go to $1 (default gpu-checks/); the names after it pick a subset (tests, throughput, memory).
# Results are recorded in docs/PERFORMANCE.md.
set -uo pipefail
out="${1:-gpu-checks}"
checks="${*:2}"
checks="${checks:-tests throughput memory}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >>"$out/gpu.txt"
quiet() { grep -v -E "it/s|ex/s|^Loading|Writing"; }
if [[ " $checks " == *" tests "* ]]; then
    python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -60 >"$out/cuda_tests.log"
fi
cd benchmarks
if [[ " $checks " == *" throughput "* ]]; then
    python bench_throughput.py --device cuda --output "$out/throughput.json" 2>&1 | quiet >"$out/throughput.log"
fi
if [[ " $checks " == *" memory "* ]]; then
    for task in sst2 mrpc; do
        python bench_train.py --device cuda --teachers bert-base --task "$task" --variants ab --repeats 1 --steps 30 2>&1 | quiet
    done >"$out/memory.log"
fi
