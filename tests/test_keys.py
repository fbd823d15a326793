"""Fingerprints: image change rules, memoized checkpoint hashes, context signatures, feature keys."""

from __future__ import annotations

import hashlib
import os
import time

from vggtctl import keys
from vggtctl.keys import ContextSettings, FeatureKey, ImageKey, ModelKey


def _model(**changes):
    base = dict(fingerprint="f" * 64, name="vggt", layer=22, attention="causal", dtype="bfloat16")
    base.update(changes)
    return ModelKey(**base)


def test_image_change_by_size_and_mtime(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"12345")
    recorded = ImageKey.of(image).to_meta("a.jpg")
    assert keys.image_change(recorded, os.stat(image)) is None
    os.utime(image, ns=(1, 1))
    assert "mtime" in keys.image_change(recorded, os.stat(image))
    image.write_bytes(b"123456")
    assert "size" in keys.image_change(recorded, os.stat(image))


def test_recorded_hash_forgives_a_touch_but_not_an_edit(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"abcde")
    recorded = ImageKey.of(image, with_hash=True).to_meta("a.jpg")
    assert recorded["hash"] == "sha256:" + hashlib.sha256(b"abcde").hexdigest()
    os.utime(image, ns=(5, 5))
    assert keys.image_change(recorded, os.stat(image), str(image)) is None
    image.write_bytes(b"abcdX")  # same size, new content
    assert keys.image_change(recorded, os.stat(image), str(image)) == "image content changed (hash differs)"


def test_checkpoint_fingerprint_is_memoized_until_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-v1")
    calls = []
    real = keys.file_sha256
    monkeypatch.setattr(keys, "file_sha256", lambda p: calls.append(p) or real(p))
    first = keys.checkpoint_fingerprint(weights)
    assert first == hashlib.sha256(b"weights-v1").hexdigest()
    assert keys.checkpoint_fingerprint(weights) == first
    assert len(calls) == 1  # second call answered from the memo in the user cache dir
    weights.write_bytes(b"weights-v2!")
    assert keys.checkpoint_fingerprint(weights) == hashlib.sha256(b"weights-v2!").hexdigest()
    assert len(calls) == 2


def test_new_weights_with_the_old_size_and_mtime_get_a_new_fingerprint(tmp_path):
    """`rsync -a`, `cp -p` and reproducible builds carry the old mtime over, and checkpoints of
    one architecture have one size: the memo must not hand the old weights' hash to new ones."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-A1")
    first = keys.checkpoint_fingerprint(weights)
    old = os.stat(weights)

    staged = tmp_path / ".model.safetensors.partial"  # rsync: a new file renamed over the old
    staged.write_bytes(b"weights-B2")
    os.utime(staged, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(staged, weights)
    assert (os.stat(weights).st_size, os.stat(weights).st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert keys.checkpoint_fingerprint(weights) == hashlib.sha256(b"weights-B2").hexdigest() != first

    before = os.stat(weights)
    time.sleep(0.05)  # past the file system's coarse timestamp tick, so the rewrite's ctime differs
    with open(weights, "r+b") as fh:  # cp -p: rewritten in place, same inode, mtime put back
        fh.write(b"weights-C3")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_ino == before.st_ino
    assert keys.checkpoint_fingerprint(weights) == hashlib.sha256(b"weights-C3").hexdigest()


def test_context_signature_depends_on_order_frames_and_settings():
    a, b = ImageKey(10, 1), ImageKey(20, 2)
    seq = ContextSettings("sequence")
    base = keys.context_signature([("0.jpg", a), ("1.jpg", b)], seq, "causal")
    assert base == keys.context_signature([("0.jpg", a), ("1.jpg", b)], seq, "causal")
    assert base != keys.context_signature([("1.jpg", b), ("0.jpg", a)], seq, "causal")
    assert base != keys.context_signature([("0.jpg", ImageKey(10, 3)), ("1.jpg", b)], seq, "causal")
    assert base != keys.context_signature(
        [("0.jpg", a), ("1.jpg", b)], ContextSettings("sequence", 1, 2), "causal"
    )
    assert base != keys.context_signature([("0.jpg", a), ("1.jpg", b)], seq, "full")
    assert keys.context_signature([("0.jpg", a)], ContextSettings("none"), "full") is None


def test_model_mismatch_names_the_field():
    wanted = _model()
    assert wanted.mismatch(wanted.to_meta()) is None
    assert "layer" in wanted.mismatch(_model(layer=21).to_meta())
    assert "dtype" in wanted.mismatch(_model(dtype="float32").to_meta())
    assert "fingerprint" in wanted.mismatch(_model(fingerprint="e" * 64).to_meta())


def test_feature_key_round_trips_through_meta_and_env():
    key = FeatureKey(_model(), "p" * 64, "janusvln", ContextSettings("sequence", 1, 2))
    assert FeatureKey.from_meta(key.to_meta()) == key
    assert FeatureKey.from_env(key.to_env()) == key
    assert FeatureKey.from_env({}) is None


def test_random_models_are_labelled():
    assert _model(name="tiny-random").label.endswith("(random weights: features are meaningless)")
    assert _model(name="random:vggt-1b").is_random
    assert _model(name="facebook/VGGT-1B").label == "facebook/VGGT-1B"
