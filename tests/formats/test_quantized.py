"""Quantized TFLite files (int8-dynamic, int8): builtin ops, the interpreter, agreement bars."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, error_line, run
from PIL import Image

from volo_convert.architecture import variants
from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.parity import check_parity
from volo_convert.checks.reference import ReferenceRun, run_reference
from volo_convert.checks.weight_floor import floor_outputs
from volo_convert.formats.tflite import TFLiteRunner, convert_to_tflite
from volo_convert.formats.tflite_flatbuffer import (
    check_builtin_ops,
    file_metadata,
    operator_names,
    weight_dtype,
)
from volo_convert.formats.tflite_quantization import FLOAT_OPS, smoothed_layer_norms
from volo_convert.options import (
    CALIBRATION_SEED,
    CLEAR_MARGIN_MULTIPLE,
    DEFAULT_CALIBRATION_IMAGES,
    MANY_VERIFY_IMAGES,
    MAX_FLOOR_RATIO,
)
from volo_convert.synthetic import write_checkpoint
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

TINY_SIZE = 64
# The tiny model's logits have a std of 2.7 and a median top-2 margin of 0.83. Measured over
# its 64 images: int8-dynamic 97% top-1 agreement, mean abs diff 0.092; int8 calibrated on
# the default set 94% (83% on 16 images instead of 32), mean abs diff 0.20-0.22.
TINY_MAX_MEAN_ABS = {"int8-dynamic": 0.15, "int8": 0.3}


@pytest.fixture(scope="module")
def tiny_run(tiny_state_dict: dict) -> ReferenceRun:
    return run_reference(
        TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", batch_size=MANY_VERIFY_IMAGES
    )


@pytest.fixture(scope="module")
def tiny_floors(tiny_state_dict: dict, tiny_run: ReferenceRun) -> dict[str, np.ndarray]:
    """The weight-rounding floor's logits on the tiny run's images, by input kind."""
    floors = {}
    for input_kind in ("images", "pixels"):
        model = build_volo(TINY_CONFIG, TINY_SIZE, input_kind=input_kind)
        port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
        floors[input_kind] = floor_outputs(model, getattr(tiny_run, input_kind))
    keras.backend.clear_session()
    return floors


@pytest.fixture(scope="module")
def tiny_files(tiny_state_dict: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model as int8-dynamic and int8 (images), and as int8 taking uint8 pixels.

    Its graph is a large share of its files, so sizes are checked on d1 (CLI tests).
    """
    folder = tmp_path_factory.mktemp("quantized")
    calibration_pixels = sample_pixels(DEFAULT_CALIBRATION_IMAGES, TINY_SIZE, CALIBRATION_SEED)
    files = {}
    for name, input_kind, dtype, io in [
        ("int8-dynamic", "images", "int8-dynamic", "float32"),
        ("int8", "images", "int8", "float32"),
        ("int8-pixels-uint8", "pixels", "int8", "int8"),
    ]:
        model = build_volo(TINY_CONFIG, TINY_SIZE, input_kind=input_kind)
        port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
        calibration = (
            calibration_pixels.astype(np.float32)
            if input_kind == "pixels"
            else normalize(calibration_pixels)
        )
        path = folder / f"{name}.tflite"
        path.write_bytes(convert_to_tflite(model, dtype, io, calibration))
        files[name] = path
    keras.backend.clear_session()
    return files


def test_quantized_files_use_builtin_ops_only(tiny_files: dict) -> None:
    dynamic = tiny_files["int8-dynamic"].read_bytes()
    names = operator_names(dynamic)
    check_builtin_ops(dynamic)
    assert not [name for name in names if name.startswith("custom:")], names
    assert "QUANTIZE" not in names  # activations stay float; the kernels quantize on the fly
    assert weight_dtype(dynamic) == "int8-dynamic"

    full = tiny_files["int8"].read_bytes()
    names = operator_names(full)
    check_builtin_ops(full)
    assert {"QUANTIZE", "DEQUANTIZE", "FULLY_CONNECTED", "CONV_2D"} <= set(names)
    assert {"SOFTMAX", "GELU", "BATCH_MATMUL"} <= set(FLOAT_OPS) & set(names)
    assert file_metadata(full) == {"tflite_dtype": "int8", "input": "images", "batch": 1}


@pytest.mark.parametrize("name", ["int8-dynamic", "int8"])
def test_quantized_files_meet_their_floor_bars(
    tiny_files: dict, tiny_run: ReferenceRun, tiny_floors: dict, name: str
) -> None:
    runner = TFLiteRunner(tiny_files[name])
    assert runner.weight_dtype == name
    parity = check_parity(
        runner, tiny_run, None, None, tiny_floors["images"], MAX_FLOOR_RATIO[name]
    )
    assert parity.batch_size == MANY_VERIFY_IMAGES
    assert parity.passed, parity  # within MAX_FLOOR_RATIO, every clear-margin top-1 kept
    assert 0 < parity.mean_abs_diff <= TINY_MAX_MEAN_ABS[name], parity
    assert parity.mean_abs_diff < parity.max_abs_diff
    floor = parity.floor
    # The file rounds the same kernels, and adds activation rounding (int8-dynamic a little).
    assert 0.9 <= floor.error_ratio <= MAX_FLOOR_RATIO[name], floor
    assert floor.clear_images >= MANY_VERIFY_IMAGES // 4 and floor.clear_top1_agreement == 1.0


def test_int8_takes_camera_bytes_as_uint8(
    tiny_files: dict, tiny_run: ReferenceRun, tiny_floors: dict
) -> None:
    runner = TFLiteRunner(tiny_files["int8-pixels-uint8"])
    contract = runner.input_contract
    assert (contract.kind, contract.dtype, contract.scale, contract.zero_point) == (
        "pixels", "uint8", 1.0, 0,
    )  # fmt: skip
    np.testing.assert_array_equal(contract.encode(tiny_run.pixels), tiny_run.pixels)
    parity = check_parity(
        runner, tiny_run, None, None, tiny_floors["pixels"], MAX_FLOOR_RATIO["int8"]
    )
    assert parity.passed, parity
    assert parity.mean_abs_diff <= TINY_MAX_MEAN_ABS["int8"], parity


def test_a_missed_top1_bar_fails_and_says_so(tiny_files: dict, tiny_run: ReferenceRun) -> None:
    parity = check_parity(TFLiteRunner(tiny_files["int8"]), tiny_run, atol=None, min_top1=1.0)
    assert parity.top1_agreement < 1.0 and not parity.passed
    assert parity.failure == (
        f"top-1 agreement {parity.top1_agreement:.1%} is below --min-top1 100% (64 images)"
    )


@pytest.mark.large  # sizes and agreement on real widths
def test_cli_int8_dynamic_on_d1(d1_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_dynamic.tflite"
    result = run(
        d1_checkpoint, "-o", output, "--tflite-dtype", "int8-dynamic", "--device", "cpu",
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    parity = report["parity"]
    assert parity["batch_size"] == MANY_VERIFY_IMAGES and parity["atol"] is None
    assert parity["min_top1"] is None and parity["top1_agreement"] > 0
    floor = parity["floor"]
    assert floor["max_error_ratio"] == MAX_FLOOR_RATIO["int8-dynamic"] >= floor["error_ratio"]
    assert floor["floor_mean_abs_diff"] > 0 and floor["clear_top1_agreement"] in (1.0, None)
    assert report["tflite_dtype"] == "int8-dynamic" and report["status"] == "passed"
    assert "LiteRT (ai-edge-litert" in report["runtime"]  # the test extra installs it
    check_builtin_ops(output.read_bytes())
    assert output.stat().st_size < 0.3 * 4 * report["parameters"]

    photos = tmp_path / "photos"
    photos.mkdir()
    gradient = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    for index in range(3):
        Image.fromarray(np.roll(gradient, 16 * index, axis=1)).save(photos / f"{index}.png")
    result = run("verify", output, d1_checkpoint, "--device", "cpu", "--images", photos)
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: --images gave 3 readable images, but a quantized file is judged on at least 64"
    )
    result = run("verify", output, d1_checkpoint, "--device", "cpu", "--input", "pixels")
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"Error: {output}: the model takes images, but --input pixels was given"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "d1_dynamic.tflite",
        "photos",
        "r.json",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tflite-io", "int8"],
            "Error: --tflite-io int8 needs --tflite-dtype int8 (full integer)",
        ),
        (
            ["--tflite-dtype", "int8-dynamic", "--calibration-images", "."],
            "Error: --calibration-images applies to --tflite-dtype int8 only",
        ),
        (
            ["--tflite-dtype", "int8", "--verify-images", "8"],
            "Error: a quantized file is judged on at least 64 images, got --verify-images 8",
        ),
        (
            ["--tflite-dtype", "int8", "--head", "features"],
            "Error: a quantized file is judged by top-1 agreement, which the features head has "
            "not; use --tflite-dtype float32 or float16 for features",
        ),
    ],
)
def test_quantization_options_are_checked_first(
    tiny_checkpoint: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.tflite", *args)
    assert result.exit_code == 2
    assert error_line(result) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.large
def test_d1_at_224_in_full_int8_taking_uint8_pixels(tmp_path: Path) -> None:
    """The one full-size quantization: d1 at 224, the deployment a phone would use."""
    checkpoint = write_checkpoint(tmp_path / "d1_224.pth.tar", VARIANTS["d1"], 224, seed=0)
    output = tmp_path / "d1_int8.tflite"
    result = run(
        checkpoint, "-o", output, "--tflite-dtype", "int8", "--input", "pixels",
        "--tflite-io", "int8", "--device", "cpu", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "input           pixels (uint8, scale 1, zero point 0)" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    parity = report["parity"]
    assert parity["batch_size"] == MANY_VERIFY_IMAGES
    assert parity["floor"]["error_ratio"] <= MAX_FLOOR_RATIO["int8"], parity
    assert report["input"]["kind"] == "pixels" and report["input"]["dtype"] == "uint8"
    content = output.read_bytes()
    check_builtin_ops(content)
    assert len(content) <= 0.3 * 4 * report["parameters"]  # float32 stores 4 bytes a weight


def test_layer_norm_smoothing_keeps_the_float_model_and_puts_weights_back(
    tiny_state_dict: dict, tiny_run: ReferenceRun
) -> None:
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    images = tiny_run.images[:8]
    before = [keras.ops.convert_to_numpy(weight).copy() for weight in model.weights]
    with smoothed_layer_norms(model, images):
        smoothed = [keras.ops.convert_to_numpy(weight) for weight in model.weights]
        logits = np.asarray(model.predict_on_batch(images))
    changed = sum(not np.array_equal(old, new) for old, new in zip(before, smoothed, strict=True))
    assert changed == 3 * 15 + 5  # gamma, beta, kernel of 15 norms; 5 norm1s feed two kernels
    assert np.abs(logits - tiny_run.outputs[:8]).max() <= 5e-5  # the same function
    for old, weight in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(weight))


def test_default_int8_conversion_passes_its_floor_check(
    tiny_state_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, as a user runs it: the tiny model (made a known variant) to int8 with the
    default calibration, judged by default against its weight-rounding floor."""
    monkeypatch.setitem(variants.VARIANTS, "tiny", TINY_CONFIG)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, checkpoint)
    output = tmp_path / "tiny_int8.tflite"
    result = run(
        checkpoint, "-o", output, "--tflite-dtype", "int8", "--device", "cpu",
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    floor = json.loads((tmp_path / "r.json").read_text())["parity"]["floor"]
    assert 0.9 <= floor["error_ratio"] <= MAX_FLOOR_RATIO["int8"]
    assert floor["clear_top1_agreement"] == 1.0
    lines = result.output.splitlines()
    assert any(line.startswith("weight floor    ") for line in lines), result.output
    assert f"vs the floor    {floor['error_ratio']:.2f}x" in result.output, result.output
    assert f"{CLEAR_MARGIN_MULTIPLE:g}x the floor's logit error there; min 100%)" in result.output
    assert "PASS" in lines

    result = run("verify", output, checkpoint, "--device", "cpu")  # verify holds the same bars
    assert result.exit_code == 0, result.output
    assert f"vs the floor    {floor['error_ratio']:.2f}x" in result.output
