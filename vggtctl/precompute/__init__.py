"""The precompute pipeline (DESIGN §2, §6, §8):

catalog -> one item per sidecar -> drop items already valid for this feature key (header
check) -> fixed chunks, sharded by rank and claimed -> DataLoader workers decode/preprocess ->
batches grouped by input shape -> encoder -> asynchronous atomic writes -> manifest entry.

The GPU never waits on decoding (workers prefetch) or on writing (a bounded writer pool); the
device->host copy of batch k overlaps the forward of batch k+1.

The stages live in submodules: options (settings, plan, outcome), planning (encoder, dedupe,
chunks, skip-valid check), loading (decode workers, claiming sampler), gpu (batch pipeline),
pipeline (`run`).
"""

from __future__ import annotations

from vggtctl.precompute.loading import ClaimingSampler, Failed, ItemDataset, Prepared
from vggtctl.precompute.options import (
    CHUNK_ITEMS,
    FEATURE_DTYPES,
    Outcome,
    Plan,
    PrecomputeInterrupted,
    PrecomputeOptions,
)
from vggtctl.precompute.pipeline import run
from vggtctl.precompute.planning import (
    build_encoder,
    chunked,
    context_settings,
    estimate_sidecar_bytes,
    find_todo,
    needs_encoding,
    plan_run,
    sample_items,
    unique_by_sidecar,
)
from vggtctl.reporter import Reporter

__all__ = [
    "CHUNK_ITEMS",
    "FEATURE_DTYPES",
    "ClaimingSampler",
    "Failed",
    "ItemDataset",
    "Outcome",
    "Plan",
    "PrecomputeInterrupted",
    "PrecomputeOptions",
    "Prepared",
    "Reporter",
    "build_encoder",
    "chunked",
    "context_settings",
    "estimate_sidecar_bytes",
    "find_todo",
    "needs_encoding",
    "plan_run",
    "run",
    "sample_items",
    "unique_by_sidecar",
]
