"""`predict`: a converted file's top classes on photos, the quick look after converting.

The file runs in its own runtime (Keras, TensorFlow's SavedModel loader, the TFLite
interpreter) and is fed what its input contract says (normalised images or pixels, an
int8 file's integers). Photos are prepared as verification prepares them (`checks/photos`):
timm's eval transform as the file's provenance record keeps it (a hub folder's config.json
or the release values), else the release transform of the variant and size it names. The
record also gives the head and, where known, the class names. Torch is not imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from volo_convert.architecture.keras_model import model_head
from volo_convert.architecture.variants import DEFAULT_CROP_PCT, EvalTransform, eval_transform
from volo_convert.checks.images import normalize
from volo_convert.checks.photos import read_photos
from volo_convert.errors import ConversionError, about
from volo_convert.formats import (
    Predictor,
    artifact_format,
    input_contract,
    load_artifact,
    read_provenance,
)
from volo_convert.options import DEFAULT_TOP_K
from volo_convert.provenance import Provenance

WarningCallback = Callable[[str], None]
PREDICT_CHUNK = 8  # images per forward pass: a d5 at 512 holds about 0.5 GB per image


@dataclasses.dataclass(frozen=True)
class ClassScore:
    """One of an image's top classes: its index, its label (None if none is recorded),
    its softmax probability and its logit."""

    index: int
    label: str | None
    probability: float
    logit: float


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    """An image's top classes, most probable first; `image` is its path as given."""

    image: str
    top: tuple[ClassScore, ...]


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What `predict` found: the model as read, how photos were prepared, each image's top
    classes. `variant` is None for a file without a provenance record."""

    model: str
    variant: str | None
    image_size: int
    num_classes: int
    transform: EvalTransform  # how the photos were prepared
    input: dict[str, Any]  # InputContract.to_dict()
    labelled: bool
    images: tuple[ImagePrediction, ...]

    def to_dict(self) -> dict[str, Any]:
        """The predictions as JSON-ready data."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """The predictions as the CLI prints them: a header, then per image its top classes
        (probability, class index, label)."""
        what = f"VOLO {self.variant}" if self.variant is not None else "a model"
        named = "" if self.labelled else ", classes by index (no labels recorded)"
        lines = [
            f"{self.model}: {what} at {self.image_size}px, {self.num_classes} classes{named}; "
            f"photos cropped as timm's eval with {_describe(self.transform)}"
        ]
        width = len(str(self.num_classes - 1))
        for prediction in self.images:
            lines.append(prediction.image)
            for score in prediction.top:
                label = "" if score.label is None else f"  {score.label}"
                lines.append(f"  {score.probability:6.1%}  {score.index:>{width}}{label}")
        return "\n".join(lines)


def _describe(transform: EvalTransform) -> str:
    """`crop_pct 0.96`, with the interpolation and crop mode where they are not the release's."""
    release = EvalTransform(transform.crop_pct)
    text = f"crop_pct {transform.crop_pct:g}"
    if transform.interpolation != release.interpolation:
        text += f", {transform.interpolation} interpolation"
    if transform.crop_mode != release.crop_mode:
        text += f", crop mode {transform.crop_mode}"
    return text


def _transform(record: Provenance | None, image_size: int) -> EvalTransform:
    """The transform the record keeps; else the release one of its variant; else the default."""
    if record is None:
        return EvalTransform(DEFAULT_CROP_PCT)
    if record.transform is not None:
        return EvalTransform(**record.transform)
    return eval_transform(record.variant, image_size)


def _record(model_path: str | Path, warn: WarningCallback) -> Provenance | None:
    """The file's provenance record; None, after a warning, if it has none or a damaged one."""
    try:
        record = read_provenance(model_path)
    except ConversionError as error:
        warn(f"{error}; predicting without it")
        return None
    if record is None:
        warn(
            f"{model_path}: holds no volo-convert provenance record; photos are cropped with "
            f"crop_pct {DEFAULT_CROP_PCT:g} and classes named by index"
        )
    return record


def _check_classifier(model: Predictor, record: Provenance | None, where: str | Path) -> None:
    """Refuses a file that ends in the features head: it returns no classes to rank."""
    if record is not None:
        head = record.head
    elif isinstance(model, keras.Model):
        with about(where):
            head = model_head(model)
    else:  # a SavedModel or TFLite file from elsewhere: B, K outputs taken as logits
        return
    if head == "features":
        raise ConversionError(
            f"{where}: ends in the features head ({model.output_shape[-1]} features, no "
            "classes); predict needs a file converted with --head full or cls"
        )


def _labels(record: Provenance | None, num_classes: int, warn: WarningCallback) -> list[str] | None:
    """The class names the record holds, if they fit the model's classes: the descriptions
    ("tench, Tinca tinca") where it has them, else the labels (synset ids)."""
    labels = None if record is None else (record.label_descriptions or record.labels)
    if labels is not None and len(labels) != num_classes:
        warn(
            f"the record names {len(labels)} labels for {num_classes} classes; "
            "naming classes by index"
        )
        return None
    return labels


def _logits(model: Predictor, inputs: np.ndarray) -> np.ndarray:
    """B, K logits of `model`, run PREDICT_CHUNK images at a time."""
    chunks = [
        keras.ops.convert_to_numpy(model.predict_on_batch(inputs[start : start + PREDICT_CHUNK]))
        for start in range(0, len(inputs), PREDICT_CHUNK)
    ]
    return np.concatenate(chunks).astype(np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """B, K logits -> B, K probabilities."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def predict(
    model_path: str | Path,
    images: Sequence[str | Path],
    top_k: int = DEFAULT_TOP_K,
    on_warning: WarningCallback | None = None,
) -> Predictions:
    """The `top_k` classes of a converted file for each photo at `images`.

    Args:
        model_path: a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file.
        images: JPEG/PNG files or folders of them; an unreadable file is skipped after a
            warning, and none readable is a ConversionError, as with `--images`.
        top_k: how many classes per image (all of them if the model has fewer).
        on_warning: called with each warning (one line).
    """
    warn = on_warning or (lambda message: None)
    if top_k < 1:
        raise ConversionError(f"--top-k must be at least 1, got {top_k}")
    if not images:
        raise ConversionError("no images given: name JPEG/PNG photos or folders of them")
    fmt = artifact_format(model_path)
    record = _record(model_path, warn)
    model = load_artifact(model_path, fmt)
    _check_classifier(model, record, model_path)
    image_size, num_classes = int(model.input_shape[1]), int(model.output_shape[-1])
    variant = None if record is None else record.variant
    transform = _transform(record, image_size)
    labels = _labels(record, num_classes, warn)
    photos = read_photos(images, image_size, transform, warn)
    contract = input_contract(model)
    inputs = photos.pixels if contract.kind == "pixels" else normalize(photos.pixels)
    logits = _logits(model, inputs)
    probabilities = _softmax(logits)
    ranked = np.argsort(-logits, axis=-1, kind="stable")[:, : min(top_k, num_classes)]
    predictions = tuple(
        ImagePrediction(
            image=name,
            top=tuple(
                ClassScore(
                    index=int(index),
                    label=None if labels is None else labels[index],
                    probability=float(probabilities[row, index]),
                    logit=float(logits[row, index]),
                )
                for index in ranked[row]
            ),
        )
        for row, name in enumerate(photos.names)
    )
    return Predictions(
        model=str(model_path),
        variant=variant,
        image_size=image_size,
        num_classes=num_classes,
        transform=transform,
        input=contract.to_dict(),
        labelled=labels is not None,
        images=predictions,
    )
