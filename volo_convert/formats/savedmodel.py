"""TensorFlow SavedModel folders: written from the Keras graph, run with TensorFlow alone.

The provenance record and the metadata are files in the folder, read without TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from volo_convert.errors import ConversionError, first_line
from volo_convert.formats.contract import InputContract, check_classifier_shapes, check_input_kind
from volo_convert.options import COMPUTE_DTYPES, DEFAULT_COMPUTE_DTYPE, DEFAULT_INPUT
from volo_convert.provenance import PROVENANCE_NAME

if TYPE_CHECKING:
    import keras
    import numpy as np

SERVING_SIGNATURE = "serving_default"
ASSETS_FOLDER = "assets"  # files a SavedModel ships with; TensorFlow loads without them
PROVENANCE_ASSET = f"{PROVENANCE_NAME}.json"
# The input kind and the compute dtype, which the signature's float32 images and logits
# cannot show, written with the model.
METADATA_FILE = Path(ASSETS_FOLDER) / "volo_convert.json"


def export_saved_model(model: keras.Model, path: Path, batch_size: int | None = None) -> None:
    """Writes a SavedModel whose `serving_default` signature maps `images` to `logits`.

    `model.export` would store every weight twice (keras-team/keras#23553), so the module
    saved here tracks the very TensorFlow variables that the traced forward pass captures.
    `images` are float32, normalised or, for a model that takes pixels, 0..255; `logits`
    float32, whatever the model computes in.

    Args:
        model: the Keras model (TensorFlow backend).
        path: the folder to write.
        batch_size: a fixed batch size, or None for any.
    """
    import tensorflow as tf

    from volo_convert.architecture.keras_model import model_compute_dtype, model_input

    spec = tf.TensorSpec((batch_size, *model.input_shape[1:]), tf.float32, name="images")
    module = tf.Module()
    module.model_variables = [weight.value for weight in model.weights]  # the tf.Variables
    module.serve = tf.function(
        lambda images: {"logits": model(images, training=False)}, input_signature=[spec]
    )
    signatures = {SERVING_SIGNATURE: module.serve.get_concrete_function()}
    try:
        tf.saved_model.save(module, str(path), signatures=signatures)
    except tf.errors.OpError as error:  # a full disk, say: reported as the OSError it is
        raise OSError(first_line(error)) from None
    (path / METADATA_FILE).parent.mkdir(exist_ok=True)
    metadata = {"input": model_input(model), "compute_dtype": model_compute_dtype(model)}
    (path / METADATA_FILE).write_text(json.dumps(metadata) + "\n")


def write_provenance(path: Path, document: str) -> None:
    """Stores `document` as an asset of the SavedModel folder at `path`."""
    assets = path / ASSETS_FOLDER
    assets.mkdir(exist_ok=True)
    (assets / PROVENANCE_ASSET).write_text(document, encoding="utf-8")


def read_provenance(path: Path) -> str | None:
    """The document `write_provenance` stored, or None if the folder holds none."""
    asset = path / ASSETS_FOLDER / PROVENANCE_ASSET
    if not asset.is_file():
        return None
    try:
        return asset.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"{asset}: cannot be read ({first_line(error)})") from None


def _recorded_metadata(metadata_file: Path) -> tuple[str, str]:
    """The input kind and compute dtype the metadata file records.

    DEFAULT_INPUT for folders without the file, DEFAULT_COMPUTE_DTYPE for those written
    before it recorded one.
    """
    if not metadata_file.is_file():
        return DEFAULT_INPUT, DEFAULT_COMPUTE_DTYPE
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConversionError(f"{metadata_file}: cannot be read ({first_line(error)})") from None
    except ValueError as error:  # not UTF-8, not JSON
        raise ConversionError(f"{metadata_file}: is damaged ({first_line(error)})") from None
    if not isinstance(metadata, dict) or "input" not in metadata:
        raise ConversionError(f"{metadata_file}: is damaged (no 'input' entry)")
    kind, compute_dtype = metadata["input"], metadata.get("compute_dtype")
    compute_dtype = DEFAULT_COMPUTE_DTYPE if compute_dtype is None else compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConversionError(
            f"{metadata_file}: records an unknown compute dtype {compute_dtype!r}"
        )
    return check_input_kind(kind, metadata_file), compute_dtype


class SavedModelRunner:
    """A SavedModel's serving signature, loaded with `tf.saved_model.load` alone."""

    def __init__(self, path: str | Path) -> None:
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(str(path))
            self._function = self._loaded.signatures[SERVING_SIGNATURE]
        except Exception as error:  # whatever a damaged or foreign folder makes TF raise
            raise ConversionError(
                f"{path}: not a loadable SavedModel ({first_line(error)})"
            ) from None
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
        check_classifier_shapes(self.input_shape, self.output_shape, path)
        kind, self.compute_dtype = _recorded_metadata(Path(path) / METADATA_FILE)
        self.input_contract = InputContract(kind)

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        """B, S, S, 3 images -> B, K logits."""
        import tensorflow as tf

        batch = tf.constant(self.input_contract.encode(images))
        outputs = self._function(**{self._input_name: batch})
        return outputs[self._output_name].numpy()
