"""One pass over a checkpoint file: its SHA-256, and the CRC-32 of every zip record.

torch.load does not check a zip container's CRCs, so a damaged download would load
silently with wrong weights, and verification, built from the same tensors, could not
tell. The same pass tells whether torch can memory-map the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

from zlib_ng.zlib_ng import crc32

from volo_convert.errors import ConversionError

LOCAL_HEADER_BYTES = 30  # a zip record's fixed local header, before its name and extra field
LOCAL_HEADER_NAME_LENGTH_OFFSET = 26
SCAN_CHUNK_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _RecordSpan:
    """Where a zip record's bytes lie in the file, [start, end), and whether they are
    deflated (torch.save stores them as they are; another zip tool may deflate them)."""

    record: zipfile.ZipInfo
    start: int
    end: int

    @property
    def deflated(self) -> bool:
        return self.record.compress_type == zipfile.ZIP_DEFLATED


def _record_spans(path: Path) -> list[_RecordSpan]:
    """The data span of every record of a zip container, in file order.

    Records are stored or deflated, the two methods torch's zip reader takes; any other
    is refused here, by name.
    """
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
    spans = []
    with path.open("rb") as stream:
        for record in records:
            if record.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ConversionError(
                    f"{path}: record {record.filename!r} is compressed with zip method "
                    f"{record.compress_type}, which torch cannot read; torch.save stores its "
                    "records uncompressed"
                )
            stream.seek(record.header_offset + LOCAL_HEADER_NAME_LENGTH_OFFSET)
            name_length, extra_length = struct.unpack("<HH", stream.read(4))
            start = record.header_offset + LOCAL_HEADER_BYTES + name_length + extra_length
            spans.append(_RecordSpan(record, start, start + record.compress_size))
    return sorted(spans, key=lambda span: span.start)


def _content_crc(data: memoryview, inflater: Any, crc: int) -> int:
    """`crc` carried over a record's next bytes: as they are, or as `inflater` inflates
    them, SCAN_CHUNK_BYTES at a time (a record that inflates a thousandfold stays bounded)."""
    if inflater is None:
        return crc32(data, crc)
    pending: bytes | memoryview = data
    while pending:
        crc = crc32(inflater.decompress(pending, SCAN_CHUNK_BYTES), crc)
        pending = inflater.unconsumed_tail
    return crc


class FileScan(NamedTuple):
    """What one pass over a checkpoint file found."""

    sha256: str
    mappable: bool  # torch.load(mmap=True) can map it: a zip whose records are all stored


def scan_file(path: Path, zip_container: bool) -> FileScan:
    """Reads the file once: returns its SHA-256 and, for a zip container, checks the
    CRC-32 stored for every record on the way (of its inflated content, if deflated).

    The pass also brings the file into the page cache that torch.load then maps; zlib-ng's
    CRC-32 runs at about ten times zlib's speed.
    """
    digest = hashlib.sha256()
    try:
        spans = _record_spans(path) if zip_container else []
        buffer = memoryview(bytearray(SCAN_CHUNK_BYTES))
        position, index, crc, inflater = 0, 0, 0, None
        with path.open("rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                chunk, end = buffer[:count], position + count
                digest.update(chunk)
                while index < len(spans) and spans[index].start <= end:
                    span = spans[index]
                    if span.deflated and inflater is None:
                        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate
                    low, high = max(span.start, position), min(span.end, end)
                    if high > low:
                        crc = _content_crc(chunk[low - position : high - position], inflater, crc)
                    if span.end > end:
                        break
                    if inflater is not None:
                        crc = crc32(inflater.flush(), crc)
                    if crc != span.record.CRC:
                        raise ConversionError(
                            f"{path}: the checkpoint is corrupt: record {span.record.filename!r} "
                            "does not match the CRC-32 stored for it (a damaged or incomplete "
                            "download?)"
                        )
                    crc, index, inflater = 0, index + 1, None
                position = end
        if index < len(spans):
            raise EOFError(spans[index].record.filename)
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, zlib.error):
        raise ConversionError(f"{path}: the checkpoint is truncated or corrupt") from None
    mappable = zip_container and not any(span.deflated for span in spans)
    return FileScan(digest.hexdigest(), mappable)
