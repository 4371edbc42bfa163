"""TFLite files: conversion with builtin ops only, and what a converted file holds.

The files take a fixed batch of one image (B = 1), which lets the converter fold every
shape computation into constants. float16 files store the weights in half precision and
compute in float32 (the interpreter dequantizes them when it loads the file).
"""

from __future__ import annotations

import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from volo_convert.errors import ConversionError, first_line
from volo_convert.formats.savedmodel import export_saved_model
from volo_convert.native_logs import TFLITE_LINES, known_lines_held_back
from volo_convert.options import TFLITE_DTYPES, check_choice
from volo_convert.provenance import PROVENANCE_NAME

TFLITE_BATCH_SIZE = 1


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def convert_to_tflite(model: keras.Model, dtype: str = "float32") -> bytes:
    """Converts a Keras VOLO to a TFLite flatbuffer that uses builtin ops only.

    Args:
        model: the Keras model (TensorFlow backend), taking B, S, S, 3 images.
        dtype: `float32`, or `float16` for half-precision weights.

    Returns:
        The flatbuffer, taking 1, S, S, 3 images and returning 1, K logits.
    """
    import tensorflow as tf

    check_choice("TFLite dtype", dtype, TFLITE_DTYPES)
    with tempfile.TemporaryDirectory(prefix="volo-tflite-") as folder:
        export_saved_model(model, Path(folder), batch_size=TFLITE_BATCH_SIZE)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if dtype == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        try:
            with known_lines_held_back(TFLITE_LINES):
                content = converter.convert()
        except Exception as error:
            raise ConversionError(
                f"TFLite conversion with builtin ops only failed: {type(error).__name__} "
                f"{first_line(error)}"
            ) from None
    check_builtin_ops(content)
    return content


def operator_names(content: bytes) -> list[str]:
    """The distinct operators a TFLite flatbuffer uses: builtin names, else custom codes."""
    schema = _schema()
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code

    builtin_names = {
        code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()
    }
    flatbuffer = schema.Model.GetRootAsModel(content, 0)
    names = set()
    for index in range(flatbuffer.OperatorCodesLength()):
        opcode = flatbuffer.OperatorCodes(index)
        code = get_builtin_code_from_operator_code(opcode)
        if code == schema.BuiltinOperator.CUSTOM:
            names.add(f"custom:{opcode.CustomCode().decode()}")
        else:
            names.add(builtin_names[code])
    return sorted(names)


def check_builtin_ops(content: bytes) -> None:
    """Refuses a flatbuffer with custom ops (Flex/Select TF ops are custom ops there)."""
    custom = [name for name in operator_names(content) if name.startswith("custom:")]
    if custom:
        raise ConversionError(
            f"the TFLite model needs ops outside the builtin set: {', '.join(custom)}"
        )


def weight_dtype(content: bytes) -> str:
    """`float16` if a flatbuffer stores float16 tensors, else `float32`."""
    schema = _schema()
    flatbuffer = schema.Model.GetRootAsModel(content, 0)
    for subgraph_index in range(flatbuffer.SubgraphsLength()):
        subgraph = flatbuffer.Subgraphs(subgraph_index)
        for tensor_index in range(subgraph.TensorsLength()):
            if subgraph.Tensors(tensor_index).Type() == schema.TensorType.FLOAT16:
                return "float16"
    return "float32"


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
    """Adds `document` to the TFLite file at `path` as a metadata entry.

    The model is read into TFLite's object form and written back with one more buffer
    and metadata entry: the round trip the converter itself makes to add its own
    `CONVERSION_METADATA`, so operators, tensors and weights are carried over unchanged.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.convert_bytearray_to_object(path.read_bytes())
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(document.encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = PROVENANCE_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    path.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_provenance(path: Path) -> str | None:
    """The document `write_provenance` stored, or None if the file holds none."""
    schema = _schema()
    try:
        content = path.read_bytes()
        flatbuffer = schema.Model.GetRootAsModel(content, 0)
        for index in range(flatbuffer.MetadataLength()):
            entry = flatbuffer.Metadata(index)
            if entry.Name().decode("utf-8") == PROVENANCE_NAME:
                return flatbuffer.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")
    except (OSError, IndexError, ValueError, AttributeError, struct.error) as error:
        raise ConversionError(f"{path}: not a readable TFLite file ({first_line(error)})") from None
    return None


class TFLiteRunner:
    """A TFLite file in the interpreter; batches run one image at a time (the file's B = 1)."""

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
        self.weight_dtype = weight_dtype(content)
        self._input_index = input_details["index"]
        self._output_index = output_details["index"]
        self.input_shape = (None, *(int(size) for size in input_details["shape"][1:]))
        self.output_shape = (None, *(int(size) for size in output_details["shape"][1:]))

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images -> B, K logits."""
        logits = []
        for image in images:
            self._interpreter.set_tensor(self._input_index, image[None].astype(np.float32))
            self._interpreter.invoke()
            logits.append(self._interpreter.get_tensor(self._output_index)[0].copy())
        return np.stack(logits)
