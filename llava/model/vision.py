"""Vision tower: any transformers vision model (CLIP, SigLIP, ...) and LLaVA's feature selection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig


def build_vision_tower(vision_config: PretrainedConfig) -> nn.Module:
    """The bare vision model for a vision config (CLIPVisionModel for clip_vision_model, ...)."""
    return AutoModel.from_config(vision_config)


def select_features(hidden_states: tuple[torch.Tensor, ...], layer: int | list[int], strategy: str) -> torch.Tensor:
    """Pick the hidden state of `layer` (or concatenate several layers on the channel axis);
    'default' drops the first (CLS) position, 'full' keeps every position."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    features = torch.cat([hidden_states[i] for i in layers], dim=-1)
    return features[:, 1:] if strategy == "default" else features


def encode_images(vision_tower: nn.Module, pixel_values: torch.Tensor, layer, strategy: str) -> torch.Tensor:
    """(images, 3, H, W) -> selected features (images, positions, channels)."""
    outputs = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return select_features(outputs.hidden_states, layer, strategy)
