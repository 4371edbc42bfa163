"""Machine-readable reports: JSON written atomically, with the software versions."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from volo_convert import __version__
from volo_convert.errors import ConversionError


def environment() -> dict[str, str]:
    """Versions of the software that produced a report."""
    import keras
    import torch

    return {
        "volo_convert": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "machine": platform.machine(),
    }


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file, so no reader sees half of it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConversionError(f"{path}: the report folder {path.parent} does not exist")
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Writes `data` plus the environment as pretty-printed JSON."""
    write_text(path, json.dumps({**data, "environment": environment()}, indent=2) + "\n")
