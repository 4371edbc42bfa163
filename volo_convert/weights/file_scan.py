"""One pass over a checkpoint file: its SHA-256, and the CRC-32 of every zip record.

torch.load does not check a zip container's CRCs, so a damaged download would load
silently with wrong weights, and verification, built from the same tensors, could not
tell. The same pass tells whether torch can memory-map the file.
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

from zlib_ng.zlib_ng import crc32

from volo_convert.errors import ConversionError
from volo_convert.paths import file_sha256

LOCAL_HEADER_BYTES = 30  # a zip record's fixed local header, before its name and extra field
LOCAL_HEADER_NAME_LENGTH_OFFSET = 26
SCAN_CHUNK_BYTES = 16 * 1024 * 1024  # the most one inflate step returns


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


class _RecordCrcs:
    """Checks each zip record's stored CRC-32 as the file's chunks pass, in file order."""

    def __init__(self, path: Path, spans: list[_RecordSpan]) -> None:
        self.path = path
        self.spans = spans
        self.position, self.index, self.crc = 0, 0, 0
        self.inflater: Any = None

    def __call__(self, chunk: memoryview) -> None:
        """Carries the CRC of the records `chunk` holds; checks each record it ends."""
        position, end = self.position, self.position + len(chunk)
        while self.index < len(self.spans) and self.spans[self.index].start <= end:
            span = self.spans[self.index]
            if span.deflated and self.inflater is None:
                self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate
            low, high = max(span.start, position), min(span.end, end)
            if high > low:
                self.crc = _content_crc(
                    chunk[low - position : high - position], self.inflater, self.crc
                )
            if span.end > end:
                break
            if self.inflater is not None:
                self.crc = crc32(self.inflater.flush(), self.crc)
            if self.crc != span.record.CRC:
                raise ConversionError(
                    f"{self.path}: the checkpoint is corrupt: record {span.record.filename!r} "
                    "does not match the CRC-32 stored for it (a damaged or incomplete "
                    "download?)"
                )
            self.crc, self.index, self.inflater = 0, self.index + 1, None
        self.position = end

    def check_complete(self) -> None:
        """Raises EOFError naming the first record the file ended before."""
        if self.index < len(self.spans):
            raise EOFError(self.spans[self.index].record.filename)


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
    try:
        spans = _record_spans(path) if zip_container else []
        record_crcs = _RecordCrcs(path, spans)
        sha256 = file_sha256(path, on_chunk=record_crcs)
        record_crcs.check_complete()
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, zlib.error):
        raise ConversionError(f"{path}: the checkpoint is truncated or corrupt") from None
    mappable = zip_container and not any(span.deflated for span in spans)
    return FileScan(sha256, mappable)
