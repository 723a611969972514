"""Projector from vision features into the word-embedding space: linear, mlp{N}x_gelu, identity.

Layers are named linear_1 ... linear_N so that mlp2x_gelu has exactly the parameters of
transformers' LlavaMultiModalProjector (multi_modal_projector.linear_1 / linear_2).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..core.errors import CheckpointError


class Projector(nn.Module):
    def __init__(self, projector_type: str, in_features: int, out_features: int, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.projector_type = projector_type
        if projector_type == "identity":
            if in_features != out_features:
                raise CheckpointError(f"identity projector needs equal widths, got {in_features} -> {out_features}")
            self.depth = 0
            return
        if projector_type == "linear":
            self.depth = 1
        else:
            match = re.fullmatch(r"mlp(\d+)x_(\w+)", projector_type)
            if not match:
                raise CheckpointError(f"unknown projector_type {projector_type!r}; "
                                      "use 'linear', 'identity' or 'mlp{N}x_gelu'")
            self.depth = int(match.group(1))
            act = match.group(2)
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        if self.depth > 1:
            self.act = ACT2FN[act]
        for i in range(2, self.depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(out_features, out_features, bias=bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return features
        hidden = self.linear_1(features)
        for i in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{i}")(self.act(hidden))
        return hidden
