"""Keras 3 files (`.h5`, `.keras`): run under any Keras backend once this package is imported."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from volo_convert.errors import ConversionError, first_line


def save(model: keras.Model, path: Path, fmt: str) -> None:
    """Writes `model` as a `.h5` or `.keras` file (`fmt`) at `path`."""
    if fmt != "h5":
        model.save(path)
        return
    # The user chose .h5 explicitly; Keras' "legacy format" advice is noise here.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        model.save(path)
    finally:
        absl_logger.setLevel(level)


def load(path: str | Path) -> keras.Model:
    """Loads a saved Keras VOLO (the custom layers are registered by `import volo_convert`)."""
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # whatever a damaged or foreign file makes Keras raise
        raise ConversionError(f"{path}: not a loadable Keras model ({first_line(error)})") from None
