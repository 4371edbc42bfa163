"""Output formats, and writing them so that nothing partial ever sits at the output path."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import keras

from volo_convert.errors import ConversionError

FORMAT_SUFFIXES = {".h5": "h5", ".keras": "keras"}
FORMATS = tuple(FORMAT_SUFFIXES.values())


def output_format(path: str | Path, requested: str | None = None) -> str:
    """The format to write: `requested`, else the one the file extension names."""
    path = Path(path)
    if requested is not None:
        if requested not in FORMATS:
            raise ConversionError(
                f"unknown format {requested!r}, expected one of {', '.join(FORMATS)}"
            )
        return requested
    suffix = path.suffix.lower()
    if suffix not in FORMAT_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown output extension {suffix or '(none)'!r}, expected one of "
            f"{', '.join(FORMAT_SUFFIXES)}"
        )
    return FORMAT_SUFFIXES[suffix]


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuses an output that exists (unless `overwrite`) or whose folder is unusable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConversionError(f"{path}: the output folder {folder} does not exist")
    try:  # a real write: permission bits alone mislead for root, ACLs and read-only mounts
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as error:
        raise ConversionError(
            f"{path}: the output folder {folder} is not writable ({error.strerror})"
        ) from None
    os.close(handle)
    os.unlink(probe)
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder, expected a file name to write")
    if path.exists() and not overwrite:
        raise ConversionError(f"{path}: already exists; pass --overwrite to replace it")
    return path


def save_model(model: keras.Model, path: Path, fmt: str) -> None:
    """Writes `model` to `path` in format `fmt`."""
    # The user chose .h5 explicitly; Keras' "legacy format" advice is noise here.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        model.save(path)
    finally:
        absl_logger.setLevel(level)


def load_model(path: str | Path) -> keras.Model:
    """Loads a saved Keras VOLO (custom layers are registered by importing this package)."""
    import volo_convert.keras_layers  # noqa: F401  (registers the custom layers)

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{path}: not a loadable Keras model ({reason})") from None


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; the caller moves it into place when done.

    The temporary file is removed however the block ends, so an interrupted or failed
    run leaves neither a partial output nor litter behind.
    """
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(handle)
    temp_path = Path(temp_name)
    umask = os.umask(0)
    os.umask(umask)
    temp_path.chmod(0o666 & ~umask)  # mkstemp's 0600 would survive the final rename
    try:
        yield temp_path
    finally:
        if temp_path.exists():
            temp_path.unlink()
