#!/usr/bin/env bash
# The checks that need a GPU, as one call of the workplace's device tool (a lent NVIDIA machine: torch
# 2.11 on Python 3.12, no FBGEMM, no TorchRec, no network). About 5 minutes on an H100 plus the start.
#
#   make gpu-wheels                                    # here: the three wheels into .whl/
#   device run: bash tools/gpu_check.sh   (carry: [".whl"], timeout_s: 540)
#
# Writes what it saw under $OUT (the device tool brings that folder back) and keeps going past a failed
# step, so one run reports every step; the exit status says whether all of them passed.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, keep its output, note failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    if timeout "$seconds" "$@" >"$OUT/$name.txt" 2>&1; then
        tail -n 12 "$OUT/$name.txt"
    else
        echo "!! $name failed (exit $?)"
        tail -n 40 "$OUT/$name.txt"
        failed=1
        return 1
    fi
}

ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'make gpu-wheels' here first"; exit 2; }
# Our three wheels only: their dependencies (pluggy, click, tqdm, tensorboard, numpy) are in the image;
# numba may not be, and then the CPU-side id map and fused update run their torch code (same results).
$PY -m pip install --quiet --no-deps --no-index --force-reinstall .whl/*.whl || exit 2
step device 30 $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 2  # no GPU: every CUDA test below would only skip
# The modules and every sharding on CUDA against the CPU; the containers on CUDA;
# tests/gpu includes the pipelined loop and the bf16 output path at world size 1 on NCCL.
step cuda_tests 240 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/core/test_kernel_cuda.py \
    tests/core/test_sparse_cuda.py
# TorchRec's introduction as written for GPUs (NCCL, device=torch.device("cuda")).
step intro 90 $PY docs/examples/intro.py --cuda
# The DLRM trainer's step on CUDA: samples/s and peak GPU memory, fp32 and bf16 autocast.
for precision in fp32 bf16; do
    step "dlrm_$precision" 150 $PY tools/bench/dlrm.py --device cuda --nproc 1 --backends auto \
        --precision "$precision" --steps 20 --repeats 3 --warmup 5 --rounds 1
done
exit $failed
