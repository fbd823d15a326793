"""Build data roots with known ground truth: real images (Pillow), sidecars written through the
codec, and every kind of damage made by hand (touch, delete, truncate, legacy torch.save).

Reusable by any test: `make_tree(root, {"ep1/a.jpg": "valid", "ep1/b.jpg": "stale", ...})`
returns a `Tree` whose `expected` maps each sidecar/temp path to the verdict it must get when
checked against `expectation()` (the current model = `CURRENT_MODEL`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vggtctl import sidecar
from vggtctl.keys import ContextSettings, FeatureKey, ImageKey, ModelKey, context_signature
from vggtctl.sidecar import Expectation, Verdict

# A stand-in checkpoint: its fingerprint is the sha256 of these bytes, computed here
# independently of the code under test.
CHECKPOINT_BYTES = b"vggtctl test checkpoint: not real weights\n"
CURRENT_FINGERPRINT = hashlib.sha256(CHECKPOINT_BYTES).hexdigest()
OTHER_FINGERPRINT = hashlib.sha256(b"some other checkpoint").hexdigest()

CURRENT_MODEL = ModelKey(CURRENT_FINGERPRINT, "test-model", -2, "full", "bfloat16")
OTHER_MODEL = ModelKey(OTHER_FINGERPRINT, "old-model", -2, "full", "bfloat16")
PREPROCESS = {"fingerprint": "1" * 64, "preset": "test-preset", "input_hw": [28, 28], "grid_hw": [2, 2]}
OTHER_PREPROCESS = {**PREPROCESS, "fingerprint": "2" * 64, "preset": "other-preset"}
FEATURE_KEY = FeatureKey(CURRENT_MODEL, PREPROCESS["fingerprint"], PREPROCESS["preset"])

# Kinds make_tree understands, and the verdict each must get (None: no sidecar at all).
KINDS: dict[str, Verdict | None] = {
    "valid": Verdict.VALID,
    "stale": Verdict.STALE,
    "orphan": Verdict.ORPHAN,
    "model-mismatch": Verdict.MODEL_MISMATCH,
    "preprocess-mismatch": Verdict.PREPROCESS_MISMATCH,
    "context-mismatch": Verdict.CONTEXT_MISMATCH,
    "legacy": Verdict.LEGACY,
    "corrupt": Verdict.CORRUPT,
    "temp": Verdict.TEMP,
    "none": None,
}
OLD = 3600.0  # seconds: temp files are made this old so prune's grace period does not keep them


def checkpoint_dir(base: Path) -> Path:
    """A folder holding model.safetensors with CHECKPOINT_BYTES (what --vggt-model points at)."""
    folder = base / "ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(CHECKPOINT_BYTES)
    return folder


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def features(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=gen).to(dtype)


def write_sidecar(
    image: Path,
    *,
    model: ModelKey = CURRENT_MODEL,
    preprocess: Mapping[str, object] = PREPROCESS,
    context: ContextSettings | None = None,
    frames: list[str] | None = None,
    feats: torch.Tensor | None = None,
) -> Path:
    """A v1 sidecar for `image` through the codec. With `frames` (names relative to the image's
    folder, current image last) the context is `sequence` and the signature is computed here."""
    context = context or ContextSettings("sequence" if frames else "none")
    signature = None
    if frames:
        keys = [(rel, ImageKey.of(image.parent / rel)) for rel in frames]
        signature = context_signature(keys, context, model.attention)
    meta = sidecar.build_meta(
        image_name=image.name,
        image_key=ImageKey.of(image),
        model=model,
        preprocess=dict(preprocess),
        context=context,
        frames=frames or [],
        signature=signature,
    )
    feats = features() if feats is None else feats
    meta["model"]["dtype"] = str(feats.dtype).removeprefix("torch.")
    path = Path(sidecar.sidecar_path(image))
    sidecar.write(path, feats, meta)
    return path


def touch_later(path: Path, seconds: float = 5.0) -> None:
    st = os.stat(path)
    ns = st.st_mtime_ns + int(seconds * 1e9)
    os.utime(path, ns=(ns, ns))


def age(path: Path, seconds: float) -> None:
    """Move mtime `seconds` into the past (without following a symlink)."""
    ns = os.lstat(path).st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def write_legacy(image: Path, seed: int = 0) -> Path:
    """The earlier script's format: torch.save({"features": t, "path": str})."""
    path = Path(sidecar.sidecar_path(image))
    torch.save({"features": features(seed, torch.float32), "path": str(image)}, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def temp_name(image: Path, pid: int = 4242, token: str = "beef0123") -> Path:
    return Path(f"{sidecar.sidecar_path(image)}.tmp-{pid}-{token}")


@dataclass
class Tree:
    root: Path
    expected: dict[str, Verdict] = field(default_factory=dict)  # sidecar/temp path -> verdict
    images: list[Path] = field(default_factory=list)

    def paths(self, *verdicts: Verdict) -> set[str]:
        return {p for p, v in self.expected.items() if v in verdicts}

    def counts(self) -> Counter[Verdict]:
        return Counter(self.expected.values())

    def sizes(self, *verdicts: Verdict) -> int:
        return sum(os.path.getsize(p) for p in self.paths(*verdicts))

    def problems(self) -> dict[str, Verdict]:
        return {p: v for p, v in self.expected.items() if v is not Verdict.VALID}

    def expected_for(self, check: str) -> dict[str, Verdict]:
        """Verdicts under a weaker check: "key" = model + preprocess (the manifest's key),
        "model" = model fingerprint only (--vggt-model), "none" = no model known."""
        blind = {
            "key": set(),
            "model": {Verdict.PREPROCESS_MISMATCH},
            "none": {Verdict.PREPROCESS_MISMATCH, Verdict.MODEL_MISMATCH},
        }[check]
        return {p: Verdict.VALID if v in blind else v for p, v in self.expected.items()}


def add(tree: Tree, rel: str, kind: str, seed: int = 0) -> None:
    """Add one image (named `rel` under the root) in state `kind` to `tree`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    image = write_image(tree.root / rel, seed)
    target: Path | None = None
    if kind in ("valid", "stale", "orphan", "corrupt"):
        target = write_sidecar(image, feats=features(seed))
    elif kind == "model-mismatch":
        target = write_sidecar(image, model=OTHER_MODEL)
    elif kind == "preprocess-mismatch":
        target = write_sidecar(image, preprocess=OTHER_PREPROCESS)
    elif kind == "context-mismatch":
        # The history frame (an image without a sidecar of its own) changes after caching.
        history = write_image(image.with_name(f"history_of_{image.stem}.png"), seed + 1)
        target = write_sidecar(image, frames=[history.name, image.name])
        touch_later(history)
    elif kind == "legacy":
        target = write_legacy(image, seed)
    elif kind == "temp":
        target = temp_name(image)
        target.write_bytes(b"half-written")
        age(target, OLD)
    if kind == "stale":
        touch_later(image)
    elif kind == "orphan":
        image.unlink()
    elif kind == "corrupt":
        assert target is not None
        truncate(target)
    if kind != "orphan":
        tree.images.append(image)
    if target is not None:
        tree.expected[str(target)] = KINDS[kind]  # type: ignore[assignment]


def make_tree(root: Path, spec: Mapping[str, str]) -> Tree:
    """`spec`: image path relative to root -> kind (see KINDS)."""
    root.mkdir(parents=True, exist_ok=True)
    tree = Tree(root)
    for seed, (rel, kind) in enumerate(spec.items()):
        add(tree, rel, kind, seed)
    return tree


def expectation() -> Expectation:
    """What the current feature key demands (model, preprocess, context kind)."""
    return Expectation(
        model=CURRENT_MODEL, preprocess_fingerprint=PREPROCESS["fingerprint"], context_kind=None
    )


# A tree with one of every kind, in two episode folders.
EVERY_KIND = {
    "ep1/step_0_MOVE_FORWARD.jpg": "valid",
    "ep1/step_1_MOVE_FORWARD.jpg": "valid",
    "ep1/step_2_TURN_LEFT.jpg": "stale",
    "ep1/step_3_STOP.jpg": "orphan",
    "ep1/step_4_STOP.png": "model-mismatch",
    "ep2/step_0_MOVE_FORWARD.jpg": "preprocess-mismatch",
    "ep2/step_1_MOVE_FORWARD.jpg": "context-mismatch",
    "ep2/step_2_TURN_RIGHT.jpg": "legacy",
    "ep2/step_3_STOP.jpg": "corrupt",
    "ep2/step_4_STOP.jpg": "temp",
    "ep2/step_5_STOP.jpg": "none",
    "top.jpg": "valid",
}
