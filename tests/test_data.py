"""FeatureStore, coverage, the reference dataset and the online fallback.

Sidecars are written here with `sidecar.write` + `build_meta` and a context signature computed
from the frames by the test itself, so the store is checked against an independent writer.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vggtctl import sidecar
from vggtctl.catalog import Item, load_catalog
from vggtctl.data import (
    MISSING,
    CachedFeaturesDataset,
    FeatureStats,
    FeatureStore,
    OnlineFeatures,
    check_items,
    collate_features,
    coverage,
    use_vggt_cache,
)
from vggtctl.errors import ConfigError
from vggtctl.keys import ContextSettings, FeatureKey, ImageKey, ModelKey, context_signature
from vggtctl.sidecar import Verdict

GRID = (2, 3)  # 6 patches
CHANNELS = 8


def make_key(
    kind: str = "sequence",
    *,
    fingerprint: str = "a" * 64,
    layer: int = 22,
    preprocess: str = "b" * 64,
    dtype: str = "float32",
) -> FeatureKey:
    model = ModelKey(fingerprint=fingerprint, name="test-model", layer=layer, attention="causal", dtype=dtype)
    return FeatureKey(model, preprocess, "test-preset", ContextSettings(kind))


def write_sidecar(
    item: Item, key: FeatureKey, features: torch.Tensor, frames: tuple[str, ...] | None = None
) -> str:
    """Write the item's sidecar the way a precompute run would, for `frames` (default: the item's)."""
    folder = os.path.dirname(item.image)
    frames = item.frames if frames is None else frames
    pairs = [(os.path.relpath(f, folder), ImageKey.of(f)) for f in frames]
    sequence = key.context.kind == "sequence"
    meta = sidecar.build_meta(
        image_name=os.path.basename(item.image),
        image_key=ImageKey.of(item.image),
        model=key.model,
        preprocess={
            "fingerprint": key.preprocess_fingerprint,
            "preset": key.preset,
            "input_hw": [GRID[0] * 14, GRID[1] * 14],
            "grid_hw": list(GRID),
        },
        context=key.context,
        frames=[n for n, _ in pairs] if sequence else [],
        signature=context_signature(pairs, key.context, key.model.attention) if sequence else None,
    )
    path = sidecar.sidecar_path(item.image)
    sidecar.write(path, features, meta)
    return path


def feats(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(GRID[0] * GRID[1], CHANNELS, generator=gen).to(dtype)


def write_png(path: Path, seed: int, size: tuple[int, int] = (70, 56)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def episode(tmp_path: Path) -> list[Item]:
    """One episode of 5 small PNG steps, max_history 2 (items of 3 frames)."""
    for i in range(5):
        write_png(tmp_path / "ep" / f"step_{i}_MOVE_FORWARD.png", seed=i)
    return load_catalog(tmp_path, max_history=2).items


# --------------------------------------------------------------------------- FeatureStore


def test_get_returns_exactly_the_written_tensor(episode: list[Item]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        key = make_key(dtype=str(dtype).removeprefix("torch."))
        written = {item.image: feats(i, dtype) for i, item in enumerate(episode)}
        for item in episode:
            write_sidecar(item, key, written[item.image])
        store = FeatureStore(key)
        for item in episode:
            got = store.get(item)
            assert got is not None and got.dtype == dtype
            assert torch.equal(got, written[item.image])
        assert store.stats.hits == len(episode) and not store.stats.misses


def test_other_history_for_the_same_image_is_refused(episode: list[Item]) -> None:
    key = make_key()
    item = episode[4]  # frames: steps 0, 2, 4
    assert [os.path.basename(f)[:6] for f in item.frames] == ["step_0", "step_2", "step_4"]
    other_history = (episode[1].image, episode[3].image, item.image)  # steps 1, 3, 4
    write_sidecar(item, key, feats(0), frames=other_history)
    store = FeatureStore(key)
    assert store.get(item) is None
    assert store.stats.misses == {"context-mismatch": 1}
    check = store.check(item)
    assert check.verdict is Verdict.CONTEXT_MISMATCH and "history" in check.reason
    # the item whose history it is gets it
    assert store.get(Item(other_history)) is not None


def test_other_model_layer_preset_or_context_kind_are_counted_misses(episode: list[Item]) -> None:
    wanted = make_key()
    writers = {
        "model fingerprint": make_key(fingerprint="c" * 64),
        "layer": make_key(layer=21),
        "preset": make_key(preprocess="d" * 64),
        "context kind": make_key("none"),
    }
    for key, item in zip(writers.values(), episode, strict=False):
        write_sidecar(item, key, feats(0))
    store = FeatureStore(wanted)
    results = [store.get(item) for item in episode[:4]]
    assert results == [None] * 4
    assert store.stats.misses == {"model-mismatch": 2, "preprocess-mismatch": 1, "context-mismatch": 1}
    assert store.stats.hits == 0


def test_legacy_refused_by_default_and_served_when_accepted(episode: list[Item]) -> None:
    item = Item((episode[0].image,))
    legacy = feats(3)
    torch.save({"features": legacy, "path": item.image}, sidecar.sidecar_path(item.image))
    strict = FeatureStore(make_key("none"))
    assert strict.get(item) is None and strict.stats.misses == {"legacy": 1}
    lenient = FeatureStore(make_key("none"), accept_legacy=True)
    got = lenient.get(item)
    assert got is not None and torch.equal(got, legacy)
    assert lenient.stats.hits == 1 and lenient.stats.legacy_hits == 1


def test_missing_stale_gone_frame_and_summary(episode: list[Item]) -> None:
    key = make_key()
    for i, item in enumerate(episode):
        write_sidecar(item, key, feats(i))
    os.unlink(sidecar.sidecar_path(episode[0].image))  # -> missing
    stale = Path(episode[1].image)
    stale.write_bytes(stale.read_bytes() + b"\0")  # -> stale (size changed)
    store = FeatureStore(key)
    assert store.check(episode[0]).verdict is MISSING
    # items 2 (steps 0,1,2) and 3 (steps 0,1,3) streamed the changed step 1: their history changed
    outcomes = [store.get(item) is not None for item in episode]
    assert outcomes == [False, False, False, False, True]
    assert store.stats.misses == {"missing": 1, "stale": 1, "context-mismatch": 2}
    # after step_3 is deleted, items that stream it cannot be valid (they cannot be computed either)
    os.unlink(episode[3].image)
    check = store.check(episode[4])  # frames steps 0, 2, 4: unaffected
    assert check.verdict is Verdict.VALID
    gone = Item((episode[3].image, episode[4].image))
    write_sidecar(episode[4], key, feats(9), frames=(episode[2].image, episode[4].image))
    check = store.check(gone)
    assert check.verdict is Verdict.CONTEXT_MISMATCH and "step_3_MOVE_FORWARD.png is gone" in check.reason
    assert store.summary() == "vggt cache: 1/5 hits (20.0%); misses: context-mismatch 2, missing 1, stale 1"


def test_stats_merge_and_summary_format() -> None:
    stats = FeatureStats()
    stats.update(["hit"] * 980 + ["context-mismatch"] * 12 + ["missing"] * 8)
    assert stats.summary() == "vggt cache: 980/1000 hits (98.0%); misses: context-mismatch 12, missing 8"
    other = FeatureStats()
    other.update(["legacy-hit", "missing"])
    stats.add(other)
    assert (stats.hits, stats.legacy_hits, stats.misses["missing"]) == (981, 1, 9)
    assert FeatureStats().summary() == "vggt cache: no lookups yet"


def test_from_env_and_pickle(episode: list[Item]) -> None:
    key = make_key()
    store = FeatureStore.from_env(key.to_env())
    assert store.key == key
    with pytest.raises(ConfigError, match="VGGTCTL_FEATURE_KEY"):
        FeatureStore.from_env({})
    with pytest.raises(ConfigError, match="VGGTCTL_FEATURE_KEY"):
        FeatureStore.from_env({"VGGTCTL_FEATURE_KEY": '{"model": {}}'})
    store.get(episode[0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone.key == key and clone.stats.lookups == 0 and store.stats.lookups == 1
    assert clone.get(episode[0]) is None and clone.stats.misses == {"missing": 1}
    assert use_vggt_cache({"USE_VGGT_CACHE": "true"}) and not use_vggt_cache({})


# --------------------------------------------------------------------------- coverage


def test_coverage_counts_by_verdict(episode: list[Item], tmp_path: Path) -> None:
    key = make_key()
    write_sidecar(episode[0], key, feats(0))
    write_sidecar(episode[1], key, feats(1))
    write_sidecar(episode[2], make_key(fingerprint="e" * 64), feats(2))
    write_sidecar(episode[3], key, feats(3), frames=(episode[3].image,) * 3)  # another history
    # episode[4]: no sidecar; plus a corrupt file for an extra item in another folder
    extra = write_png(tmp_path / "other" / "x.png", seed=9)
    Path(sidecar.sidecar_path(extra)).write_bytes(b"not a zip")
    items = [*episode, Item((str(extra),))]
    report = coverage(items, key, workers=3)
    assert report.total == 6 and report.valid == 2
    assert report.by_verdict == {
        "valid": 2,
        "model-mismatch": 1,
        "context-mismatch": 1,
        "missing": 1,
        "corrupt": 1,
    }
    assert report.fraction == pytest.approx(2 / 6)
    # the same verdicts the store gives item by item
    store = FeatureStore(key)
    assert sorted(str(store.check(i).verdict) for i in items) == sorted(
        v for v, n in report.by_verdict.items() for _ in range(n)
    )


def test_check_items_stats_each_frame_once(episode: list[Item], monkeypatch) -> None:
    """Items of one episode share frames: a per-item check would stat frame 0 once per item
    (x3 with padding); the folder listing answers every frame from one stat."""
    key = make_key()
    for i, item in enumerate(episode):
        write_sidecar(item, key, feats(i))
    counted: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    results = check_items(episode, FeatureStore(key), workers=2)
    monkeypatch.undo()
    assert [r.verdict for r in results] == [Verdict.VALID] * len(episode)
    frames = {f for item in episode for f in item.frames}
    assert not frames & set(counted), "frames must come from the folder listing, not os.stat"


# --------------------------------------------------------------------------- dataset


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_two_workers(episode: list[Item], context: str) -> None:
    key = make_key()
    written = {}
    for i, item in enumerate(episode[:3]):
        written[item.image] = feats(i)
        write_sidecar(item, key, written[item.image])
    dataset = CachedFeaturesDataset(episode, FeatureStore(key), load_images="never")
    loader = DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=collate_features, multiprocessing_context=context
    )
    seen = FeatureStats()
    got: dict[str, torch.Tensor | None] = {}
    for batch in loader:
        seen.update(batch["cache_status"])
        for paths, features in zip(batch["image_paths"], batch["vggt_features"], strict=True):
            got[paths[-1]] = features
    assert seen.hits == 3 and seen.misses == {"missing": 2}
    for item in episode:
        if item.image in written:
            assert torch.equal(got[item.image], written[item.image])
        else:
            assert got[item.image] is None


def test_dataset_loads_frames_for_misses_only(episode: list[Item]) -> None:
    from vggtctl.preprocess.presets import Preset

    preset = Preset(name="test-crop-56", mode="crop", target_size=56, exif_transpose=False)
    key = make_key(preprocess=preset.fingerprint)
    write_sidecar(episode[0], key, feats(0))
    store = FeatureStore(key)
    miss_mode = CachedFeaturesDataset(episode[:2], store, preset)
    hit, miss = miss_mode[0], miss_mode[1]
    assert hit["vggt_features"] is not None and hit["images_vggt"] is None
    assert miss["vggt_features"] is None and miss["cache_status"] == "missing"
    assert miss["cache_reason"] == "no sidecar" and hit["cache_reason"] == ""
    frames = miss["images_vggt"]
    assert frames.shape == (3, 3, 42, 56)  # 70x56 image: width -> 56, height 44.8 -> 42
    for k, path in enumerate(episode[1].frames):
        assert torch.equal(frames[k], preset.load(path).tensor)
    always = CachedFeaturesDataset(episode[:1], store, preset, load_images="always")[0]
    assert always["vggt_features"] is not None and always["images_vggt"].shape[0] == 3
    with pytest.raises(ConfigError):
        CachedFeaturesDataset(episode, store)  # loading images needs a preset
    other = Preset(name="test-crop-70", mode="crop", target_size=70, exif_transpose=False)
    with pytest.raises(ConfigError, match="not the preprocessing the cache was built with"):
        CachedFeaturesDataset(episode, store, other)  # misses would load other frames
    batch = collate_features([hit, miss])
    assert isinstance(batch["vggt_features"], list) and batch["vggt_features"][1] is None
    stacked = collate_features([hit, hit])
    assert isinstance(stacked["vggt_features"], torch.Tensor) and stacked["vggt_features"].shape == (2, 6, 8)


# --------------------------------------------------------------------------- online fallback (tiny model)


@pytest.fixture(scope="module")
def tiny():
    from vggtctl.encoder import Encoder
    from vggtctl.model import load_model
    from vggtctl.preprocess.presets import Preset

    preset = Preset(name="test-crop-56", mode="crop", target_size=56, exif_transpose=False)
    loaded = load_model("tiny-random")
    encoder = Encoder(loaded, preset, attention="causal", dtype=torch.float32, device="cpu")
    return encoder, preset


def test_online_features_equal_the_cached_ones(tiny, episode: list[Item]) -> None:
    encoder, preset = tiny
    store = FeatureStore(encoder.feature_key(ContextSettings("sequence")))
    online = OnlineFeatures.for_store(encoder, store)
    dataset = CachedFeaturesDataset(episode, store, preset, load_images="always")
    # "precompute": encode a batch of items exactly as the pipeline does, write sidecars
    frames = torch.stack([dataset[i]["images_vggt"] for i in range(len(episode))])
    batch_out = encoder.encode_sequences(frames)
    for item, out in zip(episode, batch_out, strict=True):
        meta_frames = [(os.path.relpath(f, os.path.dirname(item.image)), ImageKey.of(f)) for f in item.frames]
        meta = sidecar.build_meta(
            image_name=os.path.basename(item.image),
            image_key=ImageKey.of(item.image),
            model=store.key.model,
            preprocess={**preset.load(item.image).to_meta()},
            context=store.key.context,
            frames=[n for n, _ in meta_frames],
            signature=store.key.signature_for(meta_frames),
        )
        sidecar.write(sidecar.sidecar_path(item.image), out, meta)
    os.unlink(sidecar.sidecar_path(episode[2].image))  # one miss to fill online
    loaded = collate_features([dataset[i] for i in range(len(episode))])
    assert loaded["cache_status"] == ["hit", "hit", "missing", "hit", "hit"]
    filled = online.fill(loaded)
    for i in range(len(episode)):
        recomputed = online(dataset[i]["images_vggt"])
        assert torch.equal(filled[i], recomputed)
        assert torch.equal(filled[i], batch_out[i])  # cached == online, bit for bit


def test_online_features_context_none_uses_encode_frames(tiny, episode: list[Item]) -> None:
    encoder, preset = tiny
    store = FeatureStore(encoder.feature_key(ContextSettings("none")))
    online = OnlineFeatures.for_store(encoder, store)
    frame = preset.load(episode[0].image).tensor
    assert torch.equal(online(frame[None]), encoder.encode_frames(frame[None])[0])
    other = FeatureStore(make_key())
    with pytest.raises(ConfigError, match="does not compute"):
        OnlineFeatures.for_store(encoder, other)


def test_history_changes_the_current_frame_features(tiny, episode: list[Item], capsys) -> None:
    """Why the context must match: the same current image after two different histories.

    Prints the distance between the two feature tensors next to the cache-hit distance (0).
    """
    encoder, preset = tiny
    load = lambda path: preset.load(path).tensor  # noqa: E731
    current = episode[4].image
    history_a = [episode[0].image, episode[1].image]
    history_b = [episode[2].image, episode[3].image]
    feats_a = encoder.encode_sequences(torch.stack([load(p) for p in [*history_a, current]])[None])[0]
    feats_b = encoder.encode_sequences(torch.stack([load(p) for p in [*history_b, current]])[None])[0]
    alone = encoder.encode_sequences(load(current)[None, None])[0]
    store = FeatureStore(encoder.feature_key(ContextSettings("sequence")))
    item_a = Item((*history_a, current))
    meta_frames = [(os.path.relpath(f, os.path.dirname(current)), ImageKey.of(f)) for f in item_a.frames]
    meta = sidecar.build_meta(
        image_name=os.path.basename(current),
        image_key=ImageKey.of(current),
        model=store.key.model,
        preprocess=preset.load(current).to_meta(),
        context=store.key.context,
        frames=[n for n, _ in meta_frames],
        signature=store.key.signature_for(meta_frames),
    )
    sidecar.write(sidecar.sidecar_path(current), feats_a, meta)
    hit = store.get(item_a)
    assert hit is not None
    assert store.get(Item((*history_b, current))) is None  # refused: a different history

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()

    hit_diff = (hit - feats_a).abs().max().item()
    history_diff = (feats_a - feats_b).abs().max().item()
    alone_diff = (feats_a - alone).abs().max().item()
    scale = feats_a.abs().max().item()
    with capsys.disabled():
        print(
            f"\n[context sensitivity, tiny-random causal, {tuple(feats_a.shape)} features, |max| {scale:.3f}]"
            f"\n  cache hit vs computed:      max|diff| {hit_diff:.3g}, cosine {cosine(hit, feats_a):.6f}"
            f"\n  history A vs history B:     max|diff| {history_diff:.3g}, cosine {cosine(feats_a, feats_b):.6f}"
            f"\n  history A vs no history:    max|diff| {alone_diff:.3g}, cosine {cosine(feats_a, alone):.6f}"
        )
    assert hit_diff == 0.0
    assert history_diff > 0.0 and alone_diff > 0.0
