"""Keras 3 files (`.h5`, `.keras`): run under any Keras backend once this package is imported."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import h5py
import keras

from volo_convert.errors import ConversionError, first_line
from volo_convert.provenance import PROVENANCE_NAME

PROVENANCE_ENTRY = f"{PROVENANCE_NAME}.json"  # beside config.json in a .keras zip


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


def write_provenance(path: Path, fmt: str, document: str) -> None:
    """Stores `document` in a `.h5` file as a root attribute, in a `.keras` zip as an entry.

    Keras reads neither, so the file loads as before.
    """
    if fmt == "h5":
        with h5py.File(path, "r+") as file:
            file.attrs[PROVENANCE_NAME] = document
    else:
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(PROVENANCE_ENTRY, document)


def read_provenance(path: Path, fmt: str) -> str | None:
    """The document `write_provenance` stored, or None if the file holds none."""
    try:
        if fmt == "h5":
            with h5py.File(path, "r") as file:
                document = file.attrs.get(PROVENANCE_NAME)
                return None if document is None else str(document)
        with zipfile.ZipFile(path) as archive:
            if PROVENANCE_ENTRY not in archive.namelist():
                return None
            return archive.read(PROVENANCE_ENTRY).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a readable {fmt} file ({first_line(error)})") from None
