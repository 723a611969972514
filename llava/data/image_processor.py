"""ImageProcessor: PIL images -> pixel_values (and image_sizes for AnyRes), from preprocessor_config.json.

One class covers the three image processors LLaVA checkpoints name: CLIPImageProcessor (resize shortest
edge + centre crop), LlavaImageProcessor (the same, optionally padded to a square in the mean colour
first: LLaVA-1.5's `pad` aspect mode) and LlavaNextImageProcessor (AnyRes tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import anyres
from .images import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, expand_to_square, mean_color,
                     rescale_and_normalize, resize, shortest_edge_size, to_array, to_rgb)


@dataclass
class ImageProcessor:
    size: dict = field(default_factory=lambda: {"shortest_edge": 336})  # {"shortest_edge"} or {"height","width"}
    crop_size: dict = field(default_factory=lambda: {"height": 336, "width": 336})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    resample: int = Image.BICUBIC
    do_convert_rgb: bool = True
    pad_to_square: bool = False  # LLaVA-1.5 `pad` mode
    image_grid_pinpoints: list[list[int]] | None = None  # set: AnyRes (LLaVA-1.6)

    @property
    def is_anyres(self) -> bool:
        return bool(self.image_grid_pinpoints)

    @property
    def tile_size(self) -> int:
        """Side of one square tile fed to the vision tower."""
        if self.do_center_crop and self.crop_size:
            return int(self.crop_size["height"])
        if "height" in self.size:
            return int(self.size["height"])
        return int(self.size["shortest_edge"])

    # -- config files ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "ImageProcessor":
        kind = data.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
        size = data.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = data.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        anyres_kind = kind == "LlavaNextImageProcessor" or (kind != "LlavaImageProcessor" and "image_grid_pinpoints" in data)
        return cls(
            size=dict(size),
            crop_size=dict(crop) if crop else None,
            do_resize=data.get("do_resize", True),
            do_center_crop=data.get("do_center_crop", True),
            do_rescale=data.get("do_rescale", True),
            rescale_factor=data.get("rescale_factor", 1 / 255),
            do_normalize=data.get("do_normalize", True),
            image_mean=tuple(data.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(data.get("image_std", OPENAI_CLIP_STD)),
            resample=int(data.get("resample", Image.BICUBIC)),
            do_convert_rgb=data.get("do_convert_rgb", True),
            pad_to_square=bool(data.get("do_pad", False)) if kind == "LlavaImageProcessor" else False,
            image_grid_pinpoints=anyres.parse_grid_pinpoints(data["image_grid_pinpoints"]) if anyres_kind else None,
        )

    def to_dict(self) -> dict:
        data = {
            "image_processor_type": "LlavaNextImageProcessor" if self.is_anyres else "LlavaImageProcessor",
            "size": self.size, "crop_size": self.crop_size,
            "do_resize": self.do_resize, "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "resample": self.resample, "do_convert_rgb": self.do_convert_rgb,
        }
        if self.is_anyres:
            data.update(image_grid_pinpoints=self.image_grid_pinpoints, do_pad=True)
        else:
            data["do_pad"] = self.pad_to_square
        return data

    # -- processing -----------------------------------------------------------------------------------
    def _finish(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Resize, crop, rescale and normalise one image (or tile) into float32 (3, H, W)."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image.transpose(1, 2, 0))
        if self.do_resize:
            if "shortest_edge" in self.size:
                height, width = shortest_edge_size(image.height, image.width, int(self.size["shortest_edge"]))
            else:
                height, width = int(self.size["height"]), int(self.size["width"])
            image = resize(image, height, width, self.resample)
        pixels = to_array(image)
        if self.do_center_crop and self.crop_size:
            pixels = center_crop(pixels, int(self.crop_size["height"]), int(self.crop_size["width"]))
        return rescale_and_normalize(pixels, self.rescale_factor if self.do_rescale else None,
                                     self.image_mean if self.do_normalize else None, self.image_std)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """float32 (3, H, W) for a plain image, (tiles, 3, H, W) for AnyRes."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.is_anyres:
            if "shortest_edge" in self.size:
                base = (int(self.size["shortest_edge"]),) * 2
            else:
                base = (int(self.size["height"]), int(self.size["width"]))
            tiles = anyres.tile_image(image, self.image_grid_pinpoints, self.tile_size, base, self.resample)
            return np.stack([self._finish(tile) for tile in tiles])
        if self.pad_to_square:
            image = expand_to_square(image, mean_color(self.image_mean))
        return self._finish(image)

    def __call__(self, images: list[Image.Image]) -> dict:
        """{"pixel_values": float32 array} plus, for AnyRes, zero-padded tiles and "image_sizes" (H, W)."""
        processed = [self.preprocess_one(image) for image in images]
        if not self.is_anyres:
            return {"pixel_values": np.stack(processed)}
        most = max(p.shape[0] for p in processed)
        padded = [np.pad(p, ((0, most - p.shape[0]), (0, 0), (0, 0), (0, 0))) for p in processed]
        sizes = [[image.height, image.width] for image in images]
        return {"pixel_values": np.stack(padded), "image_sizes": np.asarray(sizes, dtype=np.int64)}
