"""What the command line imports before it answers: `--help`, `--version` and `inspect` of
every format start no Keras, TensorFlow, torch or jax, which take seconds to import.

Each case runs in a fresh interpreter, as a user's command does; the timings themselves
are measured by scripts/bench_cli_startup.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIG

from volo_convert import __version__
from volo_convert.architecture.keras_model import build_volo
from volo_convert.cli import cli
from volo_convert.environment import environment
from volo_convert.formats import save_model, write_provenance
from volo_convert.formats.tflite import convert_to_tflite
from volo_convert.provenance import Provenance

pytestmark = pytest.mark.large  # each case starts a Python process

REPO = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("keras", "tensorflow", "torch", "jax")
TINY_SIZE = 32
FORMAT_FILES = {"h5": "tiny.h5", "keras": "tiny.keras", "tflite": "tiny.tflite"}

# Runs ARGS as `python -m volo_convert ARGS` would, then names on stderr's last line the
# heavy modules the run imported, however it ended.
CLI_PROBE = f"""
import runpy, sys
sys.argv = ["volo-convert", *sys.argv[1:]]
try:
    runpy.run_module("volo_convert", run_name="__main__")
finally:
    heavy = [name for name in {HEAVY_MODULES!r} if name in sys.modules]
    print("heavy modules:", *heavy, file=sys.stderr)
"""


def probe(*args: object, code: str = CLI_PROBE) -> tuple[subprocess.CompletedProcess[str], str]:
    """Runs `code` with ARGS in a fresh interpreter: the process, and the heavy modules it
    imported (stderr's last line)."""
    completed = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    *_, last = completed.stderr.splitlines() or [""]
    assert last.startswith("heavy modules:"), completed.stderr
    return completed, last.removeprefix("heavy modules:").strip()


@pytest.fixture(scope="module")
def recorded_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model in every format, each with its provenance record: format -> path."""
    folder = tmp_path_factory.mktemp("recorded")
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    paths = {fmt: folder / name for fmt, name in FORMAT_FILES.items()}
    paths["savedmodel"] = folder / "tiny_savedmodel"
    for fmt, path in paths.items():
        if fmt == "tflite":
            path.write_bytes(convert_to_tflite(model))
        else:
            save_model(model, path, fmt)
        write_provenance(path, fmt, _record(fmt))
    return paths


def _record(fmt: str) -> Provenance:
    return Provenance(
        converter_version=__version__,
        created="2026-01-02T03:04:05+00:00",
        source_file="tiny.pth.tar",
        source_sha256="cd" * 32,
        variant="tiny",
        image_size=TINY_SIZE,
        head="full",
        num_classes=TINY_CONFIG.num_classes,
        output_format=fmt,
        verification=None,
        environment=environment(),
        tflite_dtype="float32" if fmt == "tflite" else None,
    )


@pytest.mark.parametrize("command", [None, *sorted(cli.commands)])
def test_help_imports_no_heavy_module(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    completed, heavy = probe(*args)
    assert completed.returncode == 0, completed.stderr
    usage = "Usage: volo-convert" + ("" if command is None else f" {command}")
    assert completed.stdout.startswith(f"{usage} [OPTIONS]")
    assert heavy == ""


def test_version_imports_no_heavy_module() -> None:
    completed, heavy = probe("--version")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"volo-convert, version {__version__}\n"
    assert heavy == ""


@pytest.mark.parametrize("fmt", [*FORMAT_FILES, "savedmodel"])
def test_inspect_imports_no_heavy_module(fmt: str, recorded_files: dict[str, Path]) -> None:
    path = recorded_files[fmt]
    completed, heavy = probe("inspect", "--json", path)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == json.loads(_record(fmt).to_json())
    assert heavy == ""

    completed, heavy = probe("inspect", path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[3] == (
        f"model      VOLO tiny at {TINY_SIZE}px, 10 classes, full head, {fmt}"
        + (" float32, batch 1" if fmt == "tflite" else "")
    )
    assert heavy == ""


def test_inspect_refuses_a_file_without_a_record_as_lightly(tmp_path: Path) -> None:
    """A .tflite file that is no flatbuffer: named as such, exit 2, still without TensorFlow."""
    path = tmp_path / "not_a_model.tflite"
    path.write_bytes(b"\x00" * 64)
    completed, heavy = probe("inspect", path)
    assert completed.returncode == 2
    assert completed.stderr.splitlines()[0] == (
        f"Error: {path}: not a readable TFLite file (no TFL3 identifier)"
    )
    assert heavy == ""
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


# Imports the package alone, then Keras: the layers are registered the moment Keras is.
IMPORT_PROBE = f"""
import sys
import volo_convert
print("heavy modules:", *[name for name in {HEAVY_MODULES!r} if name in sys.modules])
import keras
print(keras.saving.get_registered_object("volo_convert>TokenDense").__module__)
print("heavy modules:", *[name for name in {HEAVY_MODULES!r} if name in sys.modules],
      file=sys.stderr)
"""


def test_import_alone_imports_no_heavy_module_and_registers_with_keras() -> None:
    completed, heavy = probe(code=IMPORT_PROBE)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "heavy modules:",
        "volo_convert.architecture.keras_layers",
    ]
    assert "keras" in heavy.split() and "torch" not in heavy.split()
