"""TFLite files: conversion with builtin ops only, the interpreter, provenance.

The files take a fixed batch, one image (B = 1) by default or N with `--tflite-batch`,
which lets the converter fold every shape computation into constants; a `dynamic` file
takes any batch (B = -1 in its signature; the reshapes use -1 for the batch, so the shapes
still fold, but for the class token's SHAPE and TILE) and is resized to the batch it is
given. float16 files store the weights in half precision and compute in float32 (the
interpreter dequantizes them when it loads the file). int8-dynamic files store int8
weights and quantize activations on the fly. int8 files are calibrated on representative
images and run every convolution and dense layer in integers (`tflite_quantization.py`).

Each file carries a `volo_convert` metadata entry naming its dtype, input kind and batch,
written with the model, and its provenance record, added once it is verified
(`tflite_flatbuffer.py` reads and writes both; it reads them without TensorFlow).
"""

from __future__ import annotations

import contextlib
import copy
import json
import mmap
import struct
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volo_convert.errors import ConversionError, first_line
from volo_convert.formats.contract import (
    InputContract,
    check_classifier_shapes,
    check_input_kind,
)
from volo_convert.formats.savedmodel import export_saved_model
from volo_convert.formats.tflite_delegates import DelegateReport, delegate_report
from volo_convert.formats.tflite_flatbuffer import (
    METADATA_NAME,
    add_metadata,
    check_builtin_ops,
    file_metadata,
    metadata_document,
    schema,
    weight_dtype,
)
from volo_convert.native_logs import TFLITE_LINES, known_lines_held_back
from volo_convert.options import (
    DEFAULT_INPUT,
    DEFAULT_TFLITE_BATCH,
    TFLITE_BATCH_DYNAMIC,
    TFLITE_DTYPES,
    TFLITE_IO,
    check_tflite_io,
    tflite_batch,
)
from volo_convert.provenance import PROVENANCE_NAME

if TYPE_CHECKING:
    import keras
    import numpy as np


def _converter(folder: str) -> Any:
    """A converter from the SavedModel in `folder`, allowed builtin ops only."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def _finish(content: bytes, dtype: str, input_kind: str, batch: int | str) -> bytes:
    """Adds the `volo_convert` metadata (dtype, input kind, batch); a uint8 pixel input is
    made to hold the pixels.

    The quantizer gives a uint8 input the scale of the calibrated range; setting it to 1
    and the zero point to 0 lets a camera's bytes go in as they are (the quantize op after
    the input rescales them to what the calibration found).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(content)
    subgraph = model.subgraphs[0]
    input_tensor = subgraph.tensors[subgraph.inputs[0]]
    if input_tensor.type == schema().TensorType.UINT8 and input_kind == "pixels":
        input_tensor.quantization.scale = [1.0]
        input_tensor.quantization.zeroPoint = [0]
    document = json.dumps({"tflite_dtype": dtype, "input": input_kind, "batch": batch})
    add_metadata(model, METADATA_NAME, document)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert_to_tflite(
    model: keras.Model,
    dtype: str = TFLITE_DTYPES[0],
    io: str = TFLITE_IO[0],
    calibration: np.ndarray | None = None,
    batch: int | str = DEFAULT_TFLITE_BATCH,
) -> bytes:
    """Converts a Keras VOLO to a TFLite flatbuffer that uses builtin ops only.

    Args:
        model: the Keras model (TensorFlow backend), taking B, S, S, 3 images or pixels.
        dtype: one of TFLITE_DTYPES.
        io: the input and output type of an int8 file: float32, or int8 (uint8 input
            for a model that takes pixels).
        calibration: for int8, B, S, S, 3 representative inputs of the model.
        batch: the batch dimension of the input signature: N, or `dynamic`.

    Returns:
        The flatbuffer, taking N, S, S, 3 inputs and returning N, K logits (-1 for N
        where dynamic).
    """
    import tensorflow as tf

    from volo_convert.architecture.keras_model import model_input
    from volo_convert.formats.tflite_quantization import full_integer, smoothed_layer_norms

    check_tflite_io(dtype, io, ValueError)  # the options were checked when built
    batch = tflite_batch(batch)
    if dtype == "int8" and calibration is None:
        raise ValueError("an int8 TFLite file needs calibration images")
    input_kind = model_input(model)
    smoothing = (
        smoothed_layer_norms(model, calibration) if dtype == "int8" else contextlib.nullcontext()
    )
    with tempfile.TemporaryDirectory(prefix="volo-tflite-") as folder:
        with smoothing:
            export_saved_model(model, Path(folder), batch_size=_fixed_batch(batch))
        converter = _converter(folder)
        if dtype != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8-dynamic: this alone
        if dtype == "float16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            with known_lines_held_back(TFLITE_LINES):
                if dtype == "int8":
                    content = full_integer(
                        converter, calibration, io, input_kind == "pixels", _fixed_batch(batch)
                    )
                else:
                    content = converter.convert()
        except Exception as error:
            raise ConversionError(
                f"TFLite conversion with builtin ops only failed: {type(error).__name__} "
                f"{first_line(error)}"
            ) from None
    check_builtin_ops(content)
    return _finish(content, dtype, input_kind, batch)


def _fixed_batch(batch: int | str) -> int | None:
    """The batch dimension as a signature spells it: N, or None for `dynamic`."""
    return None if batch == TFLITE_BATCH_DYNAMIC else int(batch)


def interpreter_name() -> str:
    """The interpreter TFLite files are run in here: LiteRT where installed, else TF's."""
    import importlib.metadata

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
    add_metadata(model, PROVENANCE_NAME, document)
    path.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_provenance(path: Path) -> str | None:
    """The document `write_provenance` stored, or None if the file holds none.

    The file is mapped, not read: only the pages the record's tables sit on are touched.
    """
    try:
        with (
            path.open("rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as content,
        ):
            return metadata_document(content, PROVENANCE_NAME)
    except (OSError, IndexError, ValueError, AttributeError, struct.error) as error:
        raise ConversionError(f"{path}: not a readable TFLite file ({first_line(error)})") from None


def _tensor_contract(details: dict[str, Any], kind: str) -> InputContract:
    """The contract of an input tensor: its dtype and, if quantized, scale and zero point."""
    import numpy as np

    dtype = np.dtype(details["dtype"]).name
    scale, zero_point = details["quantization"]
    if dtype == "float32" or scale == 0:
        return InputContract(kind, dtype)
    return InputContract(kind, dtype, float(scale), int(zero_point))


class TFLiteRunner:
    """A TFLite file in the interpreter, run in batches of the file's own size.

    A fixed-N file (`batch_size` N) runs N images per invocation: a batch given is cut
    into chunks of N, the last one padded with zero images whose logits are dropped. A
    `dynamic` file (`batch_size` None) is resized to the batch given, or to `run_batch`
    images per invocation where that is set (`at_batch`). Inputs are given as float images
    or pixels (uint8 pixels too) and quantized here when the file takes integers; integer
    outputs are dequantized.
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
            inputs = self._interpreter.get_input_details()
            outputs = self._interpreter.get_output_details()
            if len(inputs) != 1 or len(outputs) != 1:
                raise ConversionError(
                    f"{path}: expected one input and one output, found {len(inputs)} and "
                    f"{len(outputs)}"
                )
            (input_details,), (output_details,) = inputs, outputs
            self.input_shape = (None, *(int(size) for size in input_details["shape"][1:]))
            self.output_shape = (None, *(int(size) for size in output_details["shape"][1:]))
            check_classifier_shapes(self.input_shape, self.output_shape, path)
            signature_batch = int(input_details["shape_signature"][0])
            self.batch_size = None if signature_batch < 0 else int(input_details["shape"][0])
            self._allocated_batch = int(input_details["shape"][0])
            self._interpreter.allocate_tensors()
        try:
            self.weight_dtype = weight_dtype(content)
            kind = file_metadata(content).get("input", DEFAULT_INPUT)
        except (ValueError, AttributeError) as error:  # JSON, UTF-8, a non-object document
            raise ConversionError(
                f"{path}: its {METADATA_NAME} metadata is damaged ({first_line(error)})"
            ) from None
        self.run_batch: int | None = None
        self._content = content
        self._input_index = input_details["index"]
        self._output_index = output_details["index"]
        self._output_scale, self._output_zero_point = output_details["quantization"]
        self.input_contract = _tensor_contract(input_details, check_input_kind(kind, path))

    def delegate_report(self) -> DelegateReport:
        """Which delegates can run the file: the GPU delegate, XNNPACK (as loaded here)."""
        return delegate_report(self._content, self._interpreter)

    @property
    def tflite_batch(self) -> int | str:
        """The file's batch as `--tflite-batch` spells it: N, or `dynamic`."""
        return TFLITE_BATCH_DYNAMIC if self.batch_size is None else self.batch_size

    def at_batch(self, run_batch: int) -> TFLiteRunner:
        """This runner (the same interpreter), running `run_batch` images per invocation.

        Only a dynamic file takes a batch of another size than its own.
        """
        if self.batch_size is not None and run_batch != self.batch_size:
            raise ValueError(f"a file of batch {self.batch_size} cannot run at {run_batch}")
        runner = copy.copy(self)
        runner.run_batch = run_batch
        return runner

    def _invoke(self, chunk: np.ndarray) -> np.ndarray:
        """One invocation on B, S, S, 3 encoded inputs, B the allocated batch or a new one."""
        if len(chunk) != self._allocated_batch:  # a dynamic file, given another batch
            self._interpreter.resize_tensor_input(self._input_index, chunk.shape)
            self._interpreter.allocate_tensors()
            self._allocated_batch = len(chunk)
        self._interpreter.set_tensor(self._input_index, chunk)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output_index).copy()

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images (or pixels) -> B, K float32 logits."""
        import numpy as np

        encoded = self.input_contract.encode(images)
        size = self.batch_size or self.run_batch or len(encoded)
        logits = []
        for start in range(0, len(encoded), size):
            chunk = encoded[start : start + size]
            filled = len(chunk)
            if self.batch_size is not None and filled < size:
                padding = np.zeros((size - filled, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])  # N, S, S, 3
            logits.append(self._invoke(chunk)[:filled])
        outputs = np.concatenate(logits)
        if self._output_scale:
            return (outputs.astype(np.float32) - self._output_zero_point) * self._output_scale
        return outputs
