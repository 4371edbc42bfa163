"""Keeping one copy of the weights in memory: dropping pages of a memory-mapped checkpoint.

`torch.load(mmap=True)` maps the checkpoint file privately; a tensor's pages become
resident (and count in RSS) once read. After a tensor is ported they are dropped with
`madvise(MADV_DONTNEED)`. For a private, never-written file mapping that is lossless:
a later read pages the same bytes back in from the file. Pages are dropped only inside
ranges that /proc/self/maps shows mapped from the checkpoint file, so anonymous memory
(which MADV_DONTNEED would zero) is never touched. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch

MADV_DONTNEED = 4  # Linux
PROC_MAPS = Path("/proc/self/maps")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges (start, end) of this process's mappings of `path`."""
    try:
        lines = PROC_MAPS.read_text().splitlines()
    except OSError:
        return []
    target = os.path.realpath(path)
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _madvise() -> Callable[..., int] | None:
    """libc's madvise, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


class MappedCheckpoint:
    """The memory-mapped pages of one checkpoint file, which tensors can hand back."""

    def __init__(self, path: str | Path) -> None:
        self.ranges = _mapped_ranges(Path(path))
        self.madvise = _madvise() if self.ranges else None

    def release(self, tensor: torch.Tensor) -> None:
        """Drops the resident pages that lie wholly inside `tensor`'s storage."""
        if self.madvise is None:
            return
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(low <= start and end <= high for low, high in self.ranges):
            return
        first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last_page > first_page:
            self.madvise(first_page, last_page - first_page, MADV_DONTNEED)
