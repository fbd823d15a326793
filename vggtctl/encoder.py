"""Preprocessed frames -> cached features, with the settings that make up the model key.

Two entry points: `encode_frames` for items without context (each image alone, S = 1) and
`encode_sequences` for items with context (history frames then the current frame, run through
the causal aggregator; the current frame's features are returned). Results are patch tokens of
one layer, [B, P, 2C], in the requested dtype, left on the encoder's device (no host sync).

Precision: on CUDA, bfloat16/float16 run under autocast (weights stay as loaded; load them in
bfloat16 for speed). On CPU everything runs in float32 and only the output is cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from vggtctl.errors import ConfigError
from vggtctl.keys import ContextSettings, FeatureKey, ModelKey
from vggtctl.model import ATTENTION_MODES, LoadedModel, patch_tokens, resolve_layer
from vggtctl.model.sdpa import check_sdpa
from vggtctl.model.streaming import check_eviction


class PresetLike(Protocol):
    """What the encoder needs of a preprocessing preset (see vggtctl.preprocess)."""

    name: str
    fingerprint: str


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the form stored in sidecars."""
    return str(dtype).removeprefix("torch.")


class Encoder:
    """Runs the aggregator for one fixed set of model settings (layer, attention, dtype, eviction).

    `layer` may be negative; the model key records it resolved to a non-negative index
    (-2 of a 24-layer model is 22), so "-2" and "22" name the same features.
    """

    def __init__(
        self,
        loaded_model: LoadedModel,
        preset: PresetLike,
        layer: int = -2,
        attention: str = "full",
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cuda",
        evict_start: int | None = None,
        evict_recent: int | None = None,
        sdpa: str = "auto",
    ) -> None:
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"attention {attention!r}: use one of {', '.join(ATTENTION_MODES)}")
        try:
            window = check_eviction(evict_start, evict_recent)
            self.sdpa = check_sdpa(sdpa)
            self.layer = resolve_layer(int(layer), loaded_model.config.depth)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if window is not None and attention != "causal":
            raise ConfigError("KV-cache eviction needs causal attention")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but CUDA is not available")
        self.loaded = loaded_model
        self.preset = preset
        self.attention = attention
        self.dtype = dtype
        self.evict_start = evict_start
        self.evict_recent = evict_recent
        self._evicting = window is not None
        self.model = loaded_model.model.to(self.device).eval()
        self.model.set_attention_kernel(self.sdpa)

    @property
    def embed_dim(self) -> int:
        """C of the model; features have 2C channels."""
        return self.loaded.config.embed_dim

    def _running(self) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        weights = self.model.patch_embed.patch_embed.proj.weight.dtype
        if (
            self.device.type == "cuda"
            and self.dtype in (torch.bfloat16, torch.float16)
            and weights != self.dtype
        ):
            # float32 weights: autocast. Weights already in the feature dtype run natively, as a
            # bf16 trainer runs its frozen VGGT (autocast would push norms back to float32).
            stack.enter_context(torch.autocast("cuda", dtype=self.dtype))
        return stack

    def _finish(self, layer_out: Tensor) -> Tensor:
        """[B, S, P, 2C] -> the last frame's patch tokens [B, P', 2C] in the requested dtype."""
        out = patch_tokens(layer_out[:, -1], self.model.patch_start_idx).to(self.dtype)
        if not out.is_contiguous() or out.untyped_storage().nbytes() != out.numel() * out.element_size():
            out = out.clone(memory_format=torch.contiguous_format)  # never a view into the batch output
        return out

    def encode_frames(self, batch: Tensor) -> Tensor:
        """Context-free items: [B, 3, H, W] in [0, 1] -> [B, P, 2C], each image alone."""
        if batch.dim() != 4:
            raise ValueError(f"encode_frames expects [B, 3, H, W], got {tuple(batch.shape)}")
        with self._running():
            images = batch.to(self.device, torch.float32, non_blocking=True).unsqueeze(1)
            (out,) = self.model(images, layers=[self.layer], attention=self.attention)
            return self._finish(out)

    def encode_sequences(self, frames: Tensor, frame_index: Tensor | None = None) -> Tensor:
        """Items with context: [B, S, 3, H, W] (history then current) -> [B, P, 2C] of frame S-1.

        Causal attention without eviction runs one causal forward (equal to streaming the
        frames); with eviction the frames are streamed with the K/V cache window; full
        attention runs the upstream model over all S frames. With `frame_index` [B, S],
        `frames` holds the distinct frames [U, 3, H, W] of the batch (see Aggregator.forward).
        """
        if frame_index is None and frames.dim() != 5:
            raise ValueError(f"encode_sequences expects [B, S, 3, H, W], got {tuple(frames.shape)}")
        with self._running():
            frames = frames.to(self.device, torch.float32, non_blocking=True)
            if not self._evicting:
                (out,) = self.model(
                    frames, layers=[self.layer], attention=self.attention, frame_index=frame_index
                )
                return self._finish(out)
            if frame_index is not None:
                frames = frames[frame_index.to(frames.device)]  # [B, S, 3, H, W]; streams embed per step
            state = self.model.new_stream(self.evict_start, self.evict_recent)
            for step in _steps(frames):
                (out,) = self.model.stream_step(step, state, layers=[self.layer])
            return self._finish(out)

    def model_key(self) -> ModelKey:
        return ModelKey(
            fingerprint=self.loaded.fingerprint,
            name=self.loaded.name,
            layer=self.layer,
            attention=self.attention,
            dtype=dtype_name(self.dtype),
        )

    def context_settings(self, kind: str) -> ContextSettings:
        """The context settings this encoder produces for `kind` ("none" or "sequence")."""
        if kind == "none":
            return ContextSettings()
        return ContextSettings(kind=kind, evict_start=self.evict_start, evict_recent=self.evict_recent)

    def feature_key(self, context: ContextSettings) -> FeatureKey:
        """The feature key of everything this encoder writes for items of `context`."""
        if context.kind == "sequence" and (context.evict_start, context.evict_recent) != (
            self.evict_start,
            self.evict_recent,
        ):
            raise ConfigError(
                f"context eviction ({context.evict_start}, {context.evict_recent}) differs from the "
                f"encoder's ({self.evict_start}, {self.evict_recent})"
            )
        return FeatureKey(
            model=self.model_key(),
            preprocess_fingerprint=self.preset.fingerprint,
            preset=self.preset.name,
            context=context,
        )


def _steps(frames: Tensor) -> Iterator[Tensor]:
    for i in range(frames.shape[1]):
        yield frames[:, i]
