"""The path policies: what may be read, and how every output is written so nothing is lost.

Inputs (checkpoints, models, batch members) must be regular files, or folders where a
folder is expected: never a FIFO, device or socket, which could block for ever or be
something other than data.

Every output (model, report, batch file) goes through `check_output_path` before any work
and is written through `staged_output` + `move_into_place` (or `write_text`): it never
replaces anything without `overwrite`, never an input, never through a symbolic link,
never a non-regular file; it is written under a short temporary name beside its target
and moved into place only when complete, and the temporary is removed on every exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from volo_convert.errors import ConversionError, os_error_reason

TEMP_PREFIX = ".volo-"  # short and fixed, so any name the file system takes can be staged
PARTIAL_SUFFIX = ".partial"
SAVEDMODEL_MARKER = "saved_model.pb"
HASH_CHUNK_BYTES = 16 * 1024 * 1024
# Many tools read a path of `-` as standard input or output. volo-convert writes and reads
# files only (staged, hashed, moved into place), so `-` is refused wherever a path is taken.
STANDARD_STREAM = "-"
FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def check_not_a_stream(path: str | Path, direction: str) -> None:
    """Refuses `-`, which would read as standard input or output (`direction`)."""
    if str(path) == STANDARD_STREAM:
        raise ConversionError(
            f"-: volo-convert does not use standard {direction}; name a file or folder "
            "(an absolute path for one called -)"
        )


def _kind(mode: int) -> str:
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_input(
    path: str | Path, *, folder_ok: bool = False, what: str = "a checkpoint file"
) -> Path:
    """Refuses an input that is missing, unreadable, or not a regular file (or folder).

    Args:
        path: the input the user named.
        folder_ok: a folder is accepted too (a SavedModel).
        what: what was expected, for the message.
    """
    check_not_a_stream(path, "input")
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except OSError as error:
        raise ConversionError(f"{path}: cannot be read ({error.strerror})") from None
    if stat.S_ISDIR(mode):
        if folder_ok:
            return path
        raise ConversionError(f"{path}: is a folder, expected {what}")
    if not stat.S_ISREG(mode):
        raise ConversionError(f"{path}: is {_kind(mode)}, expected {what}; refusing to read it")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as error:
        raise ConversionError(f"{path}: cannot be read ({error.strerror})") from None
    return path


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(child)).is_relative_to(os.path.realpath(folder))
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output_path(
    path: str | Path,
    overwrite: bool,
    *,
    folder: bool = False,
    inputs: Iterable[str | Path] = (),
    others: Mapping[Path, str] | None = None,
) -> Path:
    """Refuses an output that could lose data or fail late; call it before any work.

    Args:
        path: where the output goes.
        overwrite: an existing output may be replaced (never an input).
        folder: the output is a SavedModel folder; an existing folder is replaced only if
            it holds a SavedModel, so a mistyped path can never wipe other files.
        inputs: the files the run reads; the output may be none of them, nor hold them.
        others: the run's other outputs, each with what it is ("the model output"); this
            one may be none of them, nor lie inside one (a SavedModel folder).
    """
    check_not_a_stream(path, "output")
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.name in ("", ".", ".."):
        raise ConversionError(f"{path or '(empty)'}: names no file or folder to write")
    if len(os.fsencode(path.name)) > _name_max(parent):
        raise ConversionError(
            f"{path}: the name is {len(os.fsencode(path.name))} bytes, more than the "
            f"{_name_max(parent)} this file system allows"
        )
    try:
        path.lstat()
    except FileNotFoundError:
        pass
    except OSError as error:  # a folder on the way that is too long, a loop, no access
        raise ConversionError(f"{path}: cannot be used as an output ({error.strerror})") from None
    if path.is_symlink():
        raise ConversionError(
            f"{path}: is a symbolic link (to {os.readlink(path)}); volo-convert writes only to "
            "real paths, so name the target itself"
        )
    for source in map(Path, inputs):
        if _same_file(path, source) or (path.is_dir() and _inside(source, path)):
            raise ConversionError(f"{path}: is the input {source}; refusing to replace it")
    for other, what in (others or {}).items():
        if os.path.realpath(path) == os.path.realpath(other):
            raise ConversionError(f"{path}: is also {what}; name another file")
        if _inside(path, other):
            raise ConversionError(f"{path}: lies inside {what} {other}; name a path outside it")
    if not parent.is_dir():
        raise ConversionError(f"{path}: the output folder {parent} does not exist")
    try:  # a real write: permission bits alone mislead for root, ACLs and read-only mounts
        handle, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=parent)
    except OSError as error:
        raise ConversionError(
            f"{path}: the output folder {parent} is not writable ({error.strerror})"
        ) from None
    os.close(handle)
    os.unlink(probe)
    if not path.exists():
        return path
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode) and not folder:
        raise ConversionError(f"{path}: is a folder, expected a file name to write")
    if not stat.S_ISDIR(mode) and folder:
        raise ConversionError(f"{path}: is a file, expected a folder name for the SavedModel")
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise ConversionError(f"{path}: is {_kind(mode)}, not a regular file; not replacing it")
    if not overwrite:
        raise ConversionError(f"{path}: already exists; pass --overwrite to replace it")
    if folder and any(path.iterdir()) and not (path / SAVEDMODEL_MARKER).is_file():
        raise ConversionError(f"{path}: is a folder that holds no SavedModel; not replacing it")
    return path


@contextlib.contextmanager
def staged_output(path: Path, folder: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path`; the caller moves it into place when done.

    The temporary file (or, with `folder`, folder) is removed however the block ends, so
    an interrupted or failed run leaves neither a partial output nor litter behind.
    `suffix` ends the temporary file's name (Keras picks the format from it).
    """
    umask = os.umask(0)
    os.umask(umask)
    parent = path.parent if str(path.parent) else Path(".")
    if folder:
        temp_path = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=PARTIAL_SUFFIX, dir=parent))
        temp_path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would survive the final rename
    else:
        handle, temp_name = tempfile.mkstemp(
            prefix=TEMP_PREFIX, suffix=PARTIAL_SUFFIX + suffix, dir=parent
        )
        os.close(handle)
        temp_path = Path(temp_name)
        temp_path.chmod(0o666 & ~umask)  # mkstemp's 0600 would survive the final rename
    try:
        yield temp_path
    finally:
        if temp_path.is_dir():
            shutil.rmtree(temp_path, ignore_errors=True)
        else:
            temp_path.unlink(missing_ok=True)


def move_into_place(temp_path: Path, path: Path) -> None:
    """Renames the finished `temp_path` to `path`, replacing a file or SavedModel folder there.

    A folder cannot be renamed over a non-empty one, so the old folder is first renamed
    aside (under a short temporary name) and removed once the new one is in place.
    """
    try:
        if not path.is_dir():
            os.replace(temp_path, path)
            return
        old_path = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=".old", dir=path.parent))
        os.replace(path, old_path)
        os.replace(temp_path, path)
        shutil.rmtree(old_path)
    except OSError as error:  # the folder vanished or filled up under us
        raise ConversionError(
            f"{path}: could not move the finished output into place ({os_error_reason(error)})"
        ) from None


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a staged file, so no reader sees half of it.

    The caller has checked `path` with `check_output_path` before doing any work.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConversionError(f"{path}: the folder {path.parent} does not exist")
    with staged_output(path) as temp_path:
        try:
            temp_path.write_text(text, encoding="utf-8")
        except OSError as error:
            raise ConversionError(f"{path}: could not write ({os_error_reason(error)})") from None
        move_into_place(temp_path, path)


def file_sha256(path: str | Path, on_chunk: Callable[[memoryview], None] | None = None) -> str:
    """Hex SHA-256 of a file's content, read once, HASH_CHUNK_BYTES at a time.

    `on_chunk` sees each chunk as it passes, for more checks in the same pass; the view
    holds until the next chunk is read.
    """
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(HASH_CHUNK_BYTES))
    with Path(path).open("rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(buffer[:count])
            if on_chunk is not None:
                on_chunk(buffer[:count])
    return digest.hexdigest()


def fingerprint(path: str | Path) -> dict[str, str]:
    """What was written at `path`: each file's relative name -> "size:sha256".

    A file gives one entry under its own name; a folder (a SavedModel) one per file. A
    missing path gives an empty mapping.
    """
    path = Path(path)
    if path.is_file():
        return {path.name: f"{path.stat().st_size}:{file_sha256(path)}"}
    if not path.is_dir():
        return {}
    return {
        str(child.relative_to(path)): f"{child.stat().st_size}:{file_sha256(child)}"
        for child in sorted(path.rglob("*"))
        if child.is_file()
    }
