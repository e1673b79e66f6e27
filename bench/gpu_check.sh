#!/usr/bin/env bash
# The GPU figures of bench/README.md in one call of at most 8 minutes (issue 14), on a machine
# with one CUDA GPU. Every step has its own time limit, so one that hangs or fails costs only
# its share; what each printed is kept under $OUT (default bench/results/gpu).
#
#   bash bench/gpu_check.sh            # from the repository root, with .venv set up
#
# Steps (seconds allowed):
#   1. bench_train_step, the notebook's full-training configuration (FPN 128, batch 16,
#      224 px): fp32 (70), AMP (70), AMP + compile of the fixed-shape parts (120), AMP +
#      whole-model compile (120): it/s, peak GPU memory, inference rows;
#   2. bench_syncs on CUDA: sync-type ops and the real syncs of set_sync_debug_mode (40);
#   3. bench_roi_align on CUDA: fpn_roi_align against torchvision.ops.roi_align (20);
#   4. bench_loader: the loader's headroom over a 20 it/s step, 2 workers (40).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.txt, note a failure and go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.txt"
    [ $rc -eq 0 ] || echo "!! $name exited with $rc"
}

STEP=(bench/bench_train_step.py --device cuda --fpn-channels 128 --batch-size 16
      --image-size 224 --repeats 20)
run step_fp32 70 "$PY" "${STEP[@]}" --out "$OUT/step_fp32.json"
run step_amp 70 "$PY" "${STEP[@]}" --amp --out "$OUT/step_amp.json"
run step_amp_compile 120 "$PY" "${STEP[@]}" --amp --compile parts --skip-inference \
    --out "$OUT/step_amp_compile.json"
run step_amp_compile_whole 120 "$PY" "${STEP[@]}" --amp --compile whole --skip-inference \
    --out "$OUT/step_amp_compile_whole.json"
run syncs 40 "$PY" bench/bench_syncs.py --device cuda --fpn-channels 128 \
    --out "$OUT/syncs.json"
run roi_align 20 "$PY" bench/bench_roi_align.py --device cuda --out "$OUT/roi_align.json"
run loader 40 "$PY" bench/bench_loader.py --repeats 2 --out "$OUT/loader.json"
