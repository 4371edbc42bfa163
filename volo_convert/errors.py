"""The error type a user can cause, and the helpers that keep every message one line."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")  # how HDF5 words the system error
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ConversionError(ValueError):
    """A problem with the user's input or environment, stated in words a user understands."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def os_error_reason(error: OSError) -> str:
    """The system's words for an OSError (`No space left on device`), else its first line."""
    if error.errno:
        return os.strerror(error.errno)
    if match := _ERRNO_IN_TEXT.search(str(error)):
        return os.strerror(int(match.group(1)))
    return first_line(error)


def one_line(message: str) -> str:
    """`message` with control characters escaped, so it prints as exactly one line.

    Names read from files (tensor names, paths) can hold newlines or terminal escapes.
    """
    escaped = _CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], message)
    # A file name that is not UTF-8 arrives with surrogate escapes, which cannot be printed.
    return escaped.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def about(path: str | Path) -> Iterator[None]:
    """Prefixes the message of a ConversionError raised inside the block with `path`."""
    try:
        yield
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None
