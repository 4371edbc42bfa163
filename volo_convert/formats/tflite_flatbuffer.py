"""What a TFLite flatbuffer holds: its operators, its metadata entries, its weight dtype.

Read through TensorFlow's generated schema; metadata is added with the same object round
trip the converter uses for its own `CONVERSION_METADATA`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

from volo_convert.compat import builtin_code, tflite_schema
from volo_convert.errors import ConversionError
from volo_convert.options import TFLITE_DTYPES

METADATA_NAME = "volo_convert"


def schema() -> Any:
    """TensorFlow's generated TFLite flatbuffer schema."""
    return tflite_schema()


@functools.cache
def _builtin_names() -> dict[int, str]:
    """Builtin operator code -> its name (BATCH_MATMUL), read from the schema once."""
    builtin = schema().BuiltinOperator
    return {value: name for name, value in vars(builtin).items() if name.isupper()}


def operator_name(flatbuffer: Any, opcode_index: int) -> str:
    """The builtin name of an operator code (BATCH_MATMUL), or `custom:CODE` for a custom op."""
    opcode = flatbuffer.OperatorCodes(opcode_index)
    code = builtin_code(opcode)
    if code == schema().BuiltinOperator.CUSTOM:
        return f"custom:{opcode.CustomCode().decode()}"
    return _builtin_names()[code]


def operator_names(content: bytes) -> list[str]:
    """The distinct operators a TFLite flatbuffer uses: builtin names, else custom codes."""
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    return sorted(
        {operator_name(flatbuffer, index) for index in range(flatbuffer.OperatorCodesLength())}
    )


def check_builtin_ops(content: bytes) -> None:
    """Refuses a flatbuffer with custom ops (Flex/Select TF ops are custom ops there)."""
    custom = [name for name in operator_names(content) if name.startswith("custom:")]
    if custom:
        raise ConversionError(
            f"the TFLite model needs ops outside the builtin set: {', '.join(custom)}"
        )


def add_metadata(model: Any, name: str, document: str) -> None:
    """Appends a metadata entry `name` holding `document` to a TFLite model object.

    Operators, tensors and weights are carried over unchanged.
    """
    buffer = schema().BufferT()
    buffer.data = np.frombuffer(document.encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema().MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]


def metadata_document(content: bytes, name: str) -> str | None:
    """The document of the metadata entry `name` in a flatbuffer, or None if it has none."""
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    for index in range(flatbuffer.MetadataLength()):
        entry = flatbuffer.Metadata(index)
        if entry.Name().decode("utf-8") == name:
            return flatbuffer.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")
    return None


def file_metadata(content: bytes) -> dict[str, str]:
    """The `volo_convert` metadata of a flatbuffer; empty for files written elsewhere."""
    document = metadata_document(content, METADATA_NAME)
    return {} if document is None else json.loads(document)


def weight_dtype(content: bytes) -> str:
    """The file's TFLite dtype: from its metadata, else float16 if it stores such tensors."""
    recorded = file_metadata(content).get("tflite_dtype")
    if recorded is not None:
        if recorded not in TFLITE_DTYPES:
            raise ValueError(f"unknown TFLite dtype {recorded!r}")
        return recorded
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    float16 = schema().TensorType.FLOAT16
    for subgraph_index in range(flatbuffer.SubgraphsLength()):
        subgraph = flatbuffer.Subgraphs(subgraph_index)
        for tensor_index in range(subgraph.TensorsLength()):
            if subgraph.Tensors(tensor_index).Type() == float16:
                return "float16"
    return "float32"
