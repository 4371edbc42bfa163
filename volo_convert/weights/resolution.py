"""Changing a checkpoint's input resolution the way the upstream loader does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from volo_convert.architecture.variants import POS_EMBED_STRIDE
from volo_convert.options import check_image_size


def resize_pos_embed(pos_embed: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resizes a 1, h, w, C `pos_embed` to the grid of `image_size`.

    Uses torch's bicubic interpolation with align_corners=False on the 1, C, h, w grid,
    as upstream VOLO's `resize_pos_embed_4d`; TensorFlow's bicubic kernel differs.
    """
    check_image_size(image_size, ValueError)
    grid = image_size // POS_EMBED_STRIDE
    if tuple(pos_embed.shape[1:3]) == (grid, grid):
        return pos_embed
    channels_first = pos_embed.permute(0, 3, 1, 2)  # 1, C, h, w
    resized = F.interpolate(channels_first, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).contiguous()  # 1, grid, grid, C
