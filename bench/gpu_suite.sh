#!/usr/bin/env bash
# One device session of benchmarks, run from the repository root:
#
#   bash bench/gpu_suite.sh                  # results in $OUT (default ./.benchout)
#   BENCH_SMOKE=1 bash bench/gpu_suite.sh    # the same steps on the CPU with the tiny model
#
# Steps, each under its own time limit and each run whatever happened to the one before:
#   env       nvidia-smi, torch/CUDA versions, CPUs, memory, free disk and /dev/shm
#   forward   bench/forward_gpu.py eager: sizes 504,644, B 1,8,32,64, streaming B 1,8,16 (9 frames)
#   precompute  bench/precompute_gpu.py: 2,000 640x480 JPEGs, janusvln, random vggt-1b: (a) pure
#             forward, (b) end-to-end run(), (c) naive loop, (d) sequence mode (history 8); GPU
#             utilisation sampled every 0.5 s meanwhile
#   compile   bench/forward_gpu.py with torch.compile, same sizes (last: compiles are slow and a
#             killed run loses its table, so it gets whatever time is left)
# Outputs: env.txt, forward_eager.{json,log}, precompute.{json,log}, gpu_util_precompute.csv,
# forward_compile.{json,log}, status.txt (one "step exit-code seconds" line per step). The suite
# exits 1 when any step failed or was skipped.
# SUITE_SECONDS (default 450) caps the whole suite; steps shrink their limits to fit.

set -u -o pipefail
source "$(dirname "${BASH_SOURCE[0]}")/suite_lib.sh"
suite_setup 450

if [[ -n "${BENCH_SMOKE:-}" ]]; then
    FORWARD_ARGS=(--device cpu --preset tiny --sizes 56 --batches 1,2 --quick)
    PRECOMPUTE_ARGS=(--device cpu --model tiny --images 24 --seq-items 6 --batch-size 4 --time-budget 120)
else
    FORWARD_ARGS=(--sizes 504,644 --batches 1,8,32,64 --stream-size 644 --stream-batches 1,8,16)
    PRECOMPUTE_ARGS=(--images 2000 --seq-items 200 --time-budget 170)
fi

echo "== env"
env_info 2>&1 | tee "$OUT/env.txt"

step forward_eager 150 "$PY" bench/forward_gpu.py "${FORWARD_ARGS[@]}" --modes eager \
    --time-budget 110 --out "$OUT/forward_eager.json"

smi_start "$OUT/gpu_util_precompute.csv"
step precompute 230 "$PY" bench/precompute_gpu.py "${PRECOMPUTE_ARGS[@]}" --workdir "$WORK" \
    --out "$OUT/precompute.json"
smi_stop
rmdir "$WORK" 2>/dev/null

LEFT=$((TOTAL - SECONDS))
step forward_compile "$LEFT" "$PY" bench/forward_gpu.py "${FORWARD_ARGS[@]}" --modes compile \
    --time-budget $((LEFT > 90 ? LEFT - 60 : 30)) --out "$OUT/forward_compile.json"

echo "== done in ${SECONDS}s; step exit codes:"
cat "$OUT/status.txt"
ls -la "$OUT"
awk '$2 != 0 { bad = 1 } END { exit bad }' "$OUT/status.txt"
