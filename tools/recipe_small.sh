#!/usr/bin/env bash
# The MLPerf DLRMv2 recipe of docs/dlrm.md, run end to end at a size one small CPU machine takes:
#
#   1. sample: the real Criteo rows of tests/data/criteo_sample/ (300) laid out as three 1TB-style
#      days, through dlrm preprocess -> dlrm multihot -> dlrm train --preset mlperf-dcnv2 ->
#      dlrm evaluate, the tables capped at 400,000 rows. It checks the commands, not the model:
#      200 training rows cannot teach 3.3M embedding rows anything, and 50 validation rows give an
#      AUC whose noise is about +-0.1.
#   2. planted: dlrm synth --multi-hot data with a known best AUC, trained with the preset
#      (100,000-row tables, a smaller batch; everything else the preset's); the trainer prints the
#      test AUC beside that optimum.
#
#   tools/recipe_small.sh [WORK] [sample|planted|all]      (WORK defaults to /tmp/recipe_small)
#
# Environment: DLRM (default: .venv/bin/dlrm of this checkout), ROWS (planted rows, default
# 60000), BATCH (planted batch, default 512), OMP_NUM_THREADS (default 2). Figures measured with
# it are in docs/dlrm.md, section "MLPerf DLRMv2".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/recipe_small}"
what="${2:-all}"
dlrm="${DLRM:-$here/.venv/bin/dlrm}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
sample="$here/tests/data/criteo_sample"
# the 1TB cardinalities of the preset, every cap of 40M (and anything above 400,000) at 400,000
sizes=400000,39060,17295,7424,20265,3,7122,1543,63,400000,400000,400000,10,2209,11938,155,4,976,14,400000,400000,400000,400000,12973,108,36

timed() { /usr/bin/time -f "  [%e s wall, %U s user, %M KiB max RSS]" "$@"; }

run_sample() {
    local dir="$work/sample"
    rm -rf "$dir" && mkdir -p "$dir/days"
    # DeepCTR's 200 rows (CSV with header) and PaddleRec's 100 (TSV, made CSV: no field holds a
    # comma), 100 rows a day; the last day's first half validates, its second half tests
    {
        tail -n +2 "$sample/criteo_sample.txt"
        tr '\t' ',' <"$sample/sample_train.txt"
    } | split -l 100 -d -a 1 - "$dir/rows_"
    for day in 0 1 2; do
        { head -1 "$sample/criteo_sample.txt"; cat "$dir/rows_$day"; } | gzip -n >"$dir/days/day_$day.gz"
    done
    rm "$dir"/rows_*
    timed "$dlrm" preprocess "$dir/days" "$dir/pre" --quiet
    timed "$dlrm" multihot "$dir/pre" "$dir/mh" --num-embeddings-per-feature "$sizes"
    timed "$dlrm" train --preset mlperf-dcnv2 --data "$dir/mh" --num-embeddings-per-feature "$sizes" \
        --batch-size 32 --validation-freq 3 --checkpoint-dir "$dir/ckpt" --checkpoint-every 3 \
        --keep-checkpoints 1 --log-every 1 --quiet
    timed "$dlrm" evaluate --checkpoint "$dir/ckpt" --data "$dir/mh" --split test
}

run_planted() {
    local dir="$work/planted"
    rm -rf "$dir"
    timed "$dlrm" synth "$dir" --rows "${ROWS:-60000}" --multi-hot mlperf --num-embeddings 100000
    timed "$dlrm" train --preset mlperf-dcnv2 --data "$dir/multihot" --num-embeddings 100000 \
        --batch-size "${BATCH:-512}" --validation-freq 25 --logdir "$dir/runs" --quiet
}

case "$what" in
    sample) run_sample ;;
    planted) run_planted ;;
    all) run_sample && run_planted ;;
    *) echo "usage: $0 [WORK] [sample|planted|all]" >&2 && exit 2 ;;
esac
