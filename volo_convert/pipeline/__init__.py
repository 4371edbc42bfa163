"""The conversion pipeline: load, detect, build, port, save, verify, move into place.

`convert` (conversion.py) writes a verified file from a checkpoint; `verify_file`
(file_check.py) checks a file converted earlier. Both end in the same verification step
(verification.py) and share the stage, warning and report plumbing (stages.py).
"""

from volo_convert.pipeline.conversion import convert
from volo_convert.pipeline.file_check import verify_file
from volo_convert.pipeline.stages import StageCallback, WarningCallback

__all__ = ["StageCallback", "WarningCallback", "convert", "verify_file"]
