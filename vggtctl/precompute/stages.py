"""Where the encode loop's time goes: the evidence for "the GPU never waits" (or against it).

Per batch a rank waits for decoded samples, stages them into pinned memory and launches the
copy and the forward; then (on CUDA in a handoff thread, see gpu.py) it waits for the
features and hands the rows to the writer pool, which blocks when the writers are
`max_pending_bytes` behind. While it waits for the model, the model is the bottleneck, which
is the goal; time spent waiting for decode workers or writers is time the GPU may have stood
idle. On the CPU the forward runs inside the launch, so it is counted as waiting for the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The launching thread: wait_decode, stage, launch, wait_handoff (the handoff queue is full).
# The handoff (a thread of its own on CUDA): wait_model, handoff (row copies), wait_writers.
STAGES = ("wait_decode", "stage", "launch", "wait_handoff", "wait_model", "handoff", "wait_writers")
STARVED_BY = ("wait_decode", "wait_writers")


class StageClock:
    """Accumulated seconds per stage of the encode loop (one instance per rank and run)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    def report(self, writer_blocked: float) -> dict[str, float]:
        """Rounded seconds per stage; the writers' back-pressure is moved out of `handoff`."""
        seconds = dict(self.seconds)
        seconds["wait_writers"] = writer_blocked
        seconds["handoff"] = max(0.0, seconds["handoff"] - writer_blocked)
        return {name: round(value, 3) for name, value in seconds.items()}


def bottleneck(stage_seconds: dict[str, float]) -> str | None:
    """A one-line reading of the stage times: what held the run back, if anything did."""
    # wait_handoff is the launching thread waiting on the handoff, whose own stages say why
    total = sum(v for k, v in stage_seconds.items() if k != "wait_handoff")
    if total <= 0:
        return None
    share = {name: stage_seconds.get(name, 0.0) / total for name in STAGES}
    starved = max(STARVED_BY, key=share.__getitem__)
    if share["wait_model"] >= 0.5:
        return f"model-bound: the loop waited on the model {share['wait_model']:.0%} of the time"
    if share[starved] >= 0.1:
        what = "decoding (add --workers or CPUs)" if starved == "wait_decode" else "writes (storage)"
        return f"the GPU waited on {what}: {share[starved]:.0%} of the loop"
    return "host-bound: staging, launching and handing off batches took most of the loop"
