"""What a TFLite flatbuffer holds: its operators, its metadata entries, its weight dtype.

Read through TensorFlow's generated schema; metadata is added with the same object round
trip the converter uses for its own `CONVERSION_METADATA`. Metadata is read without
TensorFlow (`_Table` walks the few tables it needs), so `inspect` need not import it.
"""

from __future__ import annotations

import functools
import json
import mmap
import struct
from typing import Any

from volo_convert.compat import builtin_code, tflite_schema
from volo_convert.errors import ConversionError
from volo_convert.options import TFLITE_DTYPES

METADATA_NAME = "volo_convert"
FILE_IDENTIFIER = b"TFL3"  # bytes 4-7 of every TFLite flatbuffer
# Field numbers in TensorFlow's schema.fbs: Model.buffers and .metadata, Metadata.name and
# .buffer, Buffer.data and .offset and .size (data stored after the flatbuffer, files > 2 GB).
MODEL_BUFFERS, MODEL_METADATA = 4, 6
METADATA_NAME_FIELD, METADATA_BUFFER = 0, 1
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2


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
    import numpy as np

    buffer = schema().BufferT()
    buffer.data = np.frombuffer(document.encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema().MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]


class _Table:
    """A flatbuffer table at `position` of `content`: its fields by number, read as the
    format lays them out (a vtable of field offsets; vectors and strings by uoffset).

    Raises ValueError where an offset leads outside `content`.
    """

    def __init__(self, content: bytes | mmap.mmap, position: int) -> None:
        self.content, self.position = content, position
        self.vtable = position - self._unpack("<i", position)

    def _unpack(self, layout: str, position: int) -> Any:
        """The value of `layout` (as for struct) at `position`, checked to lie in the file."""
        if not 0 <= position <= len(self.content) - struct.calcsize(layout):
            raise ValueError(f"offset {position} outside the {len(self.content)}-byte file")
        return struct.unpack_from(layout, self.content, position)[0]

    def _field(self, number: int) -> int | None:
        """Where field `number` is stored, or None when the table leaves it out."""
        entry = 4 + 2 * number
        if entry >= self._unpack("<H", self.vtable):
            return None
        offset = self._unpack("<H", self.vtable + entry)
        return None if offset == 0 else self.position + offset

    def _target(self, position: int) -> int:
        """Where the uoffset at `position` points."""
        return position + self._unpack("<I", position)

    def scalar(self, number: int, layout: str) -> int:
        """A scalar field (`layout` as for struct); 0, the schema's default, when left out."""
        field = self._field(number)
        return 0 if field is None else self._unpack(layout, field)

    def byte_vector(self, number: int) -> bytes | None:
        """A string or byte vector field."""
        field = self._field(number)
        if field is None:
            return None
        start = self._target(field)
        length = self._unpack("<I", start)
        if start + 4 + length > len(self.content):
            raise ValueError(f"a {length}-byte vector at {start} runs past the end of the file")
        return self.content[start + 4 : start + 4 + length]

    def tables(self, number: int) -> list[_Table]:
        """A vector-of-tables field."""
        field = self._field(number)
        if field is None:
            return []
        start = self._target(field)
        count = self._unpack("<I", start)
        if start + 4 + 4 * count > len(self.content):
            raise ValueError(f"a {count}-table vector at {start} runs past the end of the file")
        elements = [start + 4 + 4 * index for index in range(count)]
        return [_Table(self.content, self._target(element)) for element in elements]


def metadata_document(content: bytes | mmap.mmap, name: str) -> str | None:
    """The document of the metadata entry `name` in a flatbuffer, or None if it has none.

    Raises ValueError when `content` is no TFLite flatbuffer, or a damaged one.
    """
    if content[4:8] != FILE_IDENTIFIER:
        raise ValueError(f"no {FILE_IDENTIFIER.decode()} identifier")
    model = _Table(content, struct.unpack_from("<I", content)[0])
    for entry in model.tables(MODEL_METADATA):
        if entry.byte_vector(METADATA_NAME_FIELD) == name.encode("utf-8"):
            buffers, index = model.tables(MODEL_BUFFERS), entry.scalar(METADATA_BUFFER, "<I")
            if index >= len(buffers):
                raise ValueError(f"metadata {name} names buffer {index} of {len(buffers)}")
            buffer = buffers[index]
            offset, size = buffer.scalar(BUFFER_OFFSET, "<Q"), buffer.scalar(BUFFER_SIZE, "<Q")
            if offset > 1:  # stored after the flatbuffer
                if offset + size > len(content):
                    raise ValueError(f"metadata {name} runs past the end of the file")
                return content[offset : offset + size].decode("utf-8")
            return (buffer.byte_vector(BUFFER_DATA) or b"").decode("utf-8")
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
