"""The output policy: where a file may be written, and writing it so nothing partial is left."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from volo_convert.errors import ConversionError


def check_output_path(path: str | Path, overwrite: bool, folder: bool = False) -> Path:
    """Refuses an output that exists (unless `overwrite`) or whose folder is unusable.

    `folder` says the output is a SavedModel folder; an existing folder is replaced only
    if it holds a SavedModel, so a mistyped path can never wipe other files.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConversionError(f"{path}: the output folder {parent} does not exist")
    try:  # a real write: permission bits alone mislead for root, ACLs and read-only mounts
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as error:
        raise ConversionError(
            f"{path}: the output folder {parent} is not writable ({error.strerror})"
        ) from None
    os.close(handle)
    os.unlink(probe)
    if path.is_dir() and not folder:
        raise ConversionError(f"{path}: is a folder, expected a file name to write")
    if path.exists() and not path.is_dir() and folder:
        raise ConversionError(f"{path}: is a file, expected a folder name for the SavedModel")
    if path.exists() and not overwrite:
        raise ConversionError(f"{path}: already exists; pass --overwrite to replace it")
    if path.is_dir() and any(path.iterdir()) and not (path / "saved_model.pb").is_file():
        raise ConversionError(f"{path}: is a folder that holds no SavedModel; not replacing it")
    return path


@contextlib.contextmanager
def staged_output(path: Path, folder: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; the caller moves it into place when done.

    The temporary file (or, with `folder`, folder) is removed however the block ends, so
    an interrupted or failed run leaves neither a partial output nor litter behind.
    """
    umask = os.umask(0)
    os.umask(umask)
    if folder:
        temp_path = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        )
        temp_path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would survive the final rename
    else:
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent
        )
        os.close(handle)
        temp_path = Path(temp_name)
        temp_path.chmod(0o666 & ~umask)  # mkstemp's 0600 would survive the final rename
    try:
        yield temp_path
    finally:
        if temp_path.is_dir():
            shutil.rmtree(temp_path)
        elif temp_path.exists():
            temp_path.unlink()


def move_into_place(temp_path: Path, path: Path) -> None:
    """Renames the finished `temp_path` to `path`, replacing a file or SavedModel folder there.

    A folder cannot be renamed over a non-empty one, so the old folder is first renamed
    aside and removed once the new one is in place.
    """
    if not path.is_dir():
        os.replace(temp_path, path)
        return
    old_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(path, old_path)
    os.replace(temp_path, path)
    shutil.rmtree(old_path)


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file, so no reader sees half of it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConversionError(f"{path}: the report folder {path.parent} does not exist")
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
