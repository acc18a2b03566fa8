#!/bin/bash
# int8 against float16 where a student learns (docs/RESULTS.md, "Training from int8 where the student learns"):
# the short-budget work dir of benchmarks/short_budget.py (the demo's SST-2 teacher and float16 cache), the
# same cache re-extracted as int8, and LRC's two stages from a general student for one epoch, seed 42.
#   bash benchmarks/int8_quality.sh data/short data/general/general-cos_nce
set -euo pipefail
W=${1:?the short_budget.py work dir}
GENERAL=${2:?a general student dir}
lrc extract-teacher --teacher "$W/teacher-sst2" --task sst2 --max-train-examples 4000 --subsample-seed 42 \
    --student-layers 4 --max-length 64 --hidden-dtype int8 -o "$W/cache-sst2-int8"
lrc build-negatives --cache "$W/cache-sst2-int8" --k 4 --seed 42
for cache in cache-sst2-int8 cache-sst2; do
    lrc train-student --cache "$W/$cache" -o "$W/runs/$cache-LRC-general-seed42" --init "$GENERAL" \
        --epochs 1 --lr 5e-4 --batch-size 16 --seed 42 --keep last
done
du -sb "$W/cache-sst2/shards" "$W/cache-sst2-int8/shards"
