"""Aggregator configuration and the named presets (`vggt-1b`, `tiny`) as plain data.

A preset fixes every size that decides the state-dict shapes; the checkpoint loader picks one
by name, from a `config.json`, or by matching the embed dim of the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ViTConfig:
    """The DINOv2-with-registers patch embedder (ViT-L/14 in VGGT-1B)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-6
    interpolate_antialias: bool = True

    @property
    def pos_grid(self) -> int:
        """Side of the learned position-embedding grid (37 for 518 / 14)."""
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class AggregatorConfig:
    """The alternating frame/global attention trunk on top of the patch embedder."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_size: int = 14
    img_size: int = 518
    rope_freq: float = 100.0
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    qk_norm: bool = True
    vit: ViTConfig = field(default_factory=ViTConfig)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_start_idx(self) -> int:
        """Tokens before the patches in every frame: 1 camera + the register tokens."""
        return 1 + self.num_register_tokens

    @property
    def hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AggregatorConfig:
        """Inverse of `to_dict`; unknown keys are ignored so newer files stay readable."""
        vit_fields = ViTConfig.__dataclass_fields__
        agg_fields = cls.__dataclass_fields__
        vit = ViTConfig(**{k: v for k, v in (data.get("vit") or {}).items() if k in vit_fields})
        kwargs = {k: v for k, v in data.items() if k in agg_fields and k != "vit"}
        return cls(vit=vit, **kwargs)


def _validate(config: AggregatorConfig) -> AggregatorConfig:
    if config.embed_dim % config.num_heads or config.head_dim % 4:
        raise ValueError("embed_dim / num_heads must be a multiple of 4 (2D RoPE splits the head dim)")
    if config.vit.embed_dim != config.embed_dim:
        raise ValueError("the patch embedder must produce embed_dim channels")
    return config


PRESETS: dict[str, AggregatorConfig] = {
    "vggt-1b": _validate(AggregatorConfig()),
    "tiny": _validate(
        AggregatorConfig(
            embed_dim=64,
            depth=2,
            num_heads=4,
            vit=ViTConfig(embed_dim=64, depth=2, num_heads=4),
        )
    ),
}


def get_config(name: str) -> AggregatorConfig:
    """The preset called `name`; raises KeyError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


def preset_name_of(config: AggregatorConfig) -> str | None:
    """The preset name whose config equals `config`, or None for a custom config."""
    for name, preset in PRESETS.items():
        if preset == config:
            return name
    return None


def config_from_reference_json(data: dict[str, Any]) -> AggregatorConfig:
    """A config from the reference layout (`{"aggregator": {...}, "patch_embed": {...}}`).

    This is the layout of the golden `tiny_config.json`; only the fields that decide shapes
    and arithmetic are read.
    """
    agg = data["aggregator"]
    pe = data.get("patch_embed") or {}
    vit = ViTConfig(
        img_size=pe.get("img_size", agg.get("img_size", 518)),
        patch_size=pe.get("patch_size", agg.get("patch_size", 14)),
        embed_dim=pe.get("embed_dim", agg["embed_dim"]),
        depth=pe.get("depth", 24),
        num_heads=pe.get("num_heads", 16),
        mlp_ratio=float(pe.get("mlp_ratio", 4.0)),
        num_register_tokens=pe.get("num_register_tokens", 4),
        layer_norm_eps=pe.get("layernorm_eps", 1e-6),
        interpolate_antialias=pe.get("interpolate_antialias", True),
    )
    config = AggregatorConfig(
        embed_dim=agg["embed_dim"],
        depth=agg["depth"],
        num_heads=agg["num_heads"],
        mlp_ratio=float(agg.get("mlp_ratio", 4.0)),
        num_register_tokens=agg.get("num_register_tokens", 4),
        patch_size=agg.get("patch_size", 14),
        img_size=agg.get("img_size", 518),
        rope_freq=float(agg.get("rope_freq", 100)),
        layer_norm_eps=data.get("aggregator_layernorm_eps", 1e-5),
        qkv_bias=agg.get("qkv_bias", True),
        proj_bias=agg.get("proj_bias", True),
        ffn_bias=agg.get("ffn_bias", True),
        qk_norm=agg.get("qk_norm", True),
        vit=vit,
    )
    return _validate(config)
