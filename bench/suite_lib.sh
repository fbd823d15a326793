# Shared by the device scripts (gpu_suite.sh, gpu_goals.sh); sourced, not run.

# suite_setup DEFAULT_SECONDS: PY (from $PYTHON), OUT (results), WORK (scratch) and TOTAL
# (seconds for the whole script, from $SUITE_SECONDS); creates OUT, WORK and OUT/status.txt.
suite_setup() {
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY="${PYTHON:-python}"
    OUT="${OUT:-$PWD/.benchout}"
    WORK="${BENCH_WORKDIR:-$PWD/.benchwork}"
    TOTAL="${SUITE_SECONDS:-$1}"
    mkdir -p "$OUT" "$WORK"
    : >"$OUT/status.txt"
}

# step NAME LIMIT_SECONDS COMMAND...: run with a limit (SIGINT first, so Python cleans up),
# tee into $OUT/NAME.log, record the exit code; never stops the suite.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s left of SUITE_SECONDS=$TOTAL" | tee "$OUT/$name.log"
        echo "$name skipped 0" >>"$OUT/status.txt"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    echo "$name $rc $((SECONDS - start))" >>"$OUT/status.txt"
}

env_info() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi || echo "nvidia-smi unavailable"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
    "$PY" -m vggtctl --help >/dev/null && echo "vggtctl CLI imports"
    echo "cpus: $(nproc)"
    free -g
    df -h "$WORK" /tmp /dev/shm 2>/dev/null
}


# smi_start FILE / smi_stop: sample GPU utilisation, memory and power every 0.5 s into FILE
# (no-op without nvidia-smi or in a BENCH_SMOKE run).
SMI_PID=""
trap '[[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null' EXIT
smi_start() {
    if command -v nvidia-smi >/dev/null && [[ -z "${BENCH_SMOKE:-}" ]]; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv,noheader \
            -lms 500 >"$1" 2>/dev/null &
        SMI_PID=$!
    fi
}
smi_stop() {
    [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null
    SMI_PID=""
}
