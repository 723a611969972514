"""Image loading with size limits, and the transforms LLaVA applies: RGB, pad-to-square, resize, crop, normalise.

Every transform works on PIL images or uint8/float32 numpy arrays laid out (channels, height, width),
and reproduces transformers' PIL image processors bit for bit (same PIL resampling, same rounding).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.constants import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from ..core.errors import ImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(source, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               name: str | None = None) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image, refusing files and pixel counts over the limits."""
    if isinstance(source, Image.Image):
        _check_pixels(source, max_pixels, name or "image")
        return source
    if isinstance(source, (bytes, bytearray)):
        label = name or "image"
        if len(source) > max_bytes:
            raise ImageError(f"{label}: {len(source)} bytes is over the limit of {max_bytes} bytes")
        data = bytes(source)
    else:
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise ImageError(f"{label}: no such file")
        if not path.is_file():
            raise ImageError(f"{label}: not a file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{label}: {size} bytes is over the limit of {max_bytes} bytes")
        data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image, max_pixels, label)  # before decoding: the header says the size
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own, larger, limit tripped while opening
        raise ImageError(f"{label}: its pixel count is over the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: not a readable image ({e.__class__.__name__}: {e})") from None
    return image


def _check_pixels(image: Image.Image, max_pixels: int, label: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{label}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{label}: {width}x{height} = {width * height} pixels is over the limit of "
                         f"{max_pixels} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers' convert_to_rgb does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's `pad` mode: paste the image centred on a square of the background colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), tuple(background))
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def mean_color(image_mean) -> tuple[int, int, int]:
    """The pad colour LLaVA uses: the normalisation mean in 0-255, truncated (122, 116, 104 for CLIP)."""
    return tuple(int(x * 255) for x in image_mean)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `shortest_edge` and the longer one truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(image: Image.Image, height: int, width: int, resample: int = Image.BICUBIC) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=resample)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (C, H, W) around the centre; zero-pads first where the image is smaller than the crop."""
    _, orig_h, orig_w = pixels.shape
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0 and top + height <= orig_h and left + width <= orig_w:
        return pixels[:, top:top + height, left:left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
    top_pad, left_pad = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded[:, top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def to_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> uint8 (3, H, W)."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def rescale_and_normalize(pixels: np.ndarray, rescale_factor: float | None, mean, std) -> np.ndarray:
    """uint8 (C, H, W) -> float32, scaled in float64 then normalised in float32 like transformers."""
    out = pixels
    if rescale_factor is not None:
        out = (out.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        out = out.astype(np.float32)
    if mean is not None and std is not None:
        mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        std = np.asarray(std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return out
