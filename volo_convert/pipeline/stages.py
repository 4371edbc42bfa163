"""What every pipeline run shares: stage and warning callbacks, the output policy's
checks before any work, and the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from volo_convert.errors import ConversionError
from volo_convert.options import KERAS_FORMATS, SAVEDMODEL, ConvertOptions
from volo_convert.paths import check_output_path
from volo_convert.results import ConversionResult, write_report

StageCallback = Callable[[str], None]
WarningCallback = Callable[[str], None]


def collecting(warnings: list[str], on_warning: WarningCallback | None) -> WarningCallback:
    """A warning callback that keeps each warning in `warnings` and passes it on."""

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    return warn


def notify(on_stage: StageCallback | None, stage: str) -> None:
    """Announces that `stage` starts."""
    if on_stage is not None:
        on_stage(stage)


def check_trainable(fmt: str, options: ConvertOptions) -> None:
    """Refuses the training check for a format Keras cannot train."""
    if options.training and fmt not in KERAS_FORMATS:
        raise ConversionError(
            f"--training trains the model in Keras, so it needs a .h5 or .keras file, not {fmt}"
        )


def check_outputs(
    output_path: Path | None,
    report_path: Path | None,
    inputs: list[Path],
    options: ConvertOptions,
    fmt: str | None = None,
) -> None:
    """The output policy for the model file and the report, before any work."""
    if output_path is not None:
        check_output_path(output_path, options.overwrite, folder=fmt == SAVEDMODEL, inputs=inputs)
    if report_path is not None:
        others = {} if output_path is None else {output_path: "the model output"}
        check_output_path(report_path, options.overwrite, inputs=inputs, others=others)


def finish_report(report_path: Path | None, result: ConversionResult) -> None:
    """Writes the report, if one was asked for."""
    if report_path is not None:
        write_report(report_path, result)
