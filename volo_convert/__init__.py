"""volo-convert: PyTorch VOLO checkpoints to Keras 3 models with the same logits, proven.

Importing the package registers its custom Keras layers, so `keras.models.load_model`
reads a converted `.h5` or `.keras` file right after `import volo_convert`. It imports
Keras, never torch.
"""

__version__ = "0.1.0"

# Keras refuses to start under an unknown KERAS_BACKEND. The CLI reports that as a usage
# error (exit 2) rather than a traceback; a library user meets Keras' own error on import.
KERAS_IMPORT_ERROR: str | None = None
try:
    from volo_convert.architecture import keras_layers as _keras_layers  # noqa: F401
except (ImportError, ValueError) as _error:
    KERAS_IMPORT_ERROR = f"Keras cannot start: {_error} (check KERAS_BACKEND)"
