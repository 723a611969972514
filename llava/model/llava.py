"""LlavaForCausalLM: vision tower -> projector -> image features spliced into the language model's
input embeddings at the image-token positions -> causal LM logits and loss.

Submodule names equal the llava-hf checkpoint keys (vision_tower.*, multi_modal_projector.*,
language_model.model.*, language_model.lm_head.*, image_newline), and for the same inputs the
logits equal transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import ModelOutput

from ..core.config import LlavaConfig
from ..core.constants import IGNORE_INDEX
from ..core.errors import LlavaError
from ..data import anyres as geometry
from .anyres import pack_image_features
from .projector import Projector
from .vision import build_vision_tower, encode_images


@dataclass
class LlavaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    image_hidden_states: torch.Tensor | None = None


class LlavaForCausalLM(nn.Module):
    base_model_prefix = ""  # transformers' convention; peft reads it when wrapping the model
    def __init__(self, config: LlavaConfig, vision_tower: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        """Built from config; pass pretrained `vision_tower` / `language_model` modules to use them as is."""
        super().__init__()
        self.config = config
        vision, text = config.vision_config, config.text_config
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(vision)
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.multi_modal_projector = Projector(config.projector_type, vision.hidden_size * layers, text.hidden_size,
                                               config.projector_hidden_act, config.multimodal_projector_bias)
        self.language_model = language_model if language_model is not None else AutoModelForCausalLM.from_config(text)
        if config.is_anyres:
            self.image_newline = nn.Parameter(torch.randn(text.hidden_size) / math.sqrt(text.hidden_size))
        if config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.get_input_embeddings().weight

    # -- conveniences ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    @property
    def context_length(self) -> int:
        return int(getattr(self.config.text_config, "max_position_embeddings", 2048))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    # -- images ---------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> list[torch.Tensor]:
        """One (tokens, hidden) tensor per image, in the order of the images."""
        config = self.config
        tower_dtype = next(self.vision_tower.parameters()).dtype
        if not config.is_anyres:
            if pixel_values.dim() != 4:
                raise LlavaError(f"pixel_values must be (images, 3, H, W), got shape {tuple(pixel_values.shape)}")
            features = encode_images(self.vision_tower, pixel_values.to(tower_dtype),
                                     config.vision_feature_layer, config.vision_feature_select_strategy)
            return list(self.multi_modal_projector(self._to_projector(features)))
        if image_sizes is None:
            raise LlavaError("an AnyRes (llava_next) model needs image_sizes with pixel_values")
        tile = config.vision_config.image_size
        counts = [geometry.num_tiles(tuple(int(x) for x in size), config.image_grid_pinpoints, tile)
                  for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() != 4:
            raise LlavaError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        features = encode_images(self.vision_tower, pixel_values.to(tower_dtype),
                                 config.vision_feature_layer, config.vision_feature_select_strategy)
        features = self.multi_modal_projector(self._to_projector(features))
        return pack_image_features(list(torch.split(features, counts, dim=0)), image_sizes,
                                   config.image_grid_pinpoints, tile, config.vision_config.patch_size,
                                   self.image_newline)

    def _to_projector(self, features: torch.Tensor) -> torch.Tensor:
        """Features in the projector's dtype (a script may have cast the vision tower alone, as the
        original's `vision_tower.to(dtype=torch.float16)` recipes do)."""
        weight = next(self.multi_modal_projector.parameters(), None)
        return features if weight is None else features.to(weight.dtype)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_sizes=None,
              image_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with the image features written over the image-token positions."""
        image_mask = input_ids == self.config.image_token_index
        embedding = self.get_input_embeddings()
        # an image token id past the vocabulary (never the case in llava-hf checkpoints) must not index it
        ids = input_ids.masked_fill(image_mask, 0) if self.config.image_token_index >= embedding.num_embeddings \
            else input_ids
        embeds = embedding(ids)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_sizes)
        if image_features is None:
            return embeds  # no images: an image token is an ordinary token, as in transformers
        n_tokens = int(image_mask.sum())
        features = torch.cat(list(image_features), dim=0).to(embeds.device, embeds.dtype)
        if n_tokens != features.shape[0]:
            raise LlavaError(f"the input has {n_tokens} image tokens but the images give {features.shape[0]} "
                             "features; expand each image token with the processor")
        return embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), features)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_sizes=None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, image_features: list[torch.Tensor] | None = None,
                output_hidden_states: bool = False, **kwargs) -> LlavaOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise LlavaError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_features)
        if position_ids is None and attention_mask is not None:
            # count only real tokens, so left padding does not shift positions
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 1)[:, -inputs_embeds.shape[1]:]
        outputs = self.language_model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, past_key_values=past_key_values,
                                            use_cache=use_cache, output_hidden_states=output_hidden_states,
                                            **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return LlavaOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                           hidden_states=outputs.hidden_states)

    def generate(self, *args, **kwargs):
        """Token generation; see llava.generate.generate for the arguments."""
        from ..generate.generate import generate_ids

        return generate_ids(self, *args, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX."""
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
