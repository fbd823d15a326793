"""The built-in aggregator against the golden reference outputs (tiny config, CPU, float32).

Golden data (tests/data/golden_model) was produced by the upstream VGGT aggregator and by the
JanusVLN-style causal/streaming variant; see the README there.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vggtctl.model import build_model, get_config, load_aggregator_state, patch_tokens
from vggtctl.model.config import config_from_reference_json

DATA = Path(__file__).parent / "data" / "golden_model"
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    net = build_model(get_config("tiny"), "meta")
    load_aggregator_state(net, load_file(DATA / "tiny_weights.safetensors"), source="tiny_weights")
    net.reset_constants()
    return net.eval()


@pytest.fixture(scope="module")
def inputs():
    return load_file(DATA / "inputs.safetensors")


def golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(DATA / f"{name}.safetensors")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3g}"


def stream(model, frames: torch.Tensor, layers, **evict) -> list[torch.Tensor]:
    """Stream [B, S, 3, H, W] one frame per step; outputs stacked along S per layer."""
    state = model.new_stream(**evict)
    steps = [model.stream_step(frames[:, k], state, layers=layers) for k in range(frames.shape[1])]
    return [torch.cat([step[i] for step in steps], dim=1) for i in range(len(layers))]


def test_tiny_preset_matches_golden_config():
    import json

    assert config_from_reference_json(json.loads((DATA / "tiny_config.json").read_text())) == get_config(
        "tiny"
    )


@torch.inference_mode()
def test_full_attention_s3(model, inputs):
    expected = golden("full_outputs")
    out = model(inputs["frames_s5"][:, :3], layers=[0, 1], attention="full")
    assert_close(out[0], expected["s3.layer0"])
    assert_close(out[1], expected["s3.layer1"])


@torch.inference_mode()
def test_full_attention_single_b2(model, inputs):
    expected = golden("full_outputs")
    out = model(inputs["single_b2"], layers=[0, 1])
    assert_close(out[0], expected["single.layer0"])
    assert_close(out[1], expected["single.layer1"])


@torch.inference_mode()
def test_features_layer_m2_patch_tokens(model, inputs):
    (out,) = model(inputs["single_b2"])  # default layers: [-2]
    assert_close(patch_tokens(out, model.patch_start_idx), golden("full_outputs")["features_layer_m2"])


@torch.inference_mode()
def test_causal_s3(model, inputs):
    expected = golden("causal_outputs")
    out = model(inputs["frames_s5"][:, :3], layers=[0, 1], attention="causal")
    assert_close(out[0], expected["s3.layer0"])
    assert_close(out[1], expected["s3.layer1"])


@torch.inference_mode()
def test_streaming_s3(model, inputs):
    expected = golden("stream_outputs")
    out = stream(model, inputs["frames_s5"][:, :3], [0, 1])
    assert_close(out[0], expected["s3.layer0"])
    assert_close(out[1], expected["s3.layer1"])


@torch.inference_mode()
def test_streaming_with_eviction_s5(model, inputs):
    expected = golden("stream_evict_outputs")
    frames = inputs["frames_s5"]
    state = model.new_stream(evict_start=1, evict_recent=2)
    steps, lengths = [], []
    for k in range(5):
        steps.append(model.stream_step(frames[:, k], state, layers=[0, 1]))
        lengths.append(state.cached_frames)
    assert lengths == [1, 2, 3, 3, 3]
    for i in range(2):
        assert_close(torch.cat([s[i] for s in steps], dim=1), expected[f"s5.layer{i}"])


@torch.inference_mode()
@pytest.mark.parametrize("evict", [{}, {"evict_start": 1, "evict_recent": 1}])
def test_batched_streaming_equals_per_sequence(model, inputs, evict):
    frames = inputs["frames_s5"][0]
    pair = torch.stack([frames[:4], frames.flip(0)[:4]])  # two different sequences, B=2
    batched = stream(model, pair, [0, 1], **evict)
    for b in range(2):
        alone = stream(model, pair[b : b + 1], [0, 1], **evict)
        for i in range(2):
            assert_close(batched[i][b : b + 1], alone[i])


@torch.inference_mode()
def test_batched_causal_forward_equals_batched_streaming(model, inputs):
    frames = inputs["frames_s5"][0]
    pair = torch.stack([frames[:3], frames[2:]])
    forward = model(pair, layers=[1], attention="causal")[0]
    assert_close(stream(model, pair, [1])[0], forward)


@torch.inference_mode()
def test_forward_stops_after_deepest_requested_layer(model, inputs):
    calls = []
    handles = [
        blocks[1].register_forward_hook(lambda *_: calls.append(1))
        for blocks in (model.frame_blocks, model.global_blocks)
    ]
    try:
        out = model(inputs["single_b2"], layers=[0])
    finally:
        for h in handles:
            h.remove()
    assert len(out) == 1 and calls == []


@torch.inference_mode()
def test_layers_returned_in_requested_order(model, inputs):
    a, b = model(inputs["single_b2"], layers=[1, -2])
    expected = golden("full_outputs")
    assert_close(a, expected["single.layer1"])
    assert_close(b, expected["single.layer0"])


def test_bad_requests_are_refused(model, inputs):
    with pytest.raises(ValueError, match="out of range"):
        model(inputs["single_b2"], layers=[2])
    with pytest.raises(ValueError, match="attention"):
        model(inputs["single_b2"], attention="sliding")
    with pytest.raises(ValueError, match="multiples of 14"):
        model(inputs["single_b2"][..., :83])
    state = model.new_stream()
    model.stream_step(inputs["single_b2"][:1, 0], state, layers=[0])
    with pytest.raises(ValueError, match="batch"):
        model.stream_step(inputs["single_b2"][:, 0], state, layers=[0])
    with pytest.raises(ValueError, match="deeper"):
        model.stream_step(inputs["single_b2"][:1, 0], state, layers=[1])
    with pytest.raises(ValueError, match="at least one frame"):
        model.new_stream(evict_start=0, evict_recent=0)


def _upstream_aggregator():
    """The upstream implementation at the tiny config, or skip when it is not installed."""
    try:
        import vggt  # noqa: F401
    except ImportError:
        pytest.skip("the upstream `vggt` package is not installed (optional extra)")
    from vggt.layers import MemEffAttention, NestedTensorBlock
    from vggt.layers.vision_transformer import DinoVisionTransformer
    from vggt.models.aggregator import Aggregator as UpstreamAggregator

    net = UpstreamAggregator(
        img_size=518, patch_size=14, embed_dim=64, depth=2, num_heads=4, patch_embed="conv"
    )
    net.patch_embed = DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        num_register_tokens=4,
        interpolate_antialias=True,
        interpolate_offset=0.0,
        block_chunks=0,
        init_values=1.0,
    )
    weights = load_file(DATA / "tiny_weights.safetensors")
    net.load_state_dict({k.removeprefix("aggregator."): v for k, v in weights.items()}, strict=True)
    return net.eval()


@torch.inference_mode()
@pytest.mark.parametrize("hw", [(98, 140), (518, 518), (112, 84)])
def test_upstream_vggt_parity(model, hw):
    upstream = _upstream_aggregator()
    images = torch.rand(2, 2, 3, *hw, generator=torch.Generator().manual_seed(7))
    result = upstream(images)
    expected = result[0] if isinstance(result, tuple) else result
    ours = model(images, layers=[0, 1])
    for i in range(2):
        assert_close(ours[i], expected[i])
