"""The images both models are run on: seeded and photo-like, ImageNet-normalised."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_COARSE_GRID = 6  # the image content: a smooth bicubic field of 6x6 random colours


def sample_images(batch_size: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Seeded, photo-like images (smooth colour fields plus sensor noise), normalised.

    Returns:
        B, S, S, 3 float32 array, ImageNet-normalised, channels last.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, _COARSE_GRID, _COARSE_GRID, generator=generator)
    pixels = F.interpolate(
        coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
    )  # B, 3, S, S
    pixels = pixels + 0.03 * torch.randn(pixels.shape, generator=generator)
    pixels = pixels.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()  # B, S, S, 3
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
