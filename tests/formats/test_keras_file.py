"""A `.keras` file written under TensorFlow, reloaded and verified under the other backends.

The backend is fixed when Keras is first imported, so each check runs the CLI in a
fresh process with KERAS_BACKEND set. CI covers torch; jax is an optional extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from volo_convert.options import ConvertOptions
from volo_convert.pipeline import convert

pytestmark = pytest.mark.large  # a process per Keras backend

ROOT = Path(__file__).resolve().parents[1]
FLOAT32_ATOL = 5e-5  # float32 noise at small sizes, as in test_parity.py
NEEDS_JAX = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is an optional extra: pip install 'volo-convert[jax]'",
)


def run_cli(backend: str, *args: object) -> subprocess.CompletedProcess:
    """`python -m volo_convert ARGS` under `backend`, importing this checkout."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "volo_convert", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def d1_keras(d1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("backends") / "d1.keras"
    convert(d1_checkpoint, output, ConvertOptions(verify=False))
    return output


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=NEEDS_JAX)])
def test_keras_file_matches_pytorch_under_backend(
    backend: str, d1_keras: Path, d1_checkpoint: Path, tmp_path: Path
) -> None:
    report = tmp_path / "parity.json"
    result = run_cli(
        backend, "verify", d1_keras, d1_checkpoint, "--device", "cpu", "--report", report
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"model in Keras ({backend} backend)" in result.stdout
    figures = json.loads(report.read_text())
    assert figures["environment"]["keras_backend"] == backend
    assert figures["parity"]["max_abs_diff"] <= FLOAT32_ATOL
    assert figures["parity"]["top1_agreement"] == 1.0


def test_tflite_output_needs_the_tensorflow_backend(d1_checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("torch", d1_checkpoint, "-o", tmp_path / "d1.tflite")
    assert result.returncode == 2
    assert (
        "Error: tflite files are written with the TensorFlow backend, but KERAS_BACKEND is "
        "torch; rerun with KERAS_BACKEND=tensorflow"
    ) in result.stderr
    assert list(tmp_path.iterdir()) == []
