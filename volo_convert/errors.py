"""The error type a user can cause, and the helpers that keep every message one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class ConversionError(ValueError):
    """A problem with the user's input or environment, stated in words a user understands."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def about(path: str | Path) -> Iterator[None]:
    """Prefixes the message of a ConversionError raised inside the block with `path`."""
    try:
        yield
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None
