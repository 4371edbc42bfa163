"""TFLite files that take a batch (`--tflite-batch N|dynamic`): written, run and verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from helpers import SMALL_IMAGE_SIZE, TINY_CONFIG, run

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.parity import floor_figures
from volo_convert.checks.reference import ReferenceRun, run_reference
from volo_convert.checks.weight_floor import floor_outputs
from volo_convert.formats.tflite import TFLiteRunner, convert_to_tflite
from volo_convert.formats.tflite_flatbuffer import check_builtin_ops, file_metadata
from volo_convert.formats.tflite_quantization import calibration_batches
from volo_convert.options import CALIBRATION_SEED, DEFAULT_ATOL, MAX_FLOOR_RATIO
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

TINY_SIZE = 64  # the size of conftest's tiny_state_dict
# As test_quantized.py measured for the tiny model's int8 file (batch 1): mean abs diff
# 0.20-0.22 over 64 images, top-1 agreement 94%.
TINY_INT8_MAX_MEAN_ABS = 0.3


@pytest.fixture(scope="module")
def d1_reference(d1_checkpoint: Path) -> ReferenceRun:
    """PyTorch's d1 at 32px on 4 seeded images, apart from the verification seed."""
    state_dict = torch.load(d1_checkpoint, weights_only=True)
    return run_reference(
        VARIANTS["d1"], SMALL_IMAGE_SIZE, state_dict, device="cpu", batch_size=4, seed=11
    )


def _signature(path: Path) -> tuple[Interpreter, dict]:
    """The file in plain LiteRT and its `serving_default` input details."""
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    runner = interpreter.get_signature_runner("serving_default")
    return interpreter, runner.get_input_details()["images"]


def test_batch_4_file_runs_at_batch_4_in_plain_litert_like_pytorch(
    d1_checkpoint: Path, d1_reference: ReferenceRun, tmp_path: Path
) -> None:
    output, report = tmp_path / "d1_b4.tflite", tmp_path / "r.json"
    result = run(
        d1_checkpoint, "-o", output, "--tflite-batch", "4", "--device", "cpu", "--report", report
    )
    assert result.exit_code == 0, result.output
    assert "tflite float32, batch 4" in result.output
    assert "at batch 4" in result.output  # 2 verification images, padded into one batch of 4
    recorded = json.loads(report.read_text())
    assert (recorded["tflite_batch"], recorded["verified_batches"]) == (4, [4])

    interpreter, images_input = _signature(output)
    assert list(images_input["shape_signature"]) == [4, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 3]
    serve = interpreter.get_signature_runner("serving_default")
    logits = serve(images=d1_reference.images)["logits"]
    assert logits.shape == (4, 1000)
    assert np.abs(logits - d1_reference.outputs).max() <= DEFAULT_ATOL
    assert file_metadata(output.read_bytes())["batch"] == 4

    inspected = run("inspect", output)
    assert inspected.exit_code == 0
    assert "tflite float32, batch 4" in inspected.output
    assert "at batch 4" in inspected.output
    assert json.loads(run("inspect", output, "--json").output)["tflite_batch"] == 4


def test_dynamic_file_runs_at_batch_1_and_3_in_plain_litert(
    d1_checkpoint: Path, d1_reference: ReferenceRun, tmp_path: Path
) -> None:
    output = tmp_path / "d1_dynamic.tflite"
    result = run(d1_checkpoint, "-o", output, "--tflite-batch", "dynamic", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "at batch 1 and 2" in result.output  # the 2 verification images: one, then both
    check_builtin_ops(output.read_bytes())

    interpreter, images_input = _signature(output)
    assert images_input["shape_signature"][0] == -1
    for batch in (1, 3):
        images = d1_reference.images[:batch]
        interpreter.resize_tensor_input(images_input["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(images_input["index"], images)
        interpreter.invoke()
        logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        assert logits.shape == (batch, 1000)
        assert np.abs(logits - d1_reference.outputs[:batch]).max() <= DEFAULT_ATOL

    inspected = run("inspect", output)
    assert "tflite float32, batch dynamic" in inspected.output
    assert "at batch 1 and 2" in inspected.output


def test_calibration_batches_fill_the_last_batch_from_the_start() -> None:
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    batches = calibration_batches(images, 4)
    assert [batch.ravel().tolist() for batch in batches] == [[0, 1, 2, 3], [4, 0, 1, 2]]
    assert [batch.shape[0] for batch in calibration_batches(images, None)] == [1] * 5
    assert [batch.shape[0] for batch in calibration_batches(images[:2], 8)] == [8]


def test_int8_file_of_batch_4_is_calibrated_in_batches_and_passes_its_floor(
    tiny_state_dict: dict, tmp_path: Path
) -> None:
    """Calibrated on 30 images (7 whole batches and one filled up), run on 64 in chunks of 4."""
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    calibration = normalize(sample_pixels(30, TINY_SIZE, CALIBRATION_SEED))
    content = convert_to_tflite(model, "int8", calibration=calibration, batch=4)
    check_builtin_ops(content)
    reference = run_reference(TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", batch_size=64)
    path = tmp_path / "tiny_int8_b4.tflite"
    path.write_bytes(content)
    runner = TFLiteRunner(path)
    assert runner.batch_size == 4
    logits = runner.predict_on_batch(reference.images)
    assert logits.shape == (64, TINY_CONFIG.num_classes)
    # judged as verification judges an int8 file: beside its weight-rounding floor
    floor = floor_outputs(model, reference.images)
    figures = floor_figures(logits, reference.outputs, floor, MAX_FLOOR_RATIO["int8"])
    assert figures.passed, figures.failure
    assert np.abs(logits - reference.outputs).mean() <= TINY_INT8_MAX_MEAN_ABS
