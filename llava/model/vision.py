"""Vision tower: any transformers vision model (CLIP, SigLIP, ...) and LLaVA's feature selection."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from ..data.image_processor import ImageProcessor
from ..data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def build_vision_tower(vision_config: PretrainedConfig) -> nn.Module:
    """The bare vision model for a vision config (CLIPVisionModel for clip_vision_model, ...)."""
    return AutoModel.from_config(vision_config)


def vision_model_class(vision_config: PretrainedConfig) -> type:
    """The transformers class a vision config builds (CLIPVisionModel ...), found without allocating weights."""
    with torch.device("meta"):
        return type(AutoModel.from_config(vision_config))


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


def image_processor_for(vision_name: str, vision_config) -> ImageProcessor:
    """The vision model's own preprocessor_config.json (CLIPImageProcessor / SiglipImageProcessor), as
    the original's vision tower uses it; without one, resize + crop to the tower's size with its mean/std.
    LLaVA's aspect mode (pad / AnyRes) is the caller's to set."""
    from transformers.utils import cached_file

    path = cached_file(vision_name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path:
        data = json.loads(Path(path).read_text())
        data.pop("image_grid_pinpoints", None)
        data["image_processor_type"] = "CLIPImageProcessor"
        data.setdefault("do_center_crop", "crop_size" in data)  # SigLIP resizes to a square, no crop
        return ImageProcessor.from_dict(data)
    side = int(vision_config.image_size)
    clip = "clip" in vision_config.model_type
    return ImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                          image_mean=OPENAI_CLIP_MEAN if clip else (0.5, 0.5, 0.5),
                          image_std=OPENAI_CLIP_STD if clip else (0.5, 0.5, 0.5))
