"""The weight-rounding floor of a quantized file: the float model with int8 kernels.

Both int8 TFLite dtypes store every convolution and dense kernel as symmetric int8, one scale
per output channel (the ops that take them: `CONV_2D`, `FULLY_CONNECTED`). Rounding the Keras
model's kernels the same way and keeping every activation in float gives the error that
weight rounding alone causes: a quantized file should not expect to beat it, and what it adds
on top is what its activation quantization costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np

INT8_WEIGHT_LEVELS = 127  # TFLite's int8 weights are symmetric: -127..127, zero point 0
FLOOR_BATCH = 16  # images per pass: a full-size model's activations for 64 images are large


def round_per_channel(kernel: np.ndarray) -> np.ndarray:
    """`kernel` (output channels last) rounded to symmetric int8 per output channel."""
    peaks = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)))  # C_out
    scales = np.where(peaks > 0, peaks / INT8_WEIGHT_LEVELS, 1.0)
    return (np.round(kernel / scales) * scales).astype(kernel.dtype)


def quantized_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose kernels an int8 TFLite file stores in int8: dense and convolution."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense | keras.layers.Conv2D)
    ]


@contextlib.contextmanager
def rounded_kernels(model: keras.Model) -> Iterator[int]:
    """Within the block every quantized layer's kernel is rounded per channel; yields how
    many kernels were rounded. The kernels are put back afterwards."""
    kernels = [layer.kernel for layer in quantized_layers(model)]
    originals = [keras.ops.convert_to_numpy(kernel) for kernel in kernels]
    for kernel, original in zip(kernels, originals, strict=True):
        kernel.assign(round_per_channel(original))
    try:
        yield len(kernels)
    finally:
        for kernel, original in zip(kernels, originals, strict=True):
            kernel.assign(original)


def floor_outputs(model: keras.Model, inputs: np.ndarray) -> np.ndarray:
    """The B, K logits of float32 `model` with its kernels rounded to int8, on B inputs."""
    with rounded_kernels(model):
        outputs = [
            keras.ops.convert_to_numpy(model.predict_on_batch(inputs[start : start + FLOOR_BATCH]))
            for start in range(0, len(inputs), FLOOR_BATCH)
        ]
    return np.concatenate(outputs).astype(np.float32)
