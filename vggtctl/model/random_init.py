"""Seeded random weights: the `tiny-random` model and the full-size benchmark model.

The recipe follows the golden reference's: LayerScale U[0.5, 1.5), camera/register/cls tokens
N(0, 0.5^2), pos_embed N(0, 0.2^2), mask_token N(0, 0.02^2), LayerNorm weights 1 + N(0, 0.1^2),
biases N(0, 0.02^2), Linear/Conv weights N(0, 1/fan_in). Parameters are drawn in state-dict
order from one generator, so a seed gives the same weights on every run and machine (CPU
generator); the features of such a model are meaningless, only its arithmetic is real.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TOKEN_STD = {
    "camera_token": 0.5,
    "register_token": 0.5,
    "cls_token": 0.5,
    "register_tokens": 0.5,
    "pos_embed": 0.2,
    "mask_token": 0.02,
}


@torch.no_grad()
def init_random(model: nn.Module, seed: int = 1234) -> nn.Module:
    """Fill every parameter of `model` in place from `seed`; returns the model.

    Draws on a generator on the parameters' device (CPU: bit-reproducible everywhere; CUDA:
    fast for the 1B benchmark model).
    """
    first = next(model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            _fill(module, name, param, gen, f"{module_name}.{name}".lstrip("."))
    return model


def _fill(module: nn.Module, name: str, param: nn.Parameter, gen: torch.Generator, full: str) -> None:
    if name == "gamma":
        param.uniform_(0.5, 1.5, generator=gen)
    elif name in TOKEN_STD:
        param.normal_(0.0, TOKEN_STD[name], generator=gen)
    elif isinstance(module, nn.LayerNorm) and name == "weight":
        param.normal_(1.0, 0.1, generator=gen)
    elif name == "bias":
        param.normal_(0.0, 0.02, generator=gen)
    elif isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight":
        fan_in = param[0].numel()
        param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    else:
        raise ValueError(f"no init rule for parameter {full}")
