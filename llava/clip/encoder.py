"""A CLIPModel checkpoint (folder or hub id) with its tokenizer and image preprocessing, turned into
L2-normalised text and image embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CheckpointError
from ..data.image_processor import ImageProcessor


class ClipEncoder:
    def __init__(self, model, tokenizer, image_processor: ImageProcessor, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ClipEncoder":
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import cached_file

        try:
            config_file = cached_file(str(path), "config.json")
            model_type = json.loads(Path(config_file).read_text()).get("model_type")
            if model_type != "clip":
                raise CheckpointError(f"{path}: a {model_type!r} checkpoint, not a CLIPModel (model_type clip)")
            model = CLIPModel.from_pretrained(str(path)).to(device)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            processor_file = cached_file(str(path), "preprocessor_config.json")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot load a CLIP checkpoint ({str(e).splitlines()[0]})") from None
        data = json.loads(Path(processor_file).read_text())
        data["image_processor_type"] = "CLIPImageProcessor"
        return cls(model, tokenizer, ImageProcessor.from_dict(data), name=str(path))

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        limit = self.model.config.text_config.max_position_embeddings
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=limit,
                                    return_tensors="pt").to(self.model.device)
            features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"])
            features = getattr(features, "pooler_output", features)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(self.image_processor(images[start:start + batch_size])["pixel_values"])
            features = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype))
            features = getattr(features, "pooler_output", features)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())
