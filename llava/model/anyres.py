"""AnyRes feature packing (LLaVA-1.6): tile features -> one sequence per image, padding cut away,
an image_newline vector closing each row; the same arithmetic as transformers' LlavaNext."""

from __future__ import annotations

import torch

from ..data import anyres as geometry


def unpad_features(features: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) grid of a letterboxed image -> the rows/columns that cover the image itself."""
    height, width = features.shape[1:]
    new_height, new_width = geometry.unpadded_size(tuple(original_size), (height, width))
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return features[:, top:top + new_height, left:left + new_width]


def pack_image_features(features: list[torch.Tensor], image_sizes, pinpoints, tile_size: int,
                        patch_size: int, image_newline: torch.Tensor | None) -> list[torch.Tensor]:
    """Per image (tiles, positions, C) -> (tokens, C): base tile, then the unpadded grid row by row."""
    side = tile_size // patch_size
    packed = []
    for feature, size in zip(features, image_sizes):
        size = tuple(int(x) for x in size)
        if feature.shape[0] > 1:
            base, tiles = feature[0], feature[1:]
            rows, cols = geometry.grid_shape(size, pinpoints, tile_size)
            grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
            grid = grid.flatten(1, 2).flatten(2, 3)  # (C, rows*side, cols*side)
            grid = unpad_features(grid, size)
            if image_newline is not None:
                newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
                grid = torch.cat((grid, newline), dim=-1)
            feature = torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)
        else:
            feature = feature[0]
            if image_newline is not None:
                feature = torch.cat((feature, image_newline[None].to(feature)), dim=0)
        packed.append(feature)
    return packed
