"""Output formats behind one interface: which format a path names, writing, loading, runtime.

Keras files run under the current Keras backend; SavedModel folders and TFLite files run
with TensorFlow's own loader and the TFLite interpreter, without this package's layers.
Every loaded model has `input_shape`, `output_shape` and `predict_on_batch`, like a Keras
model; `weight_dtype`, `compute_dtype`, `precision` and `input_contract` read what a loaded
file holds, computes in and takes. Every
format also stores a provenance record (`provenance.py`) its own native way, which
`write_provenance` and `read_provenance` reach. This module and those it imports take Keras,
TensorFlow, numpy and h5py in the functions that use them, never at module level, so
`inspect` reads a record with the standard library alone (h5py for a `.h5` file);
`keras_h5` and `tflite_quantization` are imported only by the functions that write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from volo_convert.errors import ConversionError
from volo_convert.formats import keras_file, savedmodel, tflite
from volo_convert.formats.contract import InputContract
from volo_convert.options import (
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_TFLITE_BATCH,
    FORMATS,
    SAVEDMODEL,
    TFLITE_DTYPES,
    TFLITE_IO,
    check_choice,
    file_precision,
)
from volo_convert.paths import SAVEDMODEL_MARKER, check_input
from volo_convert.provenance import Provenance

if TYPE_CHECKING:
    import keras
    import numpy as np

FORMAT_SUFFIXES = {".h5": "h5", ".keras": "keras", ".tflite": "tflite"}
STAGING_SUFFIXES = {fmt: suffix for suffix, fmt in FORMAT_SUFFIXES.items()}  # Keras needs it
TENSORFLOW_FORMATS = (SAVEDMODEL, "tflite")
# Written value by value from the checkpoint (`save_model`'s `weights`), so the model
# given is a skeleton: no weight is held in Keras or assigned.
SKELETON_FORMATS = ("h5",)


class Predictor(Protocol):
    """What verification needs of a model: its shapes and a batch forward pass."""

    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]

    def predict_on_batch(self, images: np.ndarray) -> Any: ...


def output_format(path: str | Path, requested: str | None = None) -> str:
    """The format to write: `requested`, else the one the path names.

    A path without extension, or ending in a slash, names a SavedModel folder. A
    requested format must agree with a format extension the path has.
    """
    suffix = Path(path).suffix.lower()
    if requested is not None:
        check_choice("format", requested, FORMATS, ValueError)
        named = FORMAT_SUFFIXES.get(suffix)
        if named is not None and named != requested:
            raise ConversionError(
                f"{path}: --format {requested} does not match the extension {suffix}, which "
                f"names a {named} file"
            )
        return requested
    if str(path).endswith(("/", os.sep)) or not suffix:
        return SAVEDMODEL
    if suffix not in FORMAT_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown output extension {suffix!r}, expected one of "
            f"{', '.join(FORMAT_SUFFIXES)}, or none for a SavedModel folder"
        )
    return FORMAT_SUFFIXES[suffix]


def artifact_format(path: str | Path) -> str:
    """The format of an existing model file or folder (checked by the input policy)."""
    path = check_input(path, folder_ok=True, what="a model file or SavedModel folder")
    if path.is_dir():
        if not (path / SAVEDMODEL_MARKER).is_file():
            raise ConversionError(f"{path}: a folder without saved_model.pb is not a SavedModel")
        return SAVEDMODEL
    suffix = path.suffix.lower()
    if suffix not in FORMAT_SUFFIXES:
        raise ConversionError(
            f"{path}: not a model file: expected a {', '.join(FORMAT_SUFFIXES)} file or a "
            "SavedModel folder"
        )
    return FORMAT_SUFFIXES[suffix]


def check_backend(fmt: str) -> None:
    """Refuses to write a TensorFlow format under another Keras backend."""
    import keras

    backend = keras.backend.backend()
    if fmt in TENSORFLOW_FORMATS and backend != "tensorflow":
        raise ConversionError(
            f"{fmt} files are written with the TensorFlow backend, but KERAS_BACKEND is "
            f"{backend}; rerun with KERAS_BACKEND=tensorflow"
        )


def save_model(
    model: keras.Model,
    path: Path,
    fmt: str,
    tflite_dtype: str = TFLITE_DTYPES[0],
    tflite_io: str = TFLITE_IO[0],
    calibration: np.ndarray | None = None,
    weights: Iterable[tuple[str, np.ndarray]] | None = None,
    tflite_batch: int | str = DEFAULT_TFLITE_BATCH,
) -> None:
    """Writes `model` to `path` in format `fmt`.

    A TFLite file is written in `tflite_dtype` with `tflite_io` input and a batch
    dimension of `tflite_batch`, int8 ones calibrated on `calibration` (B, S, S, 3 inputs
    of the model). For SKELETON_FORMATS, `weights`
    (variable path, value) gives the values and `model` may be a skeleton; other formats
    take them from `model`. The caller has checked the backend (`check_backend`) before
    doing any work.
    """
    if weights is not None and fmt not in SKELETON_FORMATS:
        raise ValueError(f"{fmt} files are written from a model that holds its weights")
    if fmt == SAVEDMODEL:
        savedmodel.export_saved_model(model, path)
    elif fmt == "tflite":
        path.write_bytes(
            tflite.convert_to_tflite(model, tflite_dtype, tflite_io, calibration, tflite_batch)
        )
    else:
        keras_file.save(model, path, fmt, weights)


def load_artifact(path: str | Path, fmt: str | None = None) -> Predictor:
    """Loads a model file or folder for inference in its format's runtime.

    Args:
        path: a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file.
        fmt: its format; read from the path when not given.
    """
    fmt = fmt or artifact_format(path)
    if fmt == SAVEDMODEL:
        return savedmodel.SavedModelRunner(path)
    if fmt == "tflite":
        return tflite.TFLiteRunner(path)
    return keras_file.load(path)


def verification_runs(model: Predictor, images: int) -> list[tuple[int | None, Predictor]]:
    """How a loaded model is verified on `images` images: (batch, the model run at it).

    A TFLite file runs at its own batch N (a fixed-N file takes exactly N images per
    invocation, padded when fewer are given); a `dynamic` one at batch 1 and at all the
    images at once. Other formats run as they are, their batch recorded as None.
    """
    if not isinstance(model, tflite.TFLiteRunner):
        return [(None, model)]
    if model.batch_size is not None:
        return [(model.batch_size, model)]
    return [(1, model.at_batch(1)), (images, model.at_batch(images))]


def tflite_batch(model: Predictor) -> int | str | None:
    """A loaded TFLite file's batch (N, or `dynamic`); None for other formats."""
    return model.tflite_batch if isinstance(model, tflite.TFLiteRunner) else None


def write_provenance(path: Path, fmt: str, provenance: Provenance) -> None:
    """Stores `provenance` in the model file or folder at `path`, of format `fmt`."""
    document = provenance.to_json()
    if fmt == SAVEDMODEL:
        savedmodel.write_provenance(path, document)
    elif fmt == "tflite":
        tflite.write_provenance(path, document)
    else:
        keras_file.write_provenance(path, fmt, document)


def read_provenance(path: str | Path) -> Provenance | None:
    """The provenance a model file or folder records, or None if it holds none.

    Reads the record alone: the model is not loaded, and torch is not imported.
    """
    path = Path(path)
    fmt = artifact_format(path)
    if fmt == SAVEDMODEL:
        document = savedmodel.read_provenance(path)
    elif fmt == "tflite":
        document = tflite.read_provenance(path)
    else:
        document = keras_file.read_provenance(path, fmt)
    return None if document is None else Provenance.from_json(document, path)


def weight_dtype(model: Predictor) -> str:
    """A loaded model's precision: a TFLite file's dtype (TFLITE_DTYPES), else float32."""
    return getattr(model, "weight_dtype", "float32")


def compute_dtype(model: Predictor) -> str:
    """What a loaded model computes in (COMPUTE_DTYPES): read from a Keras model's layers
    or a SavedModel's metadata; float32 for a TFLite file."""
    import keras

    from volo_convert.architecture.keras_model import model_compute_dtype

    if isinstance(model, keras.Model):
        return model_compute_dtype(model)
    return getattr(model, "compute_dtype", DEFAULT_COMPUTE_DTYPE)


def precision(model: Predictor) -> str:
    """What a loaded model's numerics are judged as (`options.file_precision`)."""
    return file_precision(weight_dtype(model), compute_dtype(model))


def input_contract(model: Predictor) -> InputContract:
    """What a loaded model takes: read from the file, or from a Keras model's layers."""
    import keras

    from volo_convert.architecture.keras_model import model_input

    if isinstance(model, keras.Model):
        return InputContract(model_input(model))
    return model.input_contract


def runtime_name(fmt: str) -> str:
    """Where a model of format `fmt` runs, as reports and the CLI name it."""
    if fmt == SAVEDMODEL:
        return "TensorFlow (tf.saved_model.load)"
    if fmt == "tflite":
        return tflite.interpreter_name()
    import keras

    return f"Keras ({keras.backend.backend()} backend)"
