"""Running a saved model in the runtime its format is deployed with.

Keras files run under the current Keras backend; SavedModel folders and TFLite files run
with TensorFlow's own loader and the TFLite interpreter, without this package's layers.
Every runner has `input_shape`, `output_shape` and `predict_on_batch`, like a Keras model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from volo_convert.errors import ConversionError
from volo_convert.saving import SAVEDMODEL, load_model, output_format
from volo_convert.tflite import weight_dtype

SERVING_SIGNATURE = "serving_default"


class Predictor(Protocol):
    """What verification needs of a model: its shapes and a batch forward pass."""

    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]

    def predict_on_batch(self, images: np.ndarray) -> Any: ...


class SavedModelRunner:
    """A SavedModel's serving signature, loaded with `tf.saved_model.load` alone."""

    def __init__(self, path: str | Path) -> None:
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(str(path))
            self._function = self._loaded.signatures[SERVING_SIGNATURE]
        except (OSError, KeyError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConversionError(f"{path}: not a loadable SavedModel ({reason})") from None
        inputs = self._function.structured_input_signature[1]
        outputs = self._function.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConversionError(f"{path}: expected one input and one output in its signature")
        (self._input_name, input_spec), (self._output_name, output_spec) = (
            next(iter(inputs.items())),
            next(iter(outputs.items())),
        )
        self.input_shape = tuple(input_spec.shape)  # None, S, S, 3
        self.output_shape = tuple(output_spec.shape)  # None, K

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images -> B, K logits."""
        import tensorflow as tf

        outputs = self._function(**{self._input_name: tf.constant(images)})
        return outputs[self._output_name].numpy()


def _tflite_interpreter(content: bytes, num_threads: int | None) -> Any:
    """The LiteRT interpreter where installed, else TensorFlow's (deprecated but present)."""
    try:
        from ai_edge_litert import interpreter as litert

        interpreter_class = litert.Interpreter
    except ImportError:
        import tensorflow as tf

        interpreter_class = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        return interpreter_class(model_content=content, num_threads=num_threads)


class TFLiteRunner:
    """A TFLite file in the interpreter; batches run one image at a time (the file's B = 1)."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        content = Path(path).read_bytes()
        try:
            self._interpreter = _tflite_interpreter(content, num_threads)
        except ValueError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConversionError(f"{path}: not a loadable TFLite model ({reason})") from None
        self.weight_dtype = weight_dtype(content)
        (input_details,) = self._interpreter.get_input_details()
        (output_details,) = self._interpreter.get_output_details()
        if input_details["shape"][0] != 1:
            self._interpreter.resize_tensor_input(
                input_details["index"], [1, *input_details["shape"][1:]]
            )
        self._interpreter.allocate_tensors()
        self._input_index = input_details["index"]
        self._output_index = output_details["index"]
        self.input_shape = (None, *(int(size) for size in input_details["shape"][1:]))
        self.output_shape = (None, *(int(size) for size in output_details["shape"][1:]))

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images -> B, K logits."""
        logits = []
        for image in images:
            self._interpreter.set_tensor(self._input_index, image[None].astype(np.float32))
            self._interpreter.invoke()
            logits.append(self._interpreter.get_tensor(self._output_index)[0].copy())
        return np.stack(logits)


def artifact_format(path: str | Path) -> str:
    """The format of an existing model file or folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ConversionError(f"{path}: a folder without saved_model.pb is not a SavedModel")
        return SAVEDMODEL
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    fmt = output_format(path)
    if fmt == SAVEDMODEL:
        raise ConversionError(f"{path}: a file without extension; a SavedModel is a folder")
    return fmt


def runtime_name(fmt: str) -> str:
    """Where a model of format `fmt` runs, as reports and the CLI name it."""
    if fmt == SAVEDMODEL:
        return "TensorFlow (tf.saved_model.load)"
    if fmt == "tflite":
        return "the TFLite interpreter"
    import keras

    return f"Keras ({keras.backend.backend()} backend)"


def load_artifact(path: str | Path, fmt: str | None = None) -> Predictor:
    """Loads a model file or folder for inference in its format's runtime.

    Args:
        path: a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file.
        fmt: its format; read from the path when not given.
    """
    fmt = fmt or artifact_format(path)
    if fmt == SAVEDMODEL:
        return SavedModelRunner(path)
    if fmt == "tflite":
        return TFLiteRunner(path)
    return load_model(path)
