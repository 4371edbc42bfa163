"""Real photographs for verification and calibration: JPEG/PNG files or folders of them.

Each photo is prepared as timm's eval transform prepares VOLO's inputs: the shorter side
resized to floor(image_size / crop_pct) with bicubic interpolation, then the centre
image_size x image_size cropped; a hub folder's config.json may name another crop_pct,
interpolation or crop mode (`variants.EvalTransform`). What is returned are the 8-bit RGB
pixels; `images.normalize` turns them into the model's normalised input.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from volo_convert.architecture.variants import IMAGENET_MEAN, PIXEL_MAX, EvalTransform
from volo_convert.checks.images import sample_pixels
from volo_convert.errors import ConversionError, first_line, os_error_reason
from volo_convert.options import (
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_IMAGES,
    MANY_VERIFY_IMAGES,
    judged_by_top1,
)
from volo_convert.paths import check_input

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
WarningCallback = Callable[[str], None]


def photo_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files `paths` name: a file as given, a folder as its JPEG/PNG files, sorted.

    Each path goes through the input policy (`paths.check_input`): a missing path, a
    FIFO or device, an unreadable folder or a folder without images is a ConversionError.
    """
    files = []
    for path in paths:
        path = check_input(path, folder_ok=True, what="a JPEG/PNG photo or a folder of them")
        if not path.is_dir():
            files.append(path)
            continue
        try:
            found = sorted(
                child
                for child in path.iterdir()
                if child.is_file() and child.suffix.lower() in PHOTO_SUFFIXES
            )
        except OSError as error:
            raise ConversionError(f"{path}: cannot be read ({os_error_reason(error)})") from None
        if not found:
            raise ConversionError(
                f"{path}: the folder holds no images ({', '.join(PHOTO_SUFFIXES)})"
            )
        files += found
    return files


def _resized_size(width: int, height: int, scale_size: int, crop_mode: str) -> tuple[int, int]:
    """The (width, height) a photo is resized to before the crop, as timm's eval resize."""
    if crop_mode == "squash":  # both sides, aspect ratio not kept
        return scale_size, scale_size
    if crop_mode == "border":  # timm's ResizeKeepRatio(longest=1): the longer side fits
        ratio = max(width, height) / scale_size
        return round(width / ratio), round(height / ratio)
    if width <= height:  # torchvision's Resize(int): the long side keeps the aspect ratio
        return scale_size, int(scale_size * height / width)
    return int(scale_size * width / height), scale_size


def prepare_photo(path: Path, image_size: int, transform: EvalTransform) -> np.ndarray:
    """One photo as S, S, 3 uint8 RGB pixels, resized and cropped as timm's eval.

    Raises OSError (PIL's UnidentifiedImageError is one) if the file is no readable image,
    or one too large to decode safely: over twice PIL's MAX_IMAGE_PIXELS, PIL's guard
    against decompression bombs (a few hundred kilobytes that decode to gigabytes). Up to
    that, large photos decode without PIL's warning.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as error:
            raise OSError(first_line(error)) from None
    with opened as photo:
        photo = photo.convert("RGB")
        scale_size = math.floor(image_size / transform.crop_pct)
        size = _resized_size(*photo.size, scale_size, transform.crop_mode)
        resample = Image.Resampling[transform.interpolation.upper()]
        photo = photo.resize(size, resample)
        if transform.crop_mode == "border" and min(size) < image_size:
            # timm's CenterCropOrPad: pad to the crop with the mean colour, then crop
            fill = tuple(round(PIXEL_MAX * mean) for mean in IMAGENET_MEAN)
            padded = Image.new("RGB", (max(size[0], image_size), max(size[1], image_size)), fill)
            padded.paste(photo, ((padded.width - size[0]) // 2, (padded.height - size[1]) // 2))
            photo, size = padded, padded.size
        left = round((size[0] - image_size) / 2.0)
        top = round((size[1] - image_size) / 2.0)
        photo = photo.crop((left, top, left + image_size, top + image_size))
        return np.asarray(photo, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Photos:
    """Photos as prepared for a model: `names` the paths they were read from (a folder's
    files as folder/name), `pixels` their B, S, S, 3 uint8 RGB pixels, in the same order."""

    names: tuple[str, ...]
    pixels: np.ndarray


def read_photos(
    paths: Sequence[str | Path], image_size: int, transform: EvalTransform, warn: WarningCallback
) -> Photos:
    """Every readable photo among `paths` (files or folders), named and prepared.

    A file that is no readable image is skipped, and `warn` is called with a line naming
    it; if none is left, that is a ConversionError.
    """
    names, pixels = [], []
    for path in photo_files(paths):
        try:
            pixels.append(prepare_photo(path, image_size, transform))
        except (OSError, ValueError) as error:
            warn(f"{path}: skipped, not a readable image ({first_line(error)})")
            continue
        names.append(str(path))
    if not pixels:
        named = ", ".join(str(path) for path in paths)
        raise ConversionError(f"{named}: no readable JPEG or PNG image among them")
    return Photos(tuple(names), np.stack(pixels))


def load_photos(
    paths: Sequence[str | Path], image_size: int, transform: EvalTransform, warn: WarningCallback
) -> np.ndarray:
    """The pixels of `read_photos`: B, S, S, 3 uint8."""
    return read_photos(paths, image_size, transform, warn).pixels


def verification_photos(
    paths: Sequence[str | Path],
    image_size: int,
    transform: EvalTransform,
    warn: WarningCallback,
    precision: str,
) -> Photos | None:
    """The photos at `paths` to verify a `precision` file on, or None (no paths) for the
    synthetic images.

    A file judged by top-1 agreement (`judged_by_top1`) needs MANY_VERIFY_IMAGES readable
    photos for a verdict.
    """
    if not paths:
        return None
    photos = read_photos(paths, image_size, transform, warn)
    judged = judged_by_top1(precision)
    if judged is not None and len(photos.names) < MANY_VERIFY_IMAGES:
        raise ConversionError(
            f"--images gave {len(photos.names)} readable images, but {judged} is judged on "
            f"at least {MANY_VERIFY_IMAGES}"
        )
    return photos


def calibration_pixels(
    paths: Sequence[str | Path], image_size: int, transform: EvalTransform, warn: WarningCallback
) -> np.ndarray:
    """What an int8 file is calibrated on: the photos at `paths`, else the default set.

    The default is DEFAULT_CALIBRATION_IMAGES seeded synthetic images, a seed apart from
    the verification images.
    """
    if paths:
        return load_photos(paths, image_size, transform, warn)
    return sample_pixels(DEFAULT_CALIBRATION_IMAGES, image_size, CALIBRATION_SEED)
