"""Built-in VGGT aggregator, checkpoint-compatible with facebook/VGGT-1B (DESIGN §4).

`load_model(spec)` returns a `LoadedModel` (aggregator + name + fingerprint + preset);
`Aggregator.forward(images, layers, attention)` returns only the requested layers;
`Aggregator.new_stream` / `stream_step` run the causal model one frame at a time.
"""

from vggtctl.model.aggregator import ATTENTION_MODES, Aggregator, patch_tokens, resolve_layer
from vggtctl.model.checkpoint import (
    TINY_RANDOM,
    TINY_RANDOM_FINGERPRINT,
    LoadedModel,
    build_model,
    check_aggregator_state,
    load_aggregator_state,
    load_model,
)
from vggtctl.model.config import PRESETS, AggregatorConfig, ViTConfig, get_config
from vggtctl.model.random_init import init_random
from vggtctl.model.streaming import StreamState

__all__ = [
    "ATTENTION_MODES",
    "PRESETS",
    "TINY_RANDOM",
    "TINY_RANDOM_FINGERPRINT",
    "Aggregator",
    "AggregatorConfig",
    "LoadedModel",
    "StreamState",
    "ViTConfig",
    "build_model",
    "check_aggregator_state",
    "get_config",
    "init_random",
    "load_aggregator_state",
    "load_model",
    "patch_tokens",
    "resolve_layer",
]
