"""Output formats, and writing them so that nothing partial ever sits at the output path."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import keras

from volo_convert.errors import ConversionError

SAVEDMODEL = "savedmodel"  # a folder: an output path without extension, or ending in "/"
FORMAT_SUFFIXES = {".h5": "h5", ".keras": "keras", ".tflite": "tflite"}
FORMATS = ("h5", "keras", SAVEDMODEL, "tflite")
TENSORFLOW_FORMATS = (SAVEDMODEL, "tflite")


def output_format(path: str | Path, requested: str | None = None) -> str:
    """The format to write: `requested`, else the one the path names.

    A path without extension, or ending in a slash, names a SavedModel folder.
    """
    if requested is not None:
        if requested not in FORMATS:
            raise ConversionError(
                f"unknown format {requested!r}, expected one of {', '.join(FORMATS)}"
            )
        return requested
    if str(path).endswith(("/", os.sep)) or not Path(path).suffix:
        return SAVEDMODEL
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown output extension {suffix!r}, expected one of "
            f"{', '.join(FORMAT_SUFFIXES)}, or none for a SavedModel folder"
        )
    return FORMAT_SUFFIXES[suffix]


def check_backend(fmt: str) -> None:
    """Refuses to write a TensorFlow format under another Keras backend."""
    backend = keras.backend.backend()
    if fmt in TENSORFLOW_FORMATS and backend != "tensorflow":
        raise ConversionError(
            f"{fmt} files are written with the TensorFlow backend, but KERAS_BACKEND is "
            f"{backend}; rerun with KERAS_BACKEND=tensorflow"
        )


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


def export_saved_model(model: keras.Model, path: Path, batch_size: int | None = None) -> None:
    """Writes a SavedModel whose `serving_default` signature maps `images` to `logits`.

    `model.export` would store every weight twice (keras-team/keras#23553), so the module
    saved here tracks the very TensorFlow variables that the traced forward pass captures.

    Args:
        model: the Keras model (TensorFlow backend).
        path: the folder to write.
        batch_size: a fixed batch size, or None for any.
    """
    import tensorflow as tf

    spec = tf.TensorSpec((batch_size, *model.input_shape[1:]), tf.float32, name="images")
    module = tf.Module()
    module.model_variables = [weight.value for weight in model.weights]  # the tf.Variables
    module.serve = tf.function(
        lambda images: {"logits": model(images, training=False)}, input_signature=[spec]
    )
    signatures = {"serving_default": module.serve.get_concrete_function()}
    tf.saved_model.save(module, str(path), signatures=signatures)


def save_model(model: keras.Model, path: Path, fmt: str, tflite_dtype: str = "float32") -> None:
    """Writes `model` to `path` in format `fmt` (`tflite_dtype` for TFLite files)."""
    check_backend(fmt)
    if fmt == SAVEDMODEL:
        export_saved_model(model, path)
    elif fmt == "tflite":
        from volo_convert.tflite import convert_to_tflite

        path.write_bytes(convert_to_tflite(model, tflite_dtype))
    elif fmt == "h5":
        # The user chose .h5 explicitly; Keras' "legacy format" advice is noise here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            model.save(path)
        finally:
            absl_logger.setLevel(level)
    else:
        model.save(path)


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
