"""Quantized TFLite files against their weight-rounding floor, over weight styles and seeds.

For each weight style (synthetic.py: realistic, upstream-init, trained-like) and seed, a
synthetic checkpoint is made, the Keras model built and ported, and the PyTorch reference run
on the verification images (the 64 seeded synthetic images a conversion verifies on, and the
photos of --photos if given). Then, for each recipe (a TFLite dtype, and for int8 a variant
of the quantization scheme), the file is converted and judged exactly as `volo-convert`
judges it (`check_parity` with the floor's logits), and one row is printed:

- floor: the weight-rounding floor's mean abs logit diff over the logits' std, and its top-1;
- the file's mean abs logit diff over the std, its ratio to the floor's, raw top-1, top-1 on
  the clear-margin images (and how many there are), and the verdict;
- the largest float top-1 margin of an image that the floor or the file flipped, in units of
  the floor's largest abs logit diff on that image: the clear-margin rule must sit above it.

Every row is printed, none picked. Recipes other than the shipped ones change module
settings of `formats/tflite_quantization.py` for the duration of one conversion.

Usage:
    python scripts/bench_quantization.py --variant d1 --image-size 64 --seeds 0 1 2 \\
        --markdown study.md [--photos views/] [--recipes int8-dynamic int8 int8-no-smoothing]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS, crop_pct
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.parity import ParityResult, compare_logits, top1_margins
from volo_convert.checks.photos import load_photos
from volo_convert.checks.reference import ReferenceRun, run_reference
from volo_convert.checks.weight_floor import floor_outputs
from volo_convert.formats import tflite, tflite_quantization
from volo_convert.formats.tflite import TFLiteRunner, convert_to_tflite
from volo_convert.options import (
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_IMAGES,
    MANY_VERIFY_IMAGES,
    WEIGHT_STYLES,
    default_max_floor_ratio,
)
from volo_convert.synthetic import make_state_dict
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights


@contextlib.contextmanager
def _setting(module: object, name: str, value: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _no_smoothing(model: object, calibration: np.ndarray) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


# Recipe name -> (TFLite dtype, the settings it runs under).
RECIPES: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
    "int8-dynamic": ("int8-dynamic", contextlib.nullcontext),
    "int8": ("int8", contextlib.nullcontext),
    "int8-no-smoothing": (
        "int8",
        lambda: _setting(tflite, "smoothed_layer_norms", _no_smoothing),
    ),
    "int8-smoothing-0.8": (
        "int8",
        lambda: _setting(tflite_quantization, "SMOOTHING_STRENGTH", 0.8),
    ),
    "int8-smoothing-0.3": (
        "int8",
        lambda: _setting(tflite_quantization, "SMOOTHING_STRENGTH", 0.3),
    ),
    "int8-minmax-ranges": (
        "int8",
        lambda: _setting(tflite_quantization, "CALIBRATION_RANGES", "minmax"),
    ),
    "int8-dynamic-smoothed": ("int8-dynamic", lambda: _smoothing_for_dynamic()),
}


@contextlib.contextmanager
def _smoothing_for_dynamic() -> Iterator[None]:
    """int8-dynamic converted with the LayerNorms smoothed, as int8 is."""
    original = tflite.convert_to_tflite

    def convert(model, dtype, io="float32", calibration=None):
        with (
            tflite_quantization.smoothed_layer_norms(model, calibration),
            _setting(tflite, "smoothed_layer_norms", _no_smoothing),
        ):
            return original(model, dtype, io, None)

    with _setting(sys.modules[__name__], "convert_to_tflite", convert):
        yield


# d1's widths, heads and classes with one block per stage: its kernels round as d1's do, and
# it converts in a fraction of d1's time (scripts run on shared 2-core machines).
CONFIGS = {
    **VARIANTS,
    "d1-short": dataclasses.replace(VARIANTS["d1"], name="d1", layers=(1, 1, 1, 1)),
}


def _flipped_margin(values: np.ndarray, reference: np.ndarray, floor: np.ndarray) -> float:
    """The largest reference top-1 margin among images whose top-1 `values` changed, in
    units of the floor's largest abs logit difference on that image."""
    noise = np.abs(floor.astype(np.float64) - reference).max(-1)  # B
    flipped = values.argmax(-1) != reference.argmax(-1)
    ratios = top1_margins(reference)[flipped] / noise[flipped]
    return float(ratios.max()) if flipped.any() else 0.0


def _row(
    style: str,
    seed: int,
    images: str,
    recipe: str,
    parity: ParityResult,
    floor: np.ndarray,
    outputs: np.ndarray,
    reference: ReferenceRun,
) -> str:
    figures = parity.floor
    assert figures is not None
    std = figures.logit_std
    unit = figures.floor_mean_abs_diff
    clear = (
        f"{figures.clear_top1_agreement:.0%} ({figures.clear_images})"
        if figures.clear_top1_agreement is not None
        else f"- ({figures.clear_images})"
    )
    median_margin = float(np.median(top1_margins(reference.outputs)))
    cells = [
        style,
        str(seed),
        images,
        f"{std:.3g}",
        f"{median_margin / std:.2f}",
        f"{unit / std:.1%}",
        f"{figures.floor_top1_agreement:.0%}",
        recipe,
        f"{parity.mean_abs_diff / std:.1%}",
        f"{figures.error_ratio:.2f}",
        f"{parity.top1_agreement:.0%}",
        clear,
        f"{_flipped_margin(floor, reference.outputs, floor):.1f}",
        f"{_flipped_margin(outputs, reference.outputs, floor):.1f}",
        "pass" if parity.passed else "FAIL",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| style | seed | images | logit std | median margin / std | floor err / std | floor top-1 "
    "| file | file err / std | x floor | top-1 | clear-margin top-1 (images) "
    "| largest flipped margin, floor (x its max diff there) | same, file | verdict |\n"
    + "|---" * 15
    + "|"
)


def study(arguments: argparse.Namespace) -> list[str]:
    config = CONFIGS[arguments.variant]
    size = arguments.image_size
    rows = []
    photos = None
    if arguments.photos:
        photos = load_photos([arguments.photos], size, crop_pct(config.name, size), print)
    calibration = normalize(sample_pixels(DEFAULT_CALIBRATION_IMAGES, size, CALIBRATION_SEED))
    for style in arguments.styles:
        for seed in arguments.seeds:
            state_dict = make_state_dict(config, size, seed, style)
            model = build_volo(config, size)
            port_weights(model, state_dict, weight_mappings(config))
            runs = {
                "synthetic": run_reference(
                    config, size, state_dict, device="cpu", batch_size=MANY_VERIFY_IMAGES
                )
            }
            if photos is not None:
                runs["photos"] = run_reference(
                    config, size, state_dict, device="cpu", pixels=photos
                )
            floors = {name: floor_outputs(model, run.images) for name, run in runs.items()}
            for recipe in arguments.recipes:
                dtype, settings = RECIPES[recipe]
                started = time.perf_counter()
                with settings(), tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / "model.tflite"
                    path.write_bytes(convert_to_tflite(model, dtype, calibration=calibration))
                    runner = TFLiteRunner(path)
                    for name, run in runs.items():
                        outputs = runner.predict_on_batch(run.images)
                        parity = compare_logits(
                            outputs, run.outputs, None, run.device,
                            floor_values=floors[name],
                            max_error_ratio=default_max_floor_ratio(dtype),
                        )  # fmt: skip
                        row = _row(style, seed, name, recipe, parity, floors[name], outputs, run)
                        rows.append(row)
                        print(row, flush=True)
                print(f"  ({recipe}: {time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1", choices=CONFIGS)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--styles", nargs="+", default=list(WEIGHT_STYLES), choices=WEIGHT_STYLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["int8-dynamic", "int8"], choices=RECIPES)
    parser.add_argument("--photos", help="a folder of photos (scripts/photo_views.py)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    arguments = parser.parse_args()
    print(HEADER, flush=True)
    rows = study(arguments)
    if arguments.markdown:
        arguments.markdown.write_text(HEADER + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
