"""volo-convert: PyTorch VOLO checkpoints to Keras 3 models with the same logits, proven.

Importing the package registers its custom Keras layers, so `keras.models.load_model`
reads a converted `.h5` or `.keras` file right after `import volo_convert`. It imports
neither Keras nor torch: the layers are registered once Keras is imported, before or after
(`architecture/keras_startup.py`), and TensorFlow's start-up lines are then held back
(see `native_logs`).

`volo_convert.convert(...)` and `volo_convert.verify(...)` are the Python API (see `api`);
they import torch when first used.
"""

from typing import Any

__version__ = "0.1.0"

from volo_convert.architecture.keras_startup import register_layers_with_keras

register_layers_with_keras()

_API = ("convert", "verify")


def __getattr__(name: str) -> Any:
    """`convert` and `verify`, imported on first use so that the package stays torch-free."""
    if name in _API:
        from volo_convert import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
