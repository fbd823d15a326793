#!/usr/bin/env bash
# End-to-end check of the shipped commands on a GPU machine (not a benchmark):
# precompute (plain, then a resume), verify --recompute, precompute with context and --compile,
# status --deep. Run from the repository root; MODEL=tiny-random DEVICE=cpu for a CPU dry run.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
MODEL="${MODEL:-random:vggt-1b}"
DEVICE="${DEVICE:-cuda}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rc=0
run() { echo "== $*"; "$@" || { echo "== exit $?"; rc=1; }; }

"$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
from vggtctl.demo import make_dataset, make_episode
import numpy as np
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for k in range(4):  # 64 frames without context
    make_episode(root / "plain" / f"set{k}", 16, rng, (640, 480))
make_dataset(root / "eps", episodes=2, steps=10, size=(640, 480))
PY
for f in "$WORK"/plain/set*/step_*; do mv "$f" "${f%/*}/img_${f##*/step_}"; done  # no episode names

run "$PY" -m vggtctl precompute "$WORK/plain" --vggt-model "$MODEL" --device "$DEVICE" --layout plain
run "$PY" -m vggtctl precompute "$WORK/plain" --vggt-model "$MODEL" --device "$DEVICE" --layout plain --json
run "$PY" -m vggtctl verify "$WORK/plain" --recompute 3
run "$PY" -m vggtctl precompute "$WORK/eps" --vggt-model "$MODEL" --device "$DEVICE" --max-history 8 --compile
run "$PY" -m vggtctl status "$WORK/eps" --deep
run "$PY" -m vggtctl verify "$WORK/eps" --recompute 2
exit $rc
