"""volo-convert: PyTorch VOLO checkpoints to Keras 3 models with the same logits, proven.

Importing the package registers its custom Keras layers, so `keras.models.load_model`
reads a converted `.h5` or `.keras` file right after `import volo_convert`. It imports
Keras, never torch.
"""

__version__ = "0.1.0"

from volo_convert.architecture import keras_layers as _keras_layers  # noqa: F401
