"""Per-stage diagnosis: where along the network the Keras model leaves the PyTorch reference.

Both models run on the same images and every stage's output is compared (stem, each
outlooker or transformer stack, downsample, each class block, the final norm, then the
logits or features). A stage's tolerance is `atol` scaled by its largest reference value
(never below `atol`), since float32 rounding grows with magnitude; the final output is
held to `atol` itself, the same bar as the parity verdict. The first stage above its
tolerance is where the conversion goes wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras
import numpy as np

from volo_convert.architecture.keras_model import model_input, stage_output_layers
from volo_convert.architecture.variants import HEAD_OUTPUTS, VoloConfig
from volo_convert.checks.reference import ReferenceRun
from volo_convert.options import DEFAULT_HEAD
from volo_convert.text_table import render_table

TABLE_HEADER = ("stage", "Keras max|x|", "PyTorch max|x|", "max abs diff", "tolerance", "")


@dataclasses.dataclass(frozen=True)
class StageDifference:
    """How one stage's Keras output compares with the reference's."""

    stage: str
    keras_max_abs: float
    torch_max_abs: float
    max_abs_diff: float
    tolerance: float
    within_tolerance: bool


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Every stage's difference, in network order, and the first stage out of tolerance."""

    stages: tuple[StageDifference, ...]
    first_failing_stage: str | None
    atol: float
    # The stages are those of the float32 Keras graph rebuilt from the checkpoint, standing
    # in for a file that has none to read (SavedModel, TFLite, bfloat16).
    rebuilt: bool = False


def stage_tolerance(atol: float, torch_max_abs: float, is_output: bool) -> float:
    """The largest difference allowed at a stage whose reference peaks at `torch_max_abs`."""
    return atol if is_output else atol * max(1.0, torch_max_abs)


def _max_abs(values: np.ndarray) -> float:
    """max |values|, or inf if any value is not finite."""
    return float(np.abs(values).max()) if np.isfinite(values).all() else math.inf


def compare_stages(
    keras_outputs: Mapping[str, np.ndarray],
    torch_outputs: Mapping[str, np.ndarray],
    atol: float,
    head: str = DEFAULT_HEAD,
) -> Diagnosis:
    """Compares two stage name -> output mappings, in the reference's stage order."""
    stages = []
    for stage, torch_values in torch_outputs.items():
        keras_values = keras_outputs[stage]
        diff = _max_abs(keras_values.astype(np.float64) - torch_values.astype(np.float64))
        torch_max_abs = _max_abs(torch_values)
        tolerance = stage_tolerance(atol, torch_max_abs, stage == HEAD_OUTPUTS[head])
        stages.append(
            StageDifference(
                stage=stage,
                keras_max_abs=_max_abs(keras_values),
                torch_max_abs=torch_max_abs,
                max_abs_diff=diff,
                tolerance=tolerance,
                within_tolerance=diff <= tolerance,
            )
        )
    first_failing = next((stage.stage for stage in stages if not stage.within_tolerance), None)
    return Diagnosis(tuple(stages), first_failing, atol)


def keras_stage_outputs(
    model: keras.Model, config: VoloConfig, images: np.ndarray, head: str = DEFAULT_HEAD
) -> dict[str, np.ndarray]:
    """Runs `model` on B, S, S, 3 images and returns each stage's output, channels last."""
    layer_names = stage_output_layers(config, head)
    probe = keras.Model(
        model.inputs, [model.get_layer(name).output for name in layer_names.values()]
    )
    outputs = probe.predict_on_batch(images)
    return {
        stage: np.asarray(keras.ops.convert_to_numpy(values))
        for stage, values in zip(layer_names, outputs, strict=True)
    }


def diagnose(
    model: keras.Model,
    config: VoloConfig,
    reference: ReferenceRun,
    atol: float,
    rebuilt: bool = False,
) -> Diagnosis:
    """Compares every stage of the Keras `model` with the reference run, on its images;
    `rebuilt` says that `model` stands in for a file, rebuilt from the checkpoint."""
    inputs = reference.pixels if model_input(model) == "pixels" else reference.images
    keras_outputs = keras_stage_outputs(model, config, inputs, reference.head)
    diagnosis = compare_stages(keras_outputs, reference.stage_outputs, atol, reference.head)
    return dataclasses.replace(diagnosis, rebuilt=rebuilt)


REBUILT_PASSES = (
    "every stage of the float32 Keras graph rebuilt from the checkpoint is within tolerance, "
    "so the file itself differs: its export, its precision, or another model"
)


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The diagnosis as a table, one stage per row, then a line naming the first failure."""
    rows = [TABLE_HEADER]
    for stage in diagnosis.stages:
        if stage.within_tolerance:
            verdict = "ok"
        elif stage.stage == diagnosis.first_failing_stage:
            verdict = "OUT  <- first"
        else:
            verdict = "OUT"
        rows.append(
            (
                stage.stage,
                f"{stage.keras_max_abs:.4g}",
                f"{stage.torch_max_abs:.4g}",
                f"{stage.max_abs_diff:.3g}",
                f"{stage.tolerance:.3g}",
                verdict,
            )
        )
    lines = render_table(rows, right_aligned=range(1, len(TABLE_HEADER) - 1))
    if diagnosis.first_failing_stage is None:
        lines.append(REBUILT_PASSES if diagnosis.rebuilt else "every stage is within tolerance")
    else:
        lines.append(f"first stage out of tolerance: {diagnosis.first_failing_stage}")
    return "\n".join(lines)
