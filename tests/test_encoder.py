"""Encoder: context-free and sequence items against the golden outputs, and its keys."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vggtctl.encoder import Encoder
from vggtctl.errors import ConfigError
from vggtctl.keys import ContextSettings, FeatureKey, ModelKey
from vggtctl.model import LoadedModel, build_model, get_config, load_aggregator_state, load_model

DATA = Path(__file__).parent / "data" / "golden_model"
PRESET = SimpleNamespace(name="test-preset", fingerprint="ab" * 32)
TOL = 1e-4


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    config = get_config("tiny")
    model = build_model(config, "meta")
    load_aggregator_state(model, load_file(DATA / "tiny_weights.safetensors"), source="tiny")
    model.reset_constants()
    model.requires_grad_(False).eval()
    return LoadedModel(model, "golden-tiny", "cd" * 32, "tiny", config)


@pytest.fixture(scope="module")
def inputs():
    return load_file(DATA / "inputs.safetensors")


def encoder(loaded, **kwargs) -> Encoder:
    kwargs.setdefault("dtype", torch.float32)
    return Encoder(loaded, PRESET, device="cpu", **kwargs)


def assert_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert (actual - expected).abs().max().item() <= TOL


def test_encode_frames_is_golden_layer_m2(loaded, inputs):
    out = encoder(loaded).encode_frames(inputs["single_b2"][:, 0])
    assert_close(out, load_file(DATA / "full_outputs.safetensors")["features_layer_m2"][:, 0])


def test_bf16_on_cpu_computes_fp32_and_casts(loaded, inputs):
    frames = inputs["single_b2"][:, 0]
    fp32 = encoder(loaded).encode_frames(frames)
    bf16 = encoder(loaded, dtype=torch.bfloat16).encode_frames(frames)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, fp32.bfloat16())


def test_sequences_causal_is_last_frame_of_causal_forward(loaded, inputs):
    frames = inputs["frames_s5"][:, :3]
    out = encoder(loaded, attention="causal").encode_sequences(frames)
    expected = load_file(DATA / "causal_outputs.safetensors")["s3.layer0"][:, -1, 5:]
    assert_close(out, expected)
    streamed = load_file(DATA / "stream_outputs.safetensors")["s3.layer0"][:, -1, 5:]
    assert_close(out, streamed)


def test_sequences_with_eviction_stream(loaded, inputs):
    enc = encoder(loaded, attention="causal", evict_start=1, evict_recent=2)
    out = enc.encode_sequences(inputs["frames_s5"])
    assert_close(out, load_file(DATA / "stream_evict_outputs.safetensors")["s5.layer0"][:, -1, 5:])


def test_sequences_full_attention_is_upstream_last_frame(loaded, inputs):
    out = encoder(loaded, attention="full", layer=1).encode_sequences(inputs["frames_s5"][:, :3])
    assert_close(out, load_file(DATA / "full_outputs.safetensors")["s3.layer1"][:, -1, 5:])


def test_batched_sequences_match_single(loaded, inputs):
    frames = inputs["frames_s5"][0]
    pair = torch.stack([frames[:4], frames[1:]])
    for kwargs in ({}, {"evict_start": 1, "evict_recent": 1}):
        enc = encoder(loaded, attention="causal", **kwargs)
        both = enc.encode_sequences(pair)
        for b in range(2):
            assert_close(both[b : b + 1], enc.encode_sequences(pair[b : b + 1]))


@pytest.mark.parametrize("batch", [1, 2])
def test_output_is_compact(loaded, inputs, batch):
    out = encoder(loaded).encode_frames(inputs["single_b2"][:batch, 0])
    assert out.is_contiguous()
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


def test_model_and_feature_keys(loaded):
    enc = encoder(loaded, attention="causal", dtype=torch.bfloat16, evict_start=1, evict_recent=2)
    key = enc.model_key()
    assert key == ModelKey(
        fingerprint="cd" * 32, name="golden-tiny", layer=0, attention="causal", dtype="bfloat16"
    )
    assert enc.embed_dim == 64
    context = ContextSettings(kind="sequence", evict_start=1, evict_recent=2)
    assert enc.context_settings("sequence") == context
    assert enc.feature_key(context) == FeatureKey(
        model=key, preprocess_fingerprint="ab" * 32, preset="test-preset", context=context
    )
    with pytest.raises(ConfigError, match="eviction"):
        enc.feature_key(ContextSettings(kind="sequence"))


def test_tiny_random_encoder_end_to_end():
    enc = Encoder(load_model("tiny-random"), PRESET, device="cpu")
    out = enc.encode_frames(torch.rand(3, 3, 28, 56))
    assert out.shape == (3, 8, 128) and out.dtype == torch.bfloat16
    assert enc.model_key().name == "tiny-random"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "sliding"}, "attention"),
        ({"layer": 5}, "out of range"),
        ({"attention": "full", "evict_start": 1, "evict_recent": 2}, "causal"),
        ({"attention": "causal", "evict_start": -1, "evict_recent": 2}, ">= 0"),
        ({"sdpa": "fa4"}, "attention kernel 'fa4'"),
    ],
)
def test_bad_settings(loaded, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        encoder(loaded, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(loaded):
    with pytest.raises(ConfigError, match="CUDA"):
        Encoder(loaded, PRESET, device="cuda")


def test_bad_shapes(loaded):
    enc = encoder(loaded)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        enc.encode_frames(torch.rand(1, 1, 3, 28, 28))
    with pytest.raises(ValueError, match="B, S, 3, H, W"):
        enc.encode_sequences(torch.rand(1, 3, 28, 28))


@pytest.mark.parametrize(
    ("attention", "evict"),
    [("causal", None), ("full", None), ("causal", (1, 2))],
    ids=["causal", "full", "evict"],
)
def test_shared_frames_equal_the_full_batch(loaded, inputs, attention, evict):
    """Sliding-window items share frames; embedding each distinct frame once changes nothing."""
    frames = inputs["frames_s5"][0]  # 5 distinct frames [5, 3, H, W]
    windows = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]])  # 4 items of 3 frames
    enc = encoder(
        loaded, attention=attention, evict_start=evict and evict[0], evict_recent=evict and evict[1]
    )
    expanded = enc.encode_sequences(frames[windows])  # [4, 3, 3, H, W]
    shared = enc.encode_sequences(frames, frame_index=windows)
    assert torch.equal(shared, expanded)


def test_distinct_frames_maps_every_item_onto_its_frames():
    from vggtctl.precompute.gpu import _distinct_frames
    from vggtctl.precompute.loading import Prepared

    pixels = {name: torch.full((3, 14, 14), float(i)) for i, name in enumerate("abcd")}

    def item(index, names):
        ids = tuple((name, 1, 1) for name in names)
        return Prepared(index, tuple(pixels[n] for n in names), {}, ids)

    batch = [item(0, "aab"), item(1, "abc"), item(2, "bcd")]
    staging, index = _distinct_frames(batch, rows=4, pin=False, multiple=8)
    assert staging.shape[0] == 8  # 4 distinct frames, rounded up to 8
    assert index.shape == (4, 3) and index[3].tolist() == [0, 0, 0]  # padding row
    for row, sample in enumerate(batch):
        assert torch.equal(staging[index[row]], sample.stacked())
    assert torch.count_nonzero(staging[4:]) == 0


@pytest.mark.parametrize("choice", ["cudnn", "flash", "efficient", "math"])
def test_every_attention_kernel_choice_gives_the_golden_features(loaded, inputs, choice):
    # On the CPU torch falls back past the CUDA-only kernels: the choice must never break a run.
    try:
        out = encoder(loaded, sdpa=choice).encode_frames(inputs["single_b2"][:, 0])
    finally:
        loaded.model.set_attention_kernel("auto")  # the fixture's model is shared
    assert_close(out, load_file(DATA / "full_outputs.safetensors")["features_layer_m2"][:, 0])


def test_encoder_sets_the_kernel_preference_on_every_attention_layer(loaded):
    from torch.nn.attention import SDPBackend

    from vggtctl.model.layers import Attention

    try:
        encoder(loaded, sdpa="cudnn")
        layers = [m for m in loaded.model.modules() if isinstance(m, Attention)]
        assert len(layers) == 2 * loaded.config.depth + loaded.config.vit.depth
        assert all(m.kernel_order[0] == SDPBackend.CUDNN_ATTENTION for m in layers)
    finally:
        loaded.model.set_attention_kernel("auto")
    assert all(m.kernel_order is None for m in layers)


def test_attend_sets_the_preference_inside_and_restores_it(monkeypatch):
    from torch.nn.attention import SDPBackend

    from vggtctl.model import sdpa

    seen = []

    def spy(q, k, v):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return q

    before = list(torch._C._get_sdp_priority_order())
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    q = torch.zeros(1, 1, 2, 4)
    sdpa.attend(q, q, q, sdpa.kernel_order("cudnn"))
    sdpa.attend(q, q, q, sdpa.kernel_order("auto"))
    assert seen == [int(SDPBackend.CUDNN_ATTENTION), before[0]]
    assert list(torch._C._get_sdp_priority_order()) == before


def test_the_kernel_preference_traces_into_a_compiled_graph(loaded, inputs):
    # The preference must live inside the traced code (a context around a compiled call is not
    # seen by graphs already traced); fullgraph=True fails on a graph break.
    import torch._dynamo

    block = build_model(get_config("tiny"), "cpu").global_blocks[0].eval()
    block.attn.set_kernel("cudnn")
    x = torch.randn(1, 6, block.norm1.normalized_shape[0])
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), block(x), atol=1e-5)
