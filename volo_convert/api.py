"""The Python API for notebooks and scripts: `volo_convert.convert` and `volo_convert.verify`.

Both take the options as keywords (the fields of `ConvertOptions`: `head`, `image_size`,
`atol`, `device`, `overwrite`, ...), check them once, and return a `ConversionResult`:
`passed`, the `parity` figures, `str(result)` the summary the CLI prints. A bad input
raises a `ConversionError`; a failed parity check is a result whose `passed` is False.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from volo_convert import pipeline
from volo_convert.options import ConvertOptions
from volo_convert.results import ConversionResult


class VerificationWarning(UserWarning):
    """The work goes on despite something odd: another checkpoint than the model records,
    a photo that could not be read."""


def _warn(message: str) -> None:
    """Warns at the user's line: the first frame outside volo_convert."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("volo_convert"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, VerificationWarning, stacklevel=level)


def convert(
    checkpoint: str | Path,
    output: str | Path,
    *,
    on_stage: pipeline.StageCallback | None = None,
    **options: Any,
) -> ConversionResult:
    """Converts a VOLO checkpoint to `output` (`.h5`, `.keras`, `.tflite`, or a folder for a
    SavedModel) and verifies it against PyTorch, as `volo-convert CHECKPOINT -o OUTPUT` does.

    Args:
        checkpoint: the PyTorch checkpoint.
        output: where the model goes; nothing is left there if parity fails.
        on_stage: called with each stage's name (`loading`, `building`, ...) as it starts.
        **options: fields of `ConvertOptions`, e.g. `head="features"`, `overwrite=True`.
    """
    return pipeline.convert(
        checkpoint, output, ConvertOptions(**options), on_stage, on_warning=_warn
    )


def verify(
    model: str | Path,
    checkpoint: str | Path,
    *,
    on_stage: pipeline.StageCallback | None = None,
    **options: Any,
) -> ConversionResult:
    """Checks a converted model against its PyTorch checkpoint, as `volo-convert verify` does.

    A checkpoint other than the one the model records it came from is checked all the
    same, after a `VerificationWarning`.

    Args:
        model: a `.h5`, `.keras` or `.tflite` file, or a SavedModel folder.
        checkpoint: the PyTorch checkpoint.
        on_stage: called with each stage's name as it starts.
        **options: fields of `ConvertOptions`, e.g. `atol=1e-5`, `device="cpu"`.
    """
    return pipeline.verify_file(
        model, checkpoint, ConvertOptions(**options), on_stage, on_warning=_warn
    )
