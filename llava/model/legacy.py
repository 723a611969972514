"""The original repository's model names as thin wrappers over LlavaForCausalLM, so scripts written
for it run unchanged: LlavaLlamaForCausalLM / LlavaMistralForCausalLM.from_pretrained (original or
llava-hf checkpoints), get_vision_tower() with is_loaded / load_model() / image_processor, and
generate(input_ids, images=..., image_sizes=...) reading the IMAGE_TOKEN_INDEX (-200) sentinel and
returning only the new tokens, as the original's does."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import BatchFeature

from ..core.constants import IMAGE_TOKEN_INDEX
from ..core.errors import LlavaError
from ..data.processor import LlavaProcessor
from .checkpoint import load_pretrained
from .llava import LlavaForCausalLM
from .vision import encode_images


class OriginalImageProcessor:
    """What `vision_tower.image_processor` is in the original: a CLIPImageProcessor. `preprocess` is
    the plain CLIP transform (resize, centre crop, normalise; no pad, no AnyRes tiles, exactly as
    the original's scripts call it); `llava_image_processor` is the checkpoint's full one, which
    mm_utils.process_images applies (pad / AnyRes)."""

    def __init__(self, processor: LlavaProcessor):
        self.llava_image_processor = processor.image_processor
        self._plain = dataclasses.replace(processor.image_processor, pad_to_square=False, image_grid_pinpoints=None)
        self.image_mean = list(self._plain.image_mean)
        self.image_std = list(self._plain.image_std)
        self.crop_size = dict(self._plain.crop_size or {})
        self.size = dict(self._plain.size)

    def preprocess(self, images, return_tensors: str | None = "pt", **_) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        return BatchFeature({"pixel_values": self._plain(list(images))["pixel_values"]}, tensor_type=return_tensors)

    __call__ = preprocess


class OriginalVisionTower:
    """The original's CLIPVisionTower interface over our vision tower (already loaded)."""

    def __init__(self, model: LlavaForCausalLM, processor: LlavaProcessor):
        self._model = model
        self.image_processor = OriginalImageProcessor(processor)
        self.is_loaded = True
        self.select_layer = model.config.vision_feature_layer
        self.select_feature = "patch" if model.config.vision_feature_select_strategy == "default" else "cls_patch"

    def load_model(self, device_map=None) -> None:
        """Already loaded with the checkpoint (kept for scripts that call it)."""

    @property
    def vision_tower(self):
        return self._model.vision_tower

    @property
    def config(self):
        return self._model.config.vision_config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side ** 2

    @property
    def device(self) -> torch.device:
        return next(self._model.vision_tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.vision_tower.parameters()).dtype

    def to(self, *args, **kwargs) -> "OriginalVisionTower":
        self._model.vision_tower.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Selected vision features (before the projector), as the original tower's forward returns them."""
        config = self._model.config
        return encode_images(self._model.vision_tower, images.to(self.device, self.dtype), config.vision_feature_layer,
                             config.vision_feature_select_strategy)


class LlavaLlamaForCausalLM(LlavaForCausalLM):
    """The original's class: `from_pretrained` opens any LLaVA checkpoint (original layout or llava-hf)."""

    processor: LlavaProcessor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *_, config=None, torch_dtype=None, dtype=None,
                        device_map=None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                        quantization_config=None, model_base=None, low_cpu_mem_usage=None, **__):
        if quantization_config is not None:
            load_in_8bit = load_in_8bit or bool(getattr(quantization_config, "load_in_8bit", False))
            load_in_4bit = load_in_4bit or bool(getattr(quantization_config, "load_in_4bit", False))
        device = device_map if isinstance(device_map, str) and device_map != "auto" else "auto"
        if isinstance(device_map, dict):
            device = next(iter(device_map.values()), "auto")
            device = f"cuda:{device}" if isinstance(device, int) else device
        model, processor = load_pretrained(pretrained_model_name_or_path, device=device,
                                           dtype=dtype or torch_dtype or "auto", model_base=model_base,
                                           load_8bit=load_in_8bit, load_4bit=load_in_4bit)
        return adopt(model, processor, cls)

    def get_model(self) -> "LlavaLlamaForCausalLM":
        return self

    def get_vision_tower(self) -> OriginalVisionTower:
        return self._original_tower

    @property
    def mm_projector(self):
        return self.multi_modal_projector

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs) -> torch.Tensor:
        """Only the new tokens of each row (the original generates from embeddings, so the prompt is not
        echoed). `inputs` holds IMAGE_TOKEN_INDEX where each image goes; `images` is what
        process_images (or image_processor.preprocess) made; `image_sizes` are PIL (width, height)."""
        from ..generate.generate import _params_from, generate_ids
        from ..mm_utils import KeywordsStoppingCriteria

        input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        streamer = kwargs.pop("streamer", None)
        stop = [k for c in kwargs.pop("stopping_criteria", None) or [] if isinstance(c, KeywordsStoppingCriteria)
                for k in c.keywords]
        for key in ("pad_token_id", "eos_token_id", "output_attentions", "output_hidden_states"):
            kwargs.pop(key, None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if stop:
            kwargs["stop_strings"] = stop
        params = _params_from(None, kwargs)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = input_ids.tolist()
        if attention_mask is not None:  # a padded batch: keep each row's real tokens only
            prompts = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(prompts, attention_mask.tolist())]
        features = self._image_features(images, image_sizes) if images is not None else []
        tokenizer = self.processor.tokenizer
        rows, used = [], 0
        for row in prompts:
            expanded = []
            for token in row:
                if token == IMAGE_TOKEN_INDEX:
                    if used >= len(features):
                        raise LlavaError(f"the input has more {IMAGE_TOKEN_INDEX} image positions than images")
                    expanded.extend([self.config.image_token_index] * features[used].shape[0])
                    used += 1
                else:
                    expanded.append(token)
            rows.append(expanded)
        if used != len(features):
            raise LlavaError(f"{len(features)} images were given for {used} image positions ({IMAGE_TOKEN_INDEX})")
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        on_text = None
        if streamer is not None:
            def on_text(_row, delta):
                streamer.on_finalized_text(delta)
        out = generate_ids(self, ids, mask, image_features=features or None, params=params, tokenizer=tokenizer,
                           on_text=on_text)
        if streamer is not None:
            streamer.on_finalized_text("", stream_end=True)
        return out[:, width:]

    def _image_features(self, images, image_sizes) -> list[torch.Tensor]:
        if isinstance(images, (list, tuple)):
            images = [torch.as_tensor(np.asarray(im)) if not torch.is_tensor(im) else im for im in images]
            images = torch.cat([im if im.dim() == 4 else im[None] for im in images]) if self.config.is_anyres \
                else torch.stack([im if im.dim() == 3 else im[0] for im in images])
        sizes = None
        if self.config.is_anyres:
            if image_sizes is None:
                raise LlavaError("an AnyRes model needs image_sizes=[image.size, ...] with the images")
            sizes = [(int(h), int(w)) for w, h in image_sizes]  # PIL's (width, height) -> (height, width)
        return self.get_image_features(images.to(self.device), sizes)


class LlavaMistralForCausalLM(LlavaLlamaForCausalLM):
    """The original's Mistral-based class (LLaVA-1.6 Mistral); the same wrapper."""


class LlavaQwenForCausalLM(LlavaLlamaForCausalLM):
    """LLaVA-NeXT's Qwen-based class; the same wrapper."""


_CLASSES = {"mistral": LlavaMistralForCausalLM, "qwen2": LlavaQwenForCausalLM}


def adopt(model: LlavaForCausalLM, processor: LlavaProcessor, cls: type | None = None) -> LlavaLlamaForCausalLM:
    """Give a loaded model the original's interface (in place; the weights are shared, not copied)."""
    cls = cls or _CLASSES.get(model.config.text_config.model_type, LlavaLlamaForCausalLM)
    model.__class__ = cls
    model.processor = processor
    model._original_tower = OriginalVisionTower(model, processor)
    return model
