"""AnyRes geometry (LLaVA-1.6): pick the grid resolution, tile the image, count its image tokens.

Conventions follow transformers' LlavaNext: pinpoints and image sizes are (height, width).
"""

from __future__ import annotations

import ast
import math
import re

import numpy as np
from PIL import Image

from ..core.errors import LlavaError


def parse_grid_pinpoints(pinpoints, patch_size: int | None = None) -> list[list[int]]:
    """Accept [[h, w], ...], its string form, or the original repo's range form '(1x1),...,(3x3)'."""
    if isinstance(pinpoints, str):
        if "x" in pinpoints and patch_size:
            # "(1x1),...,(6x6)": every grid between the first and the last, each pair (width x height)
            # in tiles, as LLaVA-NeXT writes it
            grids = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", pinpoints)]
            (lo_w, lo_h), (hi_w, hi_h) = grids[0], grids[-1]
            return [[h * patch_size, w * patch_size] for w in range(lo_w, hi_w + 1) for h in range(lo_h, hi_h + 1)]
        pinpoints = ast.literal_eval(pinpoints)
    result = [[int(a), int(b)] for a, b in pinpoints]
    if not result:
        raise LlavaError("image_grid_pinpoints is empty")
    return result


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """The (height, width) that keeps the most of the image's resolution and wastes the least."""
    original_height, original_width = original_size
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def resized_within(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to fit `target` keeping its aspect ratio (rounded up)."""
    original_height, original_width = original_size
    target_height, target_width = target
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def tile_image(image: Image.Image, pinpoints, tile_size: int, base_size: tuple[int, int],
               resample: int = Image.BICUBIC) -> list[np.ndarray]:
    """[base image squashed to base_size] + the tiles of the image letterboxed into its best grid.

    Returns uint8 (3, h, w) arrays, the base first, then tiles row by row.
    """
    width, height = image.size
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    new_h, new_w = resized_within((height, width), (best_h, best_w))
    resized = np.asarray(image.resize((new_w, new_h), resample=resample) if (new_w, new_h) != image.size else image)
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)  # letterbox in black, as LLaVA-1.6 does
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    canvas = canvas.transpose(2, 0, 1)
    tiles = [canvas[:, i:i + tile_size, j:j + tile_size]
             for i in range(0, best_h, tile_size) for j in range(0, best_w, tile_size)]
    base_h, base_w = base_size
    base = image.resize((base_w, base_h), resample=resample) if image.size != (base_w, base_h) else image
    return [np.asarray(base).transpose(2, 0, 1)] + tiles


def num_tiles(image_size: tuple[int, int], pinpoints, tile_size: int) -> int:
    """Tiles for an image of (height, width), the base image included."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return math.ceil(best_h / tile_size) * math.ceil(best_w / tile_size) + 1


def grid_shape(image_size: tuple[int, int], pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tiles for an image of (height, width)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return best_h // tile_size, best_w // tile_size


def unpadded_size(original_size: tuple[int, int], current_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the feature grid once the letterbox padding is cut away."""
    original_height, original_width = original_size
    current_height, current_width = current_size
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return current_height - 2 * padding, current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return current_height, current_width - 2 * padding


def num_image_tokens(image_size: tuple[int, int], pinpoints, tile_size: int, patch_size: int,
                     base_tokens: int) -> int:
    """Image tokens for one AnyRes image: base tile + unpadded grid + one newline per grid row."""
    rows, cols = grid_shape(image_size, pinpoints, tile_size)
    side = tile_size // patch_size
    height, width = unpadded_size(image_size, (rows * side, cols * side))
    return base_tokens + height * width + height
