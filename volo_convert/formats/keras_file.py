"""Keras 3 files (`.h5`, `.keras`): run under any Keras backend once this package is imported.

Their provenance record is read with h5py or zipfile alone: Keras (and h5py) are imported
by the functions that use them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from volo_convert.errors import ConversionError, first_line
from volo_convert.provenance import PROVENANCE_NAME

if TYPE_CHECKING:
    import keras
    import numpy as np

PROVENANCE_ENTRY = f"{PROVENANCE_NAME}.json"  # beside config.json in a .keras zip


def save(
    model: keras.Model,
    path: Path,
    fmt: str,
    weights: Iterable[tuple[str, np.ndarray]] | None = None,
) -> None:
    """Writes `model` as a `.h5` or `.keras` file (`fmt`) at `path`.

    A `.h5` file is written by `keras_h5`, with `weights` (variable path, value) as the
    values when given, so `model` may then be a skeleton.
    """
    from volo_convert.formats.keras_h5 import model_values, write_h5

    if fmt == "h5":
        write_h5(model, model_values(model) if weights is None else weights, path)
        return
    model.save(path)


def load(path: str | Path) -> keras.Model:
    """Loads a saved Keras VOLO (the custom layers are registered by `import volo_convert`)."""
    import keras

    if Path(path).suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        # Keras would say "File not found" of a file that is there
        raise ConversionError(
            f"{path}: not a loadable Keras model (a .keras file is a zip "
            "archive, and this one is not)"
        )
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # whatever a damaged or foreign file makes Keras raise
        raise ConversionError(f"{path}: not a loadable Keras model ({first_line(error)})") from None


def write_provenance(path: Path, fmt: str, document: str) -> None:
    """Stores `document` in a `.h5` file as a root attribute, in a `.keras` zip as an entry.

    Keras reads neither, so the file loads as before.
    """
    if fmt == "h5":
        import h5py

        with h5py.File(path, "r+") as file:
            file.attrs[PROVENANCE_NAME] = document
    else:
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(PROVENANCE_ENTRY, document)


def read_provenance(path: Path, fmt: str) -> str | None:
    """The document `write_provenance` stored, or None if the file holds none."""
    try:
        if fmt == "h5":
            import h5py

            with h5py.File(path, "r") as file:
                document = file.attrs.get(PROVENANCE_NAME)
                return None if document is None else str(document)
        with zipfile.ZipFile(path) as archive:
            if PROVENANCE_ENTRY not in archive.namelist():
                return None
            return archive.read(PROVENANCE_ENTRY).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a readable {fmt} file ({first_line(error)})") from None
