"""TFLite files: conversion with builtin ops only, quantization, and what a file holds.

The files take a fixed batch of one image (B = 1), which lets the converter fold every
shape computation into constants. float16 files store the weights in half precision and
compute in float32 (the interpreter dequantizes them when it loads the file). int8-dynamic
files store int8 weights and quantize activations on the fly. int8 files are calibrated on
representative images and run every convolution and dense layer in integers; the ops in
FLOAT_OPS stay in float32, and each LayerNorm's per-channel range is first moved into the
dense layers it feeds (README, "Quantized TFLite", says what each measure bought).

Each file carries a `volo_convert` metadata entry naming its dtype and input kind, written
with the model, and its provenance record, added once it is verified.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from volo_convert.architecture.keras_model import model_input, norm_consumers
from volo_convert.errors import ConversionError, first_line
from volo_convert.formats.contract import InputContract, check_input_kind
from volo_convert.formats.savedmodel import export_saved_model
from volo_convert.native_logs import TFLITE_LINES, known_lines_held_back
from volo_convert.options import DEFAULT_INPUT, TFLITE_DTYPES, TFLITE_IO, check_choice
from volo_convert.provenance import PROVENANCE_NAME

TFLITE_BATCH_SIZE = 1
METADATA_NAME = "volo_convert"
# SmoothQuant's migration strength: half of each LayerNorm channel's range goes to the weights.
SMOOTHING_STRENGTH = 0.5
SMOOTHING_FLOOR = 1e-5  # keeps a channel that is zero everywhere from dividing by zero
PROBE_BATCH = 4  # images per pass when reading LayerNorm peaks
# Kept in float32 in int8 files: per-layer comparison with the quantization debugger put
# the loss in the attention matmuls (up to 18 quantization steps of error per op), then
# in LayerNorm's statistics; quantizing only the convolutions and dense layers took d1's
# top-1 agreement on photos from 35% to 92% (README, "Quantized TFLite").
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


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def _operator_name(flatbuffer: Any, opcode_index: int) -> str:
    """The builtin name of an operator code (BATCH_MATMUL), or `custom:CODE` for a custom op."""
    schema = _schema()
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code

    opcode = flatbuffer.OperatorCodes(opcode_index)
    code = get_builtin_code_from_operator_code(opcode)
    if code == schema.BuiltinOperator.CUSTOM:
        return f"custom:{opcode.CustomCode().decode()}"
    builtin_names = {
        value: name for name, value in vars(schema.BuiltinOperator).items() if name.isupper()
    }
    return builtin_names[code]


def _converter(folder: str) -> Any:
    """A converter from the SavedModel in `folder`, allowed builtin ops only."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


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
    flatbuffer = _schema().Model.GetRootAsModel(content, 0)
    subgraph = flatbuffer.Subgraphs(0)
    input_chain = {subgraph.Inputs(0)}
    nodes = []
    for index in range(subgraph.OperatorsLength()):
        operator = subgraph.Operators(index)
        name = _operator_name(flatbuffer, operator.OpcodeIndex())
        outputs = [operator.Outputs(position) for position in range(operator.OutputsLength())]
        inputs = {operator.Inputs(position) for position in range(operator.InputsLength())}
        if name != "CONV_2D" and inputs & input_chain:
            input_chain.update(outputs)
        elif name in FLOAT_OPS:
            nodes += [subgraph.Tensors(output).Name().decode() for output in outputs]
    return nodes


def _full_integer(converter: Any, calibration: np.ndarray, io: str, pixels: bool) -> bytes:
    """Calibrates on `calibration` (B, S, S, 3 model inputs) and quantizes all but FLOAT_OPS.

    The calibration pass runs the float model on every image and records each tensor's
    range; the quantizer then keeps FLOAT_OPS in float32 with (de)quantize ops around them.
    `converter` has optimizations set; `io` int8 makes the input int8 (uint8 for pixels).
    """
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.python.util import modify_model_io_type

    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter._experimental_calibrate_only = True  # what QuantizationDebugger does too
    calibrated = converter.convert()
    content = mlir_quantize(calibrated, denylisted_nodes=_float_nodes(calibrated))
    if io == "int8":  # the logits come out of float ops, so they stay float32
        content = modify_model_io_type(content, tf.uint8 if pixels else tf.int8, tf.float32)
    return bytes(content)


def _add_metadata(model: Any, name: str, document: str) -> None:
    """Appends a metadata entry `name` holding `document` to a TFLite model object.

    The same round trip the converter makes to add its own `CONVERSION_METADATA`:
    operators, tensors and weights are carried over unchanged.
    """
    schema = _schema()
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(document.encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]


def _metadata(content: bytes, name: str) -> str | None:
    """The document of the metadata entry `name` in a flatbuffer, or None if it has none."""
    flatbuffer = _schema().Model.GetRootAsModel(content, 0)
    for index in range(flatbuffer.MetadataLength()):
        entry = flatbuffer.Metadata(index)
        if entry.Name().decode("utf-8") == name:
            return flatbuffer.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")
    return None


def _finish(content: bytes, dtype: str, input_kind: str) -> bytes:
    """Adds the `volo_convert` metadata; a uint8 pixel input is made to hold the pixels.

    The quantizer gives a uint8 input the scale of the calibrated range; setting it to 1
    and the zero point to 0 lets a camera's bytes go in as they are (the quantize op after
    the input rescales them to what the calibration found).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(content)
    subgraph = model.subgraphs[0]
    input_tensor = subgraph.tensors[subgraph.inputs[0]]
    if input_tensor.type == schema.TensorType.UINT8 and input_kind == "pixels":
        input_tensor.quantization.scale = [1.0]
        input_tensor.quantization.zeroPoint = [0]
    document = json.dumps({"tflite_dtype": dtype, "input": input_kind})
    _add_metadata(model, METADATA_NAME, document)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert_to_tflite(
    model: keras.Model,
    dtype: str = TFLITE_DTYPES[0],
    io: str = TFLITE_IO[0],
    calibration: np.ndarray | None = None,
) -> bytes:
    """Converts a Keras VOLO to a TFLite flatbuffer that uses builtin ops only.

    Args:
        model: the Keras model (TensorFlow backend), taking B, S, S, 3 images or pixels.
        dtype: one of TFLITE_DTYPES.
        io: the input and output type of an int8 file: float32, or int8 (uint8 input
            for a model that takes pixels).
        calibration: for int8, B, S, S, 3 representative inputs of the model.

    Returns:
        The flatbuffer, taking 1, S, S, 3 inputs and returning 1, K logits.
    """
    import tensorflow as tf

    check_choice("TFLite dtype", dtype, TFLITE_DTYPES)
    check_choice("TFLite IO type", io, TFLITE_IO)
    if dtype == "int8" and calibration is None:
        raise ConversionError("an int8 TFLite file needs calibration images")
    if io != TFLITE_IO[0] and dtype != "int8":
        raise ConversionError(f"--tflite-io {io} needs --tflite-dtype int8 (full integer)")
    input_kind = model_input(model)
    smoothing = (
        smoothed_layer_norms(model, calibration) if dtype == "int8" else contextlib.nullcontext()
    )
    with tempfile.TemporaryDirectory(prefix="volo-tflite-") as folder:
        with smoothing:
            export_saved_model(model, Path(folder), batch_size=TFLITE_BATCH_SIZE)
        converter = _converter(folder)
        if dtype != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8-dynamic: this alone
        if dtype == "float16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            with known_lines_held_back(TFLITE_LINES):
                if dtype == "int8":
                    content = _full_integer(converter, calibration, io, input_kind == "pixels")
                else:
                    content = converter.convert()
        except Exception as error:
            raise ConversionError(
                f"TFLite conversion with builtin ops only failed: {type(error).__name__} "
                f"{first_line(error)}"
            ) from None
    check_builtin_ops(content)
    return _finish(content, dtype, input_kind)


def operator_names(content: bytes) -> list[str]:
    """The distinct operators a TFLite flatbuffer uses: builtin names, else custom codes."""
    flatbuffer = _schema().Model.GetRootAsModel(content, 0)
    return sorted(
        {_operator_name(flatbuffer, index) for index in range(flatbuffer.OperatorCodesLength())}
    )


def check_builtin_ops(content: bytes) -> None:
    """Refuses a flatbuffer with custom ops (Flex/Select TF ops are custom ops there)."""
    custom = [name for name in operator_names(content) if name.startswith("custom:")]
    if custom:
        raise ConversionError(
            f"the TFLite model needs ops outside the builtin set: {', '.join(custom)}"
        )


def file_metadata(content: bytes) -> dict[str, str]:
    """The `volo_convert` metadata of a flatbuffer; empty for files written elsewhere."""
    document = _metadata(content, METADATA_NAME)
    return {} if document is None else json.loads(document)


def weight_dtype(content: bytes) -> str:
    """The file's TFLite dtype: from its metadata, else float16 if it stores such tensors."""
    recorded = file_metadata(content).get("tflite_dtype")
    if recorded is not None:
        if recorded not in TFLITE_DTYPES:
            raise ValueError(f"unknown TFLite dtype {recorded!r}")
        return recorded
    schema = _schema()
    flatbuffer = schema.Model.GetRootAsModel(content, 0)
    for subgraph_index in range(flatbuffer.SubgraphsLength()):
        subgraph = flatbuffer.Subgraphs(subgraph_index)
        for tensor_index in range(subgraph.TensorsLength()):
            if subgraph.Tensors(tensor_index).Type() == schema.TensorType.FLOAT16:
                return "float16"
    return "float32"


def interpreter_name() -> str:
    """The interpreter TFLite files are run in here: LiteRT where installed, else TF's."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return "TensorFlow's TFLite interpreter (tf.lite.Interpreter)"
    return f"LiteRT (ai-edge-litert {importlib.metadata.version('ai-edge-litert')})"


def _tflite_interpreter(content: bytes, num_threads: int | None) -> Any:
    """The LiteRT interpreter where installed, else TensorFlow's (deprecated but present)."""
    try:
        from ai_edge_litert import interpreter as litert

        interpreter_class = litert.Interpreter
    except ImportError:
        import tensorflow as tf

        interpreter_class = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        return interpreter_class(model_content=content, num_threads=num_threads)


def write_provenance(path: Path, document: str) -> None:
    """Adds `document` to the TFLite file at `path` as a metadata entry."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(path.read_bytes())
    _add_metadata(model, PROVENANCE_NAME, document)
    path.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_provenance(path: Path) -> str | None:
    """The document `write_provenance` stored, or None if the file holds none."""
    try:
        return _metadata(path.read_bytes(), PROVENANCE_NAME)
    except (OSError, IndexError, ValueError, AttributeError, struct.error) as error:
        raise ConversionError(f"{path}: not a readable TFLite file ({first_line(error)})") from None


def _tensor_contract(details: dict[str, Any], kind: str) -> InputContract:
    """The contract of an input tensor: its dtype and, if quantized, scale and zero point."""
    dtype = np.dtype(details["dtype"]).name
    scale, zero_point = details["quantization"]
    if dtype == "float32" or scale == 0:
        return InputContract(kind, dtype)
    return InputContract(kind, dtype, float(scale), int(zero_point))


class TFLiteRunner:
    """A TFLite file in the interpreter; batches run one image at a time (the file's B = 1).

    Inputs are given as float images or pixels (uint8 pixels too) and quantized here when
    the file takes integers; integer outputs are dequantized.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        content = Path(path).read_bytes()
        with known_lines_held_back(TFLITE_LINES):  # the XNNPACK delegate announces itself
            try:
                self._interpreter = _tflite_interpreter(content, num_threads)
            except Exception as error:  # whatever a damaged or foreign file makes it raise
                raise ConversionError(
                    f"{path}: not a loadable TFLite model ({first_line(error)})"
                ) from None
            (input_details,) = self._interpreter.get_input_details()
            (output_details,) = self._interpreter.get_output_details()
            if input_details["shape"][0] != 1:
                self._interpreter.resize_tensor_input(
                    input_details["index"], [1, *input_details["shape"][1:]]
                )
            self._interpreter.allocate_tensors()
        try:
            self.weight_dtype = weight_dtype(content)
            kind = file_metadata(content).get("input", DEFAULT_INPUT)
        except (ValueError, AttributeError) as error:  # JSON, UTF-8, a non-object document
            raise ConversionError(
                f"{path}: its {METADATA_NAME} metadata is damaged ({first_line(error)})"
            ) from None
        self._input_index = input_details["index"]
        self._output_index = output_details["index"]
        self._output_scale, self._output_zero_point = output_details["quantization"]
        self.input_contract = _tensor_contract(input_details, check_input_kind(kind, path))
        self.input_shape = (None, *(int(size) for size in input_details["shape"][1:]))
        self.output_shape = (None, *(int(size) for size in output_details["shape"][1:]))

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images (or pixels) -> B, K float32 logits."""
        logits = []
        for image in self.input_contract.encode(images):
            self._interpreter.set_tensor(self._input_index, image[None])
            self._interpreter.invoke()
            logits.append(self._interpreter.get_tensor(self._output_index)[0].copy())
        outputs = np.stack(logits)
        if self._output_scale:
            return (outputs.astype(np.float32) - self._output_zero_point) * self._output_scale
        return outputs
