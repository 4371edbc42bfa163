"""The weight-rounding floor and the verdict on a quantized file beside it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import TINY_CONFIG

from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.parity import clear_margins, compare_logits, top1_margins
from volo_convert.checks.reference import run_reference
from volo_convert.checks.weight_floor import (
    floor_outputs,
    quantized_layers,
    round_per_channel,
    rounded_kernels,
)
from volo_convert.options import CLEAR_MARGIN_MULTIPLE, MAX_FLOOR_RATIO
from volo_convert.results import ConversionResult
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

TINY_SIZE = 64


def test_round_per_channel_puts_each_output_channel_on_its_own_int8_grid() -> None:
    rng = np.random.default_rng(0)
    kernel = (rng.normal(size=(3, 3, 5, 4)) * [1, 10, 0.01, 0]).astype(np.float32)
    rounded = round_per_channel(kernel)
    assert rounded.dtype == np.float32 and rounded.shape == kernel.shape
    for channel in range(3):  # the last channel is zero and stays so
        peak = np.abs(kernel[..., channel]).max()
        steps = rounded[..., channel] / (peak / 127)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(rounded[..., channel]).max() == pytest.approx(peak, rel=1e-6)
        assert np.abs(rounded[..., channel] - kernel[..., channel]).max() <= peak / 254 * 1.0001
    np.testing.assert_array_equal(rounded[..., 3], 0)


def test_the_floor_rounds_every_kernel_and_puts_them_back(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    reference = run_reference(TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", batch_size=8)
    before = [keras.ops.convert_to_numpy(weight).copy() for weight in model.weights]
    with rounded_kernels(model) as count:
        changed = sum(
            not np.array_equal(old, keras.ops.convert_to_numpy(new))
            for old, new in zip(before, model.weights, strict=True)
        )
    # Every convolution and dense layer: 3 stem convs, 2 patch convs, the blocks' denses, heads.
    assert count == len(quantized_layers(model)) == changed >= 20
    for old, weight in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(weight))

    floor = floor_outputs(model, reference.images)
    float_error = np.abs(np.asarray(model.predict_on_batch(reference.images)) - reference.outputs)
    floor_error = np.abs(floor - reference.outputs)
    assert float_error.max() <= 1e-4  # the float model is the reference
    # int8 rounding moves each logit by a few tenths of a percent of the logits' spread.
    assert 1e-3 <= floor_error.mean() / reference.outputs.std() <= 0.05
    parity = compare_logits(floor, reference.outputs, None, "cpu", floor_values=floor)
    assert parity.floor is not None and parity.floor.error_ratio == 1.0 and parity.passed


def _logits(margins: list[float], classes: int = 5) -> np.ndarray:
    """B, K logits whose class 0 leads class 1 by each of `margins`, the rest far below."""
    logits = np.full((len(margins), classes), -10.0)
    logits[:, 0] = margins
    logits[:, 1] = 0.0
    return logits


def test_clear_margin_images_are_those_whose_margin_clears_the_floor_error_on_them() -> None:
    reference = _logits([0.05, 0.5, 2.0, 3.0])
    np.testing.assert_allclose(top1_margins(reference), [0.05, 0.5, 2.0, 3.0])
    floor_noise = np.array([0.01, 0.2, 0.4, 1.0])  # the floor's largest diff on each image
    floor = reference + floor_noise[:, None] * np.array([1, -1, 1, -1, 1])
    # Clear: margin >= 4x the noise there; 0.05 >= 0.04 and 2.0 >= 1.6, not 0.5 or 3.0.
    assert CLEAR_MARGIN_MULTIPLE == 4.0
    np.testing.assert_array_equal(clear_margins(reference, floor), [True, False, True, False])
    model = reference.copy()
    model[1, 1] += 1.0  # flips an image whose margin is not clear
    parity = compare_logits(
        model.astype(np.float32), reference.astype(np.float32), None, "cpu",
        floor_values=floor, max_error_ratio=MAX_FLOOR_RATIO["int8"],
    )  # fmt: skip
    figures = parity.floor
    assert figures.floor_mean_abs_diff == pytest.approx(floor_noise.mean())
    assert figures.clear_images == 2
    assert parity.top1_agreement == 0.75 and figures.clear_top1_agreement == 1.0
    assert figures.floor_top1_agreement == 1.0
    assert figures.error_ratio == pytest.approx(0.05 / floor_noise.mean())  # 1 of 20 by 1
    assert parity.passed and parity.failure is None


def test_a_file_far_above_its_floor_fails_and_says_by_how_much() -> None:
    reference = _logits([2.0, 3.0, 4.0, 5.0]).astype(np.float32)
    floor = reference + np.float32(0.1)
    model = reference + np.float32(0.25)  # 2.5x the floor's error, no top-1 changed
    parity = compare_logits(model, reference, None, "cpu", floor_values=floor, max_error_ratio=2.0)
    assert not parity.passed and parity.top1_agreement == 1.0
    assert parity.failure == (
        "mean abs logit diff is 2.50x the weight-rounding floor's 0.1 (at most 2x)"
    )
    unbarred = compare_logits(model, reference, None, "cpu", floor_values=floor)
    assert unbarred.passed and unbarred.floor.max_error_ratio is None


def test_a_flipped_clear_margin_image_fails_even_within_the_ratio() -> None:
    reference = _logits([0.01, 0.02, 3.0, 4.0]).astype(np.float32)
    floor = reference + np.float32(0.1)  # clear: margins of at least 0.4
    model = reference.copy()
    model[2, 1] += np.float32(3.5)  # flips the image with margin 3.0
    parity = compare_logits(
        model, reference, None, "cpu", floor_values=floor, max_error_ratio=100.0
    )
    assert parity.floor.clear_images == 2 and parity.floor.clear_top1_agreement == 0.5
    assert not parity.passed
    assert parity.failure == (
        "top-1 agreement 50.0% on the 2 images whose float margin is clear "
        "(4x the floor's logit error there; at least 100%)"
    )


def test_without_clear_margin_images_only_the_ratio_judges() -> None:
    reference = _logits([0.01, 0.02]).astype(np.float32)
    floor = reference + np.float32(0.1)  # neither margin clears 0.4
    swapped = reference[:, [1, 0, 2, 3, 4]]  # every top-1 flipped, every logit within 0.02
    parity = compare_logits(
        swapped, reference, None, "cpu", floor_values=floor, max_error_ratio=1.25
    )
    assert parity.floor.clear_images == 0 and parity.floor.clear_top1_agreement is None
    assert parity.top1_agreement == 0.0 and parity.passed
    assert (
        compare_logits(swapped, reference, None, "cpu", min_top1=0.5, floor_values=floor).failure
        == "top-1 agreement 0.0% is below --min-top1 50% (2 images)"
    )


@pytest.mark.parametrize(
    ("dtype", "remedy"),
    [
        (
            "int8",
            "try --calibration-images with a few dozen real photos, or --tflite-dtype int8-dynamic",
        ),
        ("int8-dynamic", "try --tflite-dtype float16"),
    ],
)
def test_a_failed_quantized_file_says_what_to_try(dtype: str, remedy: str) -> None:
    reference = _logits([2.0, 3.0]).astype(np.float32)
    parity = compare_logits(
        reference + np.float32(0.5), reference, None, "cpu",
        floor_values=reference + np.float32(0.1), max_error_ratio=MAX_FLOOR_RATIO[dtype],
    )  # fmt: skip
    result = ConversionResult(
        checkpoint="d1.pth.tar", output="d1.tflite", variant="d1", image_size=224,
        num_classes=5, parameters=1, parity=parity, tflite_dtype=dtype, output_format="tflite",
    )  # fmt: skip
    assert result.status == "failed"
    assert result.failure_reason == (
        f"parity failed: mean abs logit diff is 5.00x the weight-rounding floor's 0.1 "
        f"(at most {MAX_FLOOR_RATIO[dtype]:g}x); {remedy}"
    )
    result.verify_seconds, result.runtime = 1.0, "LiteRT"
    lines = result.summary().splitlines()
    std = float(reference.std())
    floor_line = f"weight floor    0.1 mean abs diff, {0.1 / std:.1%} of the logits' std {std:.3g}"
    assert floor_line in lines
    assert (
        f"vs the floor    5.00x  ({0.5 / std:.1%} of the std, max {MAX_FLOOR_RATIO[dtype]:g}x)"
        in lines
    )
    assert lines[-1] == "FAIL"
