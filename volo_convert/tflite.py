"""TFLite files: conversion with builtin ops only, and what a converted file holds.

The files take a fixed batch of one image (B = 1), which lets the converter fold every
shape computation into constants. float16 files store the weights in half precision and
compute in float32 (the interpreter dequantizes them when it loads the file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import keras

from volo_convert.errors import ConversionError
from volo_convert.saving import export_saved_model

TFLITE_DTYPES = ("float32", "float16")
TFLITE_BATCH_SIZE = 1
# float16 weights carry 11 significant bits: they moved the logits of d1 and d2 by up to
# 1.5e-2 (README, float16 tolerance), so such files get about three times that by default.
FLOAT16_ATOL = 5e-2


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def check_tflite_dtype(dtype: str) -> None:
    """Raises a ConversionError unless `dtype` is one of TFLITE_DTYPES."""
    if dtype not in TFLITE_DTYPES:
        raise ConversionError(
            f"unknown TFLite dtype {dtype!r}, expected one of {', '.join(TFLITE_DTYPES)}"
        )


def convert_to_tflite(model: keras.Model, dtype: str = "float32") -> bytes:
    """Converts a Keras VOLO to a TFLite flatbuffer that uses builtin ops only.

    Args:
        model: the Keras model (TensorFlow backend), taking B, S, S, 3 images.
        dtype: `float32`, or `float16` for half-precision weights.

    Returns:
        The flatbuffer, taking 1, S, S, 3 images and returning 1, K logits.
    """
    import tensorflow as tf

    check_tflite_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="volo-tflite-") as folder:
        export_saved_model(model, Path(folder), batch_size=TFLITE_BATCH_SIZE)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if dtype == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        try:
            content = converter.convert()
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConversionError(
                f"TFLite conversion with builtin ops only failed: {type(error).__name__} {reason}"
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
