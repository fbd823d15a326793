"""Checkpoint resolution and strict loading (vggtctl.model.checkpoint)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggtctl.errors import CheckpointError
from vggtctl.model import (
    TINY_RANDOM_FINGERPRINT,
    build_model,
    get_config,
    init_random,
    load_aggregator_state,
    load_model,
)
from vggtctl.model.checkpoint import random_fingerprint

DATA = Path(__file__).parent / "data" / "golden_model"
WEIGHTS = DATA / "tiny_weights.safetensors"


@pytest.fixture(autouse=True)
def _private_fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VGGTCTL_CACHE_DIR", str(tmp_path / "vggtctl-cache"))


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    return load_file(WEIGHTS)


@pytest.fixture(scope="module")
def vggt1b_shapes() -> dict[str, list[int]]:
    return json.loads((DATA / "vggt1b_keys.json").read_text())["keys"]


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_weights_equal(model, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert set(ours) == {k.removeprefix("aggregator.") for k in state}
    for key, value in state.items():
        assert torch.equal(ours[key.removeprefix("aggregator.")], value), key


# --------------------------------------------------------------------------- full-size layout


def test_vggt1b_layout_loads_on_meta(vggt1b_shapes):
    info = json.loads((DATA / "vggt1b_keys.json").read_text())
    heads = [k for k in vggt1b_shapes if not k.startswith("aggregator.")]
    assert heads, "the key list includes head keys, which must be ignored"
    model = build_model(get_config("vggt-1b"), "meta")
    load_aggregator_state(model, meta_state(vggt1b_shapes), source="vggt1b", preset="vggt-1b")
    assert sum(p.numel() for p in model.parameters()) == info["aggregator_params"]
    assert len(model.state_dict()) == info["num_aggregator_keys"]


@pytest.mark.parametrize(
    ("change", "key", "word"),
    [
        ("drop", "aggregator.global_blocks.23.attn.k_norm.bias", "missing"),
        ("reshape", "aggregator.frame_blocks.5.mlp.fc1.weight", "mis-shaped"),
        ("add", "aggregator.global_blocks.24.ls1.gamma", "unexpected"),
    ],
)
def test_vggt1b_bad_key_is_named(vggt1b_shapes, change, key, word):
    state = meta_state(vggt1b_shapes)
    if change == "drop":
        del state[key]
    elif change == "reshape":
        state[key] = torch.empty(4096, 1000, device="meta")
    else:
        state[key] = torch.empty(1024, device="meta")
    model = build_model(get_config("vggt-1b"), "meta")
    with pytest.raises(CheckpointError) as err:
        load_aggregator_state(model, state, source="ckpt.safetensors")
    message = str(err.value)
    assert key in message and word in message and message.startswith("ckpt.safetensors: ")
    assert "\n" not in message


def test_many_problems_are_summarized(vggt1b_shapes):
    state = meta_state(vggt1b_shapes)
    dropped = [k for k in state if k.startswith("aggregator.global_blocks.")][:30]
    for key in dropped:
        del state[key]
    with pytest.raises(CheckpointError) as err:
        load_aggregator_state(build_model(get_config("vggt-1b"), "meta"), state, source="x")
    message = str(err.value)
    assert "30 missing" in message and "25 more" in message
    assert dropped[0] in message and dropped[-1] not in message


def test_unprefixed_state_dict_gets_a_hint(golden_state):
    bare = {k.removeprefix("aggregator."): v for k, v in golden_state.items()}
    with pytest.raises(CheckpointError, match=r"no key starts with 'aggregator\.'"):
        load_aggregator_state(build_model(get_config("tiny"), "meta"), bare, source="bare")


# --------------------------------------------------------------------------- load_model specs


def test_folder_with_safetensors_and_config(tmp_path, golden_state):
    folder = tmp_path / "tiny-ckpt"
    folder.mkdir()
    shutil.copy(WEIGHTS, folder / "model.safetensors")
    shutil.copy(DATA / "tiny_config.json", folder / "config.json")
    loaded = load_model(str(folder))
    assert loaded.preset == "tiny" and loaded.name == "tiny-ckpt"
    assert loaded.fingerprint == sha256(WEIGHTS)
    assert_weights_equal(loaded.model, golden_state)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_preset_inferred_from_shapes_and_head_keys_ignored(tmp_path, golden_state):
    state = dict(golden_state)
    state["camera_head.trunk.0.weight"] = torch.zeros(3, 3)
    state["depth_head.proj.bias"] = torch.zeros(7)
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    loaded = load_model(str(path))
    assert loaded.preset == "tiny" and loaded.name == "weights"
    assert loaded.fingerprint == sha256(path)
    assert_weights_equal(loaded.model, golden_state)


@pytest.mark.parametrize("nested", [False, True])
def test_model_pt_folder_and_file(tmp_path, golden_state, nested):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model": golden_state} if nested else golden_state, folder / "model.pt")
    for spec in (folder, folder / "model.pt"):
        loaded = load_model(str(spec), dtype=torch.bfloat16)
        assert loaded.name == "ckpt" and loaded.fingerprint == sha256(folder / "model.pt")
        assert loaded.model.camera_token.dtype == torch.bfloat16
        assert loaded.model.image_mean.dtype == torch.float32
        assert torch.equal(loaded.model.camera_token, golden_state["aggregator.camera_token"].bfloat16())


def test_hub_id_from_local_cache(tmp_path, golden_state, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-vggt"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.copy(WEIGHTS, repo / "snapshots" / revision / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_model("someorg/tiny-vggt")
    assert loaded.name == "someorg/tiny-vggt" and loaded.preset == "tiny"
    assert loaded.fingerprint == sha256(WEIGHTS)
    assert_weights_equal(loaded.model, golden_state)

    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("someorg/not-cached")


def test_hub_download_without_a_network_says_so(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, local_files_only=False, **_kwargs):  # type: ignore[no-untyped-def]
        # what the client raises when the Hub cannot be reached and the file is not cached
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match=r"cannot reach the Hugging Face Hub for model\.safetensors"):
        load_model("someorg/vggt", allow_download=True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("someorg/vggt")


def test_tiny_random_is_deterministic_and_labelled():
    first, second = load_model("tiny-random"), load_model("tiny-random")
    assert first.name == "tiny-random" and first.preset == "tiny"
    assert first.fingerprint == second.fingerprint == TINY_RANDOM_FINGERPRINT
    assert len(first.fingerprint) == 64
    for (name, a), b in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    gammas = first.model.frame_blocks[0].ls1.gamma
    assert gammas.min() >= 0.5 and gammas.max() < 1.5
    other = init_random(build_model(get_config("tiny")), seed=1)
    assert not torch.equal(other.camera_token, first.model.camera_token)
    with torch.inference_mode():
        (out,) = first.model(torch.rand(1, 2, 3, 28, 42))
    assert out.shape == (1, 2, 5 + 6, 128) and torch.isfinite(out).all()


def test_random_preset_spec_is_seeded_and_labelled():
    tiny = load_model("tiny-random")
    first, second = load_model("random:tiny"), load_model("random:tiny")
    assert first.name == "random:tiny" and first.preset == "tiny" and first.weights_path is None
    assert first.fingerprint == second.fingerprint
    # Same seed, recipe and CPU generator as tiny-random: the same weights, but its own label.
    for (name, a), b in zip(tiny.model.state_dict().items(), first.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert first.fingerprint != TINY_RANDOM_FINGERPRINT
    fingerprints = {
        random_fingerprint("tiny", "cpu"),
        random_fingerprint("tiny", "cuda"),
        random_fingerprint("vggt-1b", "cpu"),
        random_fingerprint("vggt-1b", "cuda"),
    }
    assert first.fingerprint in fingerprints and len(fingerprints) == 4
    with pytest.raises(CheckpointError, match="unknown model preset 'huge'"):
        load_model("random:huge")


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "no such checkpoint"),
        ("empty_folder", "neither model.safetensors nor model.pt"),
        ("bad_suffix", "not a .safetensors or .pt"),
        ("corrupt", "cannot read checkpoint"),
        ("unknown_dim", "no model preset with embed dim 48"),
    ],
)
def test_bad_specs_raise_checkpoint_error(tmp_path, setup, match):
    spec = tmp_path / "x"
    if setup == "empty_folder":
        spec.mkdir()
    elif setup == "bad_suffix":
        spec = tmp_path / "weights.txt"
        spec.write_text("hello")
    elif setup == "corrupt":
        spec = tmp_path / "model.safetensors"
        spec.write_bytes(b"\x00" * 64)
    elif setup == "unknown_dim":
        spec = tmp_path / "w.safetensors"
        save_file({"aggregator.camera_token": torch.zeros(1, 2, 1, 48)}, spec)
    with pytest.raises(CheckpointError, match=match):
        load_model(str(spec))
