"""The images both models are run on: seeded and photo-like, as 8-bit pixels and normalised.

torch is imported only to draw the seeded images, so `normalize` stays torch-free for
`predict`.
"""

from __future__ import annotations

import numpy as np

from volo_convert.architecture import variants
from volo_convert.architecture.variants import PIXEL_MAX

IMAGENET_MEAN = np.array(variants.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(variants.IMAGENET_STD, dtype=np.float32)
_COARSE_GRID = 6  # the image content: a smooth bicubic field of 6x6 random colours


def synthetic_names(count: int) -> tuple[str, ...]:
    """How reports name the seeded images: by their index in the set, `synthetic[0]`, ..."""
    return tuple(f"synthetic[{index}]" for index in range(count))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """B, S, S, 3 RGB pixels in 0..255 -> ImageNet-normalised float32, as timm's eval does."""
    scaled = pixels.astype(np.float32) / np.float32(PIXEL_MAX)
    return ((scaled - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def sample_pixels(batch_size: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Seeded, photo-like images: smooth colour fields plus sensor noise, stored in 8 bits.

    Returns:
        B, S, S, 3 uint8 array, RGB, channels last.
    """
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, _COARSE_GRID, _COARSE_GRID, generator=generator)
    pixels = F.interpolate(
        coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
    )  # B, 3, S, S
    pixels = pixels + 0.03 * torch.randn(pixels.shape, generator=generator)
    pixels = pixels.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()  # B, S, S, 3
    return np.round(pixels * PIXEL_MAX).astype(np.uint8)


def sample_images(batch_size: int, image_size: int, seed: int = 0) -> np.ndarray:
    """The seeded images of `sample_pixels`, ImageNet-normalised: B, S, S, 3 float32."""
    return normalize(sample_pixels(batch_size, image_size, seed))
