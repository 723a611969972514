"""LlavaConfig: the model's settings, read from and written to a llava-hf config.json.

config.json is parsed through transformers' own LlavaConfig / LlavaNextConfig so that every default
(sub-config fields left out of the file, say) is exactly what transformers would use. Our extra
fields (projector_type, conv_mode) are stored as top-level keys that transformers ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig
from transformers import PretrainedConfig

from .errors import CheckpointError
from .io import atomic_write_text

_HF_CLASSES = {"llava": HFLlavaConfig, "llava_next": HFLlavaNextConfig}
_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


@dataclass
class LlavaConfig:
    vision_config: PretrainedConfig
    text_config: PretrainedConfig
    model_type: str = "llava"  # "llava" (1.5 and earlier) or "llava_next" (1.6, AnyRes)
    image_token_index: int = 32000
    projector_type: str = "mlp2x_gelu"  # "linear", "mlp{N}x_gelu" or "identity"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
    image_grid_pinpoints: list[list[int]] | None = None  # llava_next only, each [height, width]
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    conv_mode: str | None = None  # the conversation template the model was trained with
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept on save

    def __post_init__(self):
        if self.model_type not in _HF_CLASSES:
            raise CheckpointError(f"config.json: model_type {self.model_type!r} is not 'llava' or 'llava_next'")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise CheckpointError(
                f"config.json: vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                "is not 'default' or 'full'")
        if self.model_type == "llava_next" and not self.image_grid_pinpoints:
            raise CheckpointError("config.json: llava_next needs image_grid_pinpoints")

    @property
    def is_anyres(self) -> bool:
        return self.model_type == "llava_next"

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def hidden_size(self) -> int:
        """The language model's width (what accelerate's DeepSpeed "auto" bucket sizes are made from)."""
        return self.text_config.hidden_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlavaConfig":
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in _HF_CLASSES:
            raise CheckpointError(f"config.json: model_type {model_type!r} is not 'llava' or 'llava_next'")
        hf = _HF_CLASSES[model_type].from_dict(data)
        projector_type = data.get("projector_type") or _projector_type_from_act(hf.projector_hidden_act)
        known = {f.name for f in dataclasses.fields(cls)} | set(hf.to_dict()) | {"architectures"}
        return cls(
            vision_config=hf.vision_config,
            text_config=hf.text_config,
            model_type=model_type,
            image_token_index=hf.image_token_index,
            projector_type=projector_type,
            projector_hidden_act=hf.projector_hidden_act,
            multimodal_projector_bias=hf.multimodal_projector_bias,
            vision_feature_layer=hf.vision_feature_layer,
            vision_feature_select_strategy=hf.vision_feature_select_strategy,
            image_grid_pinpoints=getattr(hf, "image_grid_pinpoints", None) if model_type == "llava_next" else None,
            image_seq_length=getattr(hf, "image_seq_length", 576),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            conv_mode=data.get("conv_mode"),
            extra={k: v for k, v in data.items() if k not in known and not k.startswith("_")},
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LlavaConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_hf(self) -> PretrainedConfig:
        """The equivalent transformers config (LlavaConfig or LlavaNextConfig)."""
        kwargs = dict(
            vision_config=self.vision_config.to_dict(),
            text_config=self.text_config.to_dict(),
            image_token_index=self.image_token_index,
            projector_hidden_act=self.projector_hidden_act,
            multimodal_projector_bias=self.multimodal_projector_bias,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            image_seq_length=self.image_seq_length,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.is_anyres:
            kwargs["image_grid_pinpoints"] = self.image_grid_pinpoints
        hf = _HF_CLASSES[self.model_type](**kwargs)
        hf.architectures = [_ARCHITECTURES[self.model_type]]
        return hf

    def to_dict(self) -> dict[str, Any]:
        data = {**self.extra, **self.to_hf().to_dict()}
        data["projector_type"] = self.projector_type
        if self.conv_mode:
            data["conv_mode"] = self.conv_mode
        return data

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _projector_type_from_act(act: str) -> str:
    return "mlp2x_gelu" if act == "gelu" else f"mlp2x_{act}"
