"""Full-integer (int8) TFLite quantization that keeps VOLO's top-1 agreement.

Only convolutions and dense layers run in integers; the ops in FLOAT_OPS stay in float32.
Before calibration each LayerNorm's per-channel range is moved into the dense layers it
feeds (SmoothQuant), so that a few outlier channels do not take the whole int8 range.
docs/FORMATS.md, "Quantized TFLite", says what each measure bought.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from volo_convert.architecture.keras_model import norm_consumers
from volo_convert.compat import calibrate_only, quantize_calibrated, with_io_types
from volo_convert.formats.tflite_flatbuffer import operator_name, schema

# SmoothQuant's migration strength: half of each LayerNorm channel's range goes to the weights.
SMOOTHING_STRENGTH = 0.5
SMOOTHING_FLOOR = 1e-5  # keeps a channel that is zero everywhere from dividing by zero
PROBE_BATCH = 4  # images per pass when reading LayerNorm peaks
# Kept in float32 in int8 files: per-layer comparison with the quantization debugger put
# the loss in the attention matmuls (up to 18 quantization steps of error per op), then
# in LayerNorm's statistics; quantizing only the convolutions and dense layers took d1's
# top-1 agreement on photos from 35% to 92% (docs/FORMATS.md, "Quantized TFLite").
FLOAT_OPS = (
    "BATCH_MATMUL",
    "SOFTMAX",
    "MEAN",
    "SQUARED_DIFFERENCE",
    "RSQRT",
    "ADD",
    "MUL",
    "NEG",
    "GELU",
    "REDUCE_MAX",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "PACK",
    "STRIDED_SLICE",
    "PAD",
    "TRANSPOSE",
    "RESHAPE",
)


def _channel_peaks(model: keras.Model, layers: list[Any], inputs: np.ndarray) -> list[np.ndarray]:
    """max |output| per channel of each of `layers`, over `inputs` run through `model`."""
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    peaks = [np.zeros(layer.output.shape[-1], np.float32) for layer in layers]
    for start in range(0, len(inputs), PROBE_BATCH):
        outputs = probe.predict_on_batch(inputs[start : start + PROBE_BATCH])
        for index, values in enumerate(outputs):
            values = np.abs(keras.ops.convert_to_numpy(values))
            peaks[index] = np.maximum(peaks[index], values.reshape(-1, values.shape[-1]).max(0))
    return peaks


@contextlib.contextmanager
def smoothed_layer_norms(model: keras.Model, calibration: np.ndarray) -> Iterator[None]:
    """Within the block, each LayerNorm's per-channel range is moved into the dense layers.

    SmoothQuant's migration (Xiao et al., 2023) at strength SMOOTHING_STRENGTH: channel j of
    a LayerNorm's output is divided by s_j = peak_j^a / weight_peak_j^(1-a) (gamma and beta
    divided) and the rows j of the kernels it feeds are multiplied by s_j. The float model
    is the same; the int8 one quantizes flatter activations, whose outlier channels would
    otherwise take the whole int8 range. Peaks are read on `calibration`. The weights are
    put back afterwards.
    """
    norms = {
        model.get_layer(norm): [model.get_layer(dense) for dense in denses]
        for norm, denses in norm_consumers(model).items()
    }
    peaks = _channel_peaks(model, list(norms), calibration)
    variables = [
        variable
        for layer, consumers in norms.items()
        for variable in (layer.gamma, layer.beta, *(dense.kernel for dense in consumers))
    ]
    originals = [keras.ops.convert_to_numpy(variable) for variable in variables]
    for (layer, consumers), peak in zip(norms.items(), peaks, strict=True):
        kernels = [keras.ops.convert_to_numpy(dense.kernel) for dense in consumers]
        weight_peak = np.max([np.abs(kernel).max(1) for kernel in kernels], axis=0)
        scale = np.maximum(peak, SMOOTHING_FLOOR) ** SMOOTHING_STRENGTH / np.maximum(
            weight_peak, SMOOTHING_FLOOR
        ) ** (1 - SMOOTHING_STRENGTH)  # C
        layer.gamma.assign(keras.ops.convert_to_numpy(layer.gamma) / scale)
        layer.beta.assign(keras.ops.convert_to_numpy(layer.beta) / scale)
        for dense, kernel in zip(consumers, kernels, strict=True):
            dense.kernel.assign(kernel * scale[:, None])  # C_in, C_out
    try:
        yield
    finally:
        for variable, original in zip(variables, originals, strict=True):
            variable.assign(original)


def _float_nodes(content: bytes) -> list[str]:
    """The output tensor names of the ops an int8 file keeps in float32.

    Every op of FLOAT_OPS, except those between the input and the first convolution
    (the pixel scaling, the stem's padding): quantized, they let the file take integers.
    """
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    subgraph = flatbuffer.Subgraphs(0)
    input_chain = {subgraph.Inputs(0)}
    nodes = []
    for index in range(subgraph.OperatorsLength()):
        operator = subgraph.Operators(index)
        name = operator_name(flatbuffer, operator.OpcodeIndex())
        outputs = [operator.Outputs(position) for position in range(operator.OutputsLength())]
        inputs = {operator.Inputs(position) for position in range(operator.InputsLength())}
        if name != "CONV_2D" and inputs & input_chain:
            input_chain.update(outputs)
        elif name in FLOAT_OPS:
            nodes += [subgraph.Tensors(output).Name().decode() for output in outputs]
    return nodes


# Calibration ranges: "minmax" keeps each tensor's observed range; "mse" narrows the range
# of every tensor that goes into or comes out of an int8 op to the one with the least
# squared quantization error over the calibration values (rounding inside, clipping outside).
CALIBRATION_RANGES = "mse"
RANGE_HISTOGRAM_BINS = 2048
RANGE_CANDIDATES = np.linspace(0.2, 1.0, 81)  # fractions of the observed range tried
INT8_ACTIVATION_LEVELS = 255
QUANTIZED_OPS = ("CONV_2D", "FULLY_CONNECTED")


def _quantized_activations(content: bytes) -> set[int]:
    """Indices of the tensors going into (first input) or out of each int8 op."""
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    subgraph = flatbuffer.Subgraphs(0)
    tensors = set()
    for index in range(subgraph.OperatorsLength()):
        operator = subgraph.Operators(index)
        if operator_name(flatbuffer, operator.OpcodeIndex()) in QUANTIZED_OPS:
            tensors.add(operator.Inputs(0))
            tensors.update(
                operator.Outputs(position) for position in range(operator.OutputsLength())
            )
    return tensors


def _least_error_range(histogram: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The [low, high] shrunk by the RANGE_CANDIDATES fraction with the least expected
    squared error: step**2 / 12 for values inside, their distance to the edge outside."""
    edges = np.linspace(low, high, len(histogram) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    errors = []
    for fraction in RANGE_CANDIDATES:
        clip_low, clip_high = low * fraction, high * fraction
        step = (clip_high - clip_low) / INT8_ACTIVATION_LEVELS
        outside = np.maximum(centres - clip_high, 0) + np.maximum(clip_low - centres, 0)
        inside = np.where(outside > 0, 0.0, step**2 / 12)
        errors.append(float((histogram * (outside**2 + inside)).sum()))
    best = RANGE_CANDIDATES[int(np.argmin(errors))]
    return low * best, high * best


def _refined_ranges(calibrated: bytes, batches: list[np.ndarray]) -> bytes:
    """`calibrated` with each int8 activation's min/max narrowed as CALIBRATION_RANGES says.

    The calibrated float model runs on the calibration batches (`calibration_batches`: the
    file's batch size) keeping every tensor; each
    int8 activation's values are binned within its recorded range, and the range with the
    least squared error replaces it.
    """
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    tensors = model.subgraphs[0].tensors
    ranges = {}
    for index in _quantized_activations(calibrated):
        quantization = tensors[index].quantization
        if quantization is not None and quantization.min is not None:
            ranges[index] = (float(quantization.min[0]), float(quantization.max[0]))
    ranges = {index: bounds for index, bounds in ranges.items() if bounds[1] > bounds[0]}
    with warnings.catch_warnings():  # keeping every tensor is what this pass is for
        warnings.simplefilter("ignore")
        runner = tf.lite.Interpreter(
            model_content=calibrated, experimental_preserve_all_tensors=True
        )
    runner.allocate_tensors()
    histograms = {index: np.zeros(RANGE_HISTOGRAM_BINS) for index in ranges}
    input_index = runner.get_input_details()[0]["index"]
    for images in batches:
        runner.set_tensor(input_index, images.astype(np.float32))
        runner.invoke()
        for index, (low, high) in ranges.items():
            values = np.clip(runner.get_tensor(index).ravel(), low, high)
            histograms[index] += np.histogram(values, RANGE_HISTOGRAM_BINS, (low, high))[0]
    for index, (low, high) in ranges.items():
        new_low, new_high = _least_error_range(histograms[index], low, high)
        tensors[index].quantization.min = [new_low]
        tensors[index].quantization.max = [new_high]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def calibration_batches(calibration: np.ndarray, batch: int | None) -> list[np.ndarray]:
    """`calibration` (B, S, S, 3) in batches a file of `batch` takes (None: one at a time).

    The last batch of a fixed-N file is filled up with images from the start: the ranges
    recorded are the minima and maxima over all batches, which repeats cannot change.
    """
    size = batch or 1
    count = -(-len(calibration) // size) * size  # whole batches
    images = np.resize(calibration, (count, *calibration.shape[1:]))  # wraps around
    return [images[start : start + size] for start in range(0, count, size)]


def full_integer(
    converter: Any, calibration: np.ndarray, io: str, pixels: bool, batch: int | None = 1
) -> bytes:
    """Calibrates on `calibration` (B, S, S, 3 model inputs) and quantizes all but FLOAT_OPS.

    The calibration pass runs the float model on every image, in the file's `batch` (None
    for a dynamic file: one at a time), and records each tensor's range; the quantizer then
    keeps FLOAT_OPS in float32 with (de)quantize ops around them. `converter` has
    optimizations set; `io` int8 makes the input int8 (uint8 for pixels).
    """
    import tensorflow as tf

    batches = calibration_batches(calibration, batch)
    converter.representative_dataset = lambda: ([images] for images in batches)
    calibrate_only(converter)
    calibrated = converter.convert()
    if CALIBRATION_RANGES == "mse":
        calibrated = _refined_ranges(calibrated, batches)
    content = quantize_calibrated(calibrated, _float_nodes(calibrated))
    if io == "int8":  # the logits come out of float ops, so they stay float32
        content = with_io_types(content, tf.uint8 if pixels else tf.int8, tf.float32)
    return bytes(content)
