"""volo-convert: PyTorch VOLO checkpoints to Keras 3 models with the same logits, proven.

Importing the package registers its custom Keras layers, so `keras.models.load_model`
reads a converted `.h5` or `.keras` file right after `import volo_convert`. It imports
Keras, never torch; TensorFlow's start-up lines are held back (see `native_logs`).

`volo_convert.convert(...)` and `volo_convert.verify(...)` are the Python API (see `api`);
they import torch when first used.
"""

from typing import Any

__version__ = "0.1.0"

from volo_convert import native_logs as _native_logs

# Keras refuses to start under an unknown KERAS_BACKEND. The CLI reports that as a usage
# error (exit 2) rather than a traceback; a library user meets Keras' own error on import.
KERAS_IMPORT_ERROR: str | None = None
with _native_logs.known_lines_held_back(_native_logs.STARTUP_LINES):
    try:
        from volo_convert.architecture import keras_layers as _keras_layers  # noqa: F401

        _native_logs.find_tensorflow_devices()
    except (ImportError, ValueError) as _error:
        KERAS_IMPORT_ERROR = f"Keras cannot start: {_error} (check KERAS_BACKEND)"

_API = ("convert", "verify")


def __getattr__(name: str) -> Any:
    """`convert` and `verify`, imported on first use so that the package stays torch-free."""
    if name in _API:
        from volo_convert import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
