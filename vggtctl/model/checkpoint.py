"""Find, read and strictly load VGGT aggregator weights.

A spec is one of: `tiny-random` (seeded random tiny model, for tests and demos);
`random:<preset>` such as `random:vggt-1b` (seeded random weights of a named preset, drawn on the
target device: a full-size benchmark model without a checkpoint); a folder with
`model.safetensors` or `model.pt` (plus an optional `config.json`); a single `.safetensors` or
`.pt`/`.pth` file; or a Hub model id such as `facebook/VGGT-1B`, resolved from the local Hugging
Face cache only unless downloads are allowed. Only `aggregator.*` keys are used; head keys are
ignored. Any missing, unexpected or mis-shaped aggregator key fails the load with one
CheckpointError that names them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vggtctl.errors import CheckpointError
from vggtctl.keys import checkpoint_fingerprint
from vggtctl.model.aggregator import Aggregator
from vggtctl.model.config import (
    PRESETS,
    AggregatorConfig,
    config_from_reference_json,
    get_config,
    preset_name_of,
)
from vggtctl.model.random_init import init_random

PREFIX = "aggregator."
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 1234
TINY_RANDOM_FINGERPRINT = hashlib.sha256(
    b"vggtctl tiny-random: tiny preset, random-init recipe v1, seed 1234; features are meaningless"
).hexdigest()
RANDOM_PREFIX = "random:"
WEIGHT_FILES = ("model.safetensors", "model.pt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOWN = 5


@dataclass(frozen=True)
class LoadedModel:
    """A ready aggregator plus what identifies it in feature keys."""

    model: Aggregator
    name: str
    fingerprint: str
    preset: str  # preset name, or "custom" for a config.json that matches none
    config: AggregatorConfig
    weights_path: str | None = None  # None for tiny-random


def build_model(config: AggregatorConfig, device: str | torch.device = "cpu") -> Aggregator:
    """An aggregator with uninitialized weights; use device "meta" to build without memory."""
    with torch.device(device):
        return Aggregator(config)


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
) -> LoadedModel:
    """Resolve `spec`, load its aggregator weights strictly, and return the model in eval mode."""
    if spec == TINY_RANDOM:
        config = get_config("tiny")
        model = init_random(build_model(config, "cpu"), TINY_RANDOM_SEED)
        model = _finish(model, device, dtype)
        return LoadedModel(model, TINY_RANDOM, TINY_RANDOM_FINGERPRINT, "tiny", config)

    if spec.startswith(RANDOM_PREFIX):
        return _random_model(spec, device, dtype)

    weights, config_json, name = resolve_weights(spec, allow_download=allow_download)
    state = read_state_dict(weights)
    preset, config = choose_config(state, config_json, source=weights)
    model = build_model(config, "meta")
    load_aggregator_state(model, state, source=str(weights), preset=preset)
    model = _finish(model, device, dtype)
    fingerprint = checkpoint_fingerprint(weights)
    return LoadedModel(model, name, fingerprint, preset, config, str(weights))


def random_fingerprint(preset: str, generator_device: str) -> str:
    """Fingerprint of `random:<preset>`: says random, and differs per preset and generator device
    (a CUDA generator draws other weights than the CPU one for the same seed)."""
    text = (
        f"vggtctl random:{preset}: random-init recipe v1, seed {TINY_RANDOM_SEED}, "
        f"{generator_device} generator; features are meaningless"
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _random_model(spec: str, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """`random:<preset>`: seeded random weights drawn on `device` (seconds for 1B on a GPU)."""
    preset = spec[len(RANDOM_PREFIX) :]
    if preset not in PRESETS:
        raise CheckpointError(f"{spec}: unknown model preset {preset!r} (known: {', '.join(PRESETS)})")
    config = get_config(preset)
    target = torch.device(device)
    model = init_random(build_model(config, target), TINY_RANDOM_SEED)
    model = _finish(model, target, dtype)
    return LoadedModel(model, spec, random_fingerprint(preset, target.type), preset, config)


def _finish(model: Aggregator, device: str | torch.device, dtype: torch.dtype) -> Aggregator:
    model.reset_constants()
    model.requires_grad_(False)
    model = model.to(device=device, dtype=dtype)
    # The image normalization constants stay float32 whatever the weight dtype.
    model.image_mean = model.image_mean.float()
    model.image_std = model.image_std.float()
    return model.eval()


# --------------------------------------------------------------------------- locating


def resolve_weights(spec: str, *, allow_download: bool = False) -> tuple[Path, Path | None, str]:
    """(weights file, optional config.json, display name) for a path or Hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in WEIGHT_FILES:
            if (path / candidate).is_file():
                config = path / "config.json"
                return path / candidate, config if config.is_file() else None, path.resolve().name
        raise CheckpointError(f"{path}: folder holds neither {' nor '.join(WEIGHT_FILES)}")
    if path.is_file():
        if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise CheckpointError(f"{path}: not a .safetensors or .pt checkpoint")
        name = path.resolve().parent.name if path.stem == "model" else path.stem
        return path, None, name or path.name
    if _HUB_ID.match(spec):
        return _resolve_hub(spec, allow_download)
    raise CheckpointError(f"{spec}: no such checkpoint file or folder, and not a Hub model id")


def _resolve_hub(repo_id: str, allow_download: bool) -> tuple[Path, Path | None, str]:
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=not allow_download))
        except LocalEntryNotFoundError:
            if allow_download:  # the Hub could not be asked (no network, a proxy, a timeout)
                raise CheckpointError(
                    f"{repo_id}: cannot reach the Hugging Face Hub for {filename}, and it is not "
                    "in the local cache (check the network, or download it where there is one)"
                ) from None
            return None
        except (EntryNotFoundError, FileNotFoundError):
            return None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{repo_id}: no such model on the Hub") from None
        except OSError as exc:
            raise CheckpointError(f"{repo_id}: cannot fetch {filename} ({exc})") from None

    for filename in WEIGHT_FILES:
        weights = fetch(filename)
        if weights is not None:
            return weights, fetch("config.json"), repo_id
    if allow_download:
        raise CheckpointError(f"{repo_id}: the Hub repository holds neither {' nor '.join(WEIGHT_FILES)}")
    raise CheckpointError(
        f"{repo_id}: not in the local Hugging Face cache (download it first, or allow downloads)"
    )


# --------------------------------------------------------------------------- reading


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The aggregator tensors of a checkpoint file (head tensors are not read when avoidable)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(PREFIX)}  # noqa: SIM118
        state = _torch_load(path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    return {k: v for k, v in _unwrap(state, path).items() if k.startswith(PREFIX)}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _unwrap(state: Any, path: Path) -> Mapping[str, Any]:
    """Accept a bare state dict or one nested under "model" / "state_dict"."""
    if isinstance(state, Mapping) and not any(str(k).startswith(PREFIX) for k in state):
        for inner in ("model", "state_dict"):
            if isinstance(state.get(inner), Mapping):
                return state[inner]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


# --------------------------------------------------------------------------- config


def choose_config(
    state: Mapping[str, Tensor], config_json: Path | None, source: Path | str
) -> tuple[str, AggregatorConfig]:
    """(preset name, config) from config.json when it says enough, else from the weight shapes."""
    if config_json is not None:
        try:
            data = json.loads(Path(config_json).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_json}: unreadable config ({exc})") from None
        found = _config_from_json(data)
        if found is not None:
            return found
    return _preset_from_shapes(state, source)


def _config_from_json(data: Any) -> tuple[str, AggregatorConfig] | None:
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("aggregator"), dict):
        config = config_from_reference_json(data)
    elif isinstance(data.get("vit"), dict):
        config = AggregatorConfig.from_dict(data)
    elif isinstance(data.get("embed_dim"), int):  # the Hub config: {"img_size", "patch_size", "embed_dim"}
        matches = [n for n, c in PRESETS.items() if c.embed_dim == data["embed_dim"]]
        return (matches[0], PRESETS[matches[0]]) if matches else None
    else:
        return None
    return preset_name_of(config) or "custom", config


def _preset_from_shapes(state: Mapping[str, Tensor], source: Path | str) -> tuple[str, AggregatorConfig]:
    token = state.get(PREFIX + "camera_token")
    if token is None:
        hint = "" if state else " (no key starts with 'aggregator.')"
        raise CheckpointError(f"{source}: missing key {PREFIX}camera_token{hint}")
    dim = int(token.shape[-1])
    for name, config in PRESETS.items():
        if config.embed_dim == dim:
            return name, config
    raise CheckpointError(f"{source}: no model preset with embed dim {dim} (known: {', '.join(PRESETS)})")


# --------------------------------------------------------------------------- loading


def check_aggregator_state(
    model: Aggregator, state: Mapping[str, Any], source: str, preset: str = ""
) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped aggregator keys."""
    expected = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {list(getattr(given[k], 'shape', []))} != {list(shape)}"
        for k, shape in expected.items()
        if k in given and tuple(getattr(given[k], "shape", ())) != shape
    ]
    problems = [
        _listing("missing", missing),
        _listing("unexpected", unexpected),
        _listing("mis-shaped (checkpoint != model)", misshaped),
    ]
    problems = [p for p in problems if p]
    if problems:
        target = f"the {preset} aggregator" if preset else "the aggregator"
        hint = "" if given else " (no key starts with 'aggregator.')"
        raise CheckpointError(f"{source}: checkpoint does not fit {target}{hint}: {'; '.join(problems)}")


def _listing(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:_SHOWN])
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {what}: {shown}{more}"


def load_aggregator_state(
    model: Aggregator, state: Mapping[str, Tensor], source: str, preset: str = ""
) -> Aggregator:
    """Check, then assign the `aggregator.*` tensors of `state` into `model` (works on meta)."""
    check_aggregator_state(model, state, source, preset)
    inner = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    model.load_state_dict(inner, strict=True, assign=True)
    return model
