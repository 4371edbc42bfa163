"""Real photographs for verification and calibration: JPEG/PNG files or folders of them.

Each photo is prepared as timm's eval transform prepares VOLO's inputs: the shorter side
resized to floor(image_size / crop_pct) with bicubic interpolation, then the centre
image_size x image_size cropped. What is returned are the 8-bit RGB pixels;
`images.normalize` turns them into the model's normalised input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from volo_convert.errors import ConversionError, first_line

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


class PhotoWarning(UserWarning):
    """A file given as a photo that could not be read; it is skipped."""


def photo_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files `paths` name: a file as given, a folder as its JPEG/PNG files, sorted.

    A path that does not exist, or a folder without images, is a ConversionError.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                child
                for child in path.iterdir()
                if child.is_file() and child.suffix.lower() in PHOTO_SUFFIXES
            )
            if not found:
                raise ConversionError(
                    f"{path}: the folder holds no images ({', '.join(PHOTO_SUFFIXES)})"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConversionError(f"{path}: no such file or folder")
    return files


def prepare_photo(path: Path, image_size: int, crop_pct: float) -> np.ndarray:
    """One photo as S, S, 3 uint8 RGB pixels, resized and centre-cropped as timm's eval.

    Raises OSError (PIL's UnidentifiedImageError is one) if the file is no readable image.
    """
    from PIL import Image

    with Image.open(path) as photo:
        photo = photo.convert("RGB")
        width, height = photo.size
        short_side = math.floor(image_size / crop_pct)
        if width <= height:  # torchvision's Resize(int): the long side keeps the aspect ratio
            size = (short_side, int(short_side * height / width))
        else:
            size = (int(short_side * width / height), short_side)
        photo = photo.resize(size, Image.Resampling.BICUBIC)
        left = round((size[0] - image_size) / 2.0)
        top = round((size[1] - image_size) / 2.0)
        photo = photo.crop((left, top, left + image_size, top + image_size))
        return np.asarray(photo, dtype=np.uint8)


def load_photos(paths: Sequence[str | Path], image_size: int, crop_pct: float) -> np.ndarray:
    """Every readable photo among `paths` (files or folders) as B, S, S, 3 uint8 pixels.

    A file that is no readable image is skipped with a one-line PhotoWarning naming it;
    if none is left, that is a ConversionError.
    """
    pixels = []
    for path in photo_files(paths):
        try:
            pixels.append(prepare_photo(path, image_size, crop_pct))
        except (OSError, ValueError) as error:
            message = f"{path}: skipped, not a readable image ({first_line(error)})"
            warnings.warn(message, PhotoWarning, stacklevel=2)
    if not pixels:
        named = ", ".join(str(path) for path in paths)
        raise ConversionError(f"{named}: no readable JPEG or PNG image among them")
    return np.stack(pixels)
