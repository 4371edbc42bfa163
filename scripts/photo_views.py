"""The 72 photo views that docs/BENCHMARKS.md measures agreement on: 12 photographs x 6 views.

The photographs are the sample images that ship inside scikit-image and matplotlib (neither is
a dependency of volo-convert; install them beside it: `pip install scikit-image matplotlib`).
Each photo gives six views, written as PNG: whole, mirrored, and its four corners' 70% crops.
`volo-convert verify FILE CHECKPOINT --images FOLDER` then prepares them as timm's eval does.

    python scripts/photo_views.py views/
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

CORNER_CROP = 0.7  # each corner view keeps this fraction of the height and of the width


def _motorcycle() -> np.ndarray:
    from skimage import data

    left, _, _ = data.stereo_motorcycle()
    return left


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as stream:
        return np.asarray(Image.open(stream).convert("RGB"))


def photographs() -> dict[str, Callable[[], np.ndarray]]:
    """Name -> function returning the photograph as H, W, 3 (or H, W) uint8."""
    from skimage import data

    return {
        "astronaut": data.astronaut,
        "coffee": data.coffee,
        "chelsea": data.chelsea,
        "rocket": data.rocket,
        "motorcycle": _motorcycle,
        "hubble_deep_field": data.hubble_deep_field,
        "retina": data.retina,
        "ihc": data.immunohistochemistry,
        "camera": data.camera,
        "coins": data.coins,
        "brick": data.brick,
        "grace_hopper": _grace_hopper,
    }


def views(photo: Image.Image) -> dict[str, Image.Image]:
    """The six views of one photo."""
    width, height = photo.size
    crop_width, crop_height = round(width * CORNER_CROP), round(height * CORNER_CROP)
    corners = {
        "top_left": (0, 0),
        "top_right": (width - crop_width, 0),
        "bottom_left": (0, height - crop_height),
        "bottom_right": (width - crop_width, height - crop_height),
    }
    shown = {"whole": photo, "mirrored": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    for name, (left, top) in corners.items():
        shown[name] = photo.crop((left, top, left + crop_width, top + crop_height))
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, load in photographs().items():
        photo = Image.fromarray(np.asarray(load(), dtype=np.uint8)).convert("RGB")
        for view, image in views(photo).items():
            image.save(args.folder / f"{name}_{view}.png")
            written += 1
    print(f"{written} views of {len(photographs())} photographs in {args.folder}")


if __name__ == "__main__":
    main()
