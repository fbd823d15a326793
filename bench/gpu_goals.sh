#!/usr/bin/env bash
# The rows the model and precompute issues set goals on, in one short device session, from the
# repository root:
#
#   bash bench/gpu_goals.sh                  # results in $OUT (default ./.benchout)
#   BENCH_SMOKE=1 bash bench/gpu_goals.sh    # the same steps on the CPU with the tiny model
#
# Steps (each under its own limit, each run whatever happened to the one before):
#   env        nvidia-smi, torch/CUDA versions, CPUs, memory, disk
#   forward    forward_gpu.py under torch.compile: single frames 644x644 B=32 and 9-frame
#              streaming B=16, once in torch's attention-kernel order and once with cuDNN
#              attention first; plus each SDPA kernel alone on the model's attention shapes
#   pick       the kernel preference with the higher single-frame images/s whose parity holds
#              (cuDNN only when it is more than 1 % faster)
#   precompute precompute_gpu.py --compile --seq-eager with that preference: (a), (b) with its
#              steady state, (c), (c_legacy), (d), recompute checks; GPU utilisation sampled
#   shared     shared_frames.py on vggt-1b: sequence batches with and without shared frames
#   staging    staging.py --pin: the launching thread's stacking of decoded samples into pinned
#              memory, uint8 pixels (now) against float32 (before), with the host's workers
# Outputs in $OUT: env.txt, forward.{json,log}, sdpa_choice.txt, precompute.{json,log},
# gpu_util_precompute.csv, shared.log, staging.{json,log}, status.txt. Exits 1 when a step failed or was skipped.
# SUITE_SECONDS (default 420) caps the whole script; STEPS picks steps and their order (default
# "forward precompute shared staging"; precompute uses sdpa auto when forward has not run).

set -u -o pipefail
source "$(dirname "${BASH_SOURCE[0]}")/suite_lib.sh"
suite_setup 420

if [[ -n "${BENCH_SMOKE:-}" ]]; then
    FORWARD_ARGS=(--device cpu --preset tiny --sizes 56 --batches 2 --stream-size 56 --stream-batches 2 --modes eager --quick)
    PRECOMPUTE_ARGS=(--device cpu --model tiny --images 24 --seq-items 6 --batch-size 4 --time-budget 120)
    SHARED_ARGS=(--items 2 --size 224 --repeat 1)
    STAGING_ARGS=(--images 64 --repeat 1)
else
    FORWARD_ARGS=(--sizes 644 --batches 32 --stream-size 644 --stream-batches 16 --modes compile)
    PRECOMPUTE_ARGS=(--compile --seq-eager --images 2000 --seq-items 200 --time-budget 230)
    SHARED_ARGS=(--device cuda --model random:vggt-1b --items 16)
    STAGING_ARGS=(--images 640 --workers "$(($(nproc) - 1))" --repeat 3 --pin)
fi

echo "== env"
env_info 2>&1 | tee "$OUT/env.txt"

run_forward() {
    step forward 170 "$PY" bench/forward_gpu.py "${FORWARD_ARGS[@]}" --sdpa auto,cudnn --attn-bench \
        --time-budget 150 --out "$OUT/forward.json"
}

# the kernel preference for precompute: auto unless forward ran first and found cuDNN faster
pick_sdpa() {
    "$PY" - "$OUT/forward.json" <<'PICK' 2>>"$OUT/status.txt"
import json, sys
try:
    result = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("auto")
    raise SystemExit
sound = {p["sdpa"] for p in result["parity"] if (p.get("cosine") or 0) > 0.999}
rate = {r["sdpa"]: r["images_per_s"] or 0 for r in result["rows"] if r["kind"] == "forward"}
print("cudnn" if "cudnn" in sound and rate.get("cudnn", 0) > 1.01 * rate.get("auto", 0) else "auto")
PICK
}

run_precompute() {
    local sdpa
    sdpa=$(pick_sdpa)
    echo "== pick: sdpa $sdpa" | tee "$OUT/sdpa_choice.txt"
    smi_start "$OUT/gpu_util_precompute.csv"
    step precompute 280 "$PY" bench/precompute_gpu.py "${PRECOMPUTE_ARGS[@]}" --sdpa "$sdpa" \
        --workdir "$WORK" --out "$OUT/precompute.json"
    smi_stop
    rmdir "$WORK" 2>/dev/null
}

run_shared() {
    step shared 60 "$PY" bench/shared_frames.py "${SHARED_ARGS[@]}"
}

run_staging() {
    step staging 60 "$PY" bench/staging.py "${STAGING_ARGS[@]}" --out "$OUT/staging.json"
}

for name in ${STEPS:-forward precompute shared staging}; do
    case $name in
        forward | precompute | shared | staging) "run_$name" ;;
        *) echo "== $name: unknown step" | tee -a "$OUT/status.txt" ;;
    esac
done

echo "== done in ${SECONDS}s; step exit codes:"
cat "$OUT/status.txt"
ls -la "$OUT"
awk '$2 != 0 { bad = 1 } END { exit bad }' "$OUT/status.txt"
