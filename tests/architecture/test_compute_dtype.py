"""`compute_dtype="bfloat16"`: where the model computes in bfloat16, where it stays float32,
how its files reload and verify in every Keras format, and what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import TINY_CONFIG, error_line, run, snapshot
from PIL import Image

from volo_convert.architecture.keras_model import COMPUTE_POLICIES, build_volo
from volo_convert.checks.images import sample_images
from volo_convert.formats import load_artifact, precision, read_provenance
from volo_convert.formats.savedmodel import METADATA_FILE, _recorded_metadata
from volo_convert.options import DEFAULT_MIN_TOP1, MANY_VERIFY_IMAGES
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

ROOT = Path(__file__).resolve().parents[2]
TINY_SIZE = 64
# The layers that stay float32 under bfloat16 compute, by name suffix: the residual stream,
# the layers that only move tokens, and the heads.
FLOAT32_SUFFIXES = ("_norm1", "_norm2", "_add_1", "_add_2", "_cls", "_patches", "_merge")
FLOAT32_NAMES = ("pos_embed", "cls_token", "norm", "head_cls", "head", "aux_head", "logits")
# Measured on the tiny model's 64 images: top-1 agreement 98%, max abs diff 0.23 and mean
# 0.042 against float32, for logits with a std of 2.7; the bars are about twice that.
TINY_MAX_ABS, TINY_MAX_MEAN_ABS = 0.5, 0.1
# d1 at 32px through the CLI measured mean abs diff 0.031-0.032 against PyTorch.
D1_MAX_MEAN_ABS = 0.1


def stays_float32(name: str) -> bool:
    return name in FLOAT32_NAMES or name.endswith(FLOAT32_SUFFIXES)


def check_bfloat16_layers(model: keras.Model) -> None:
    """Every variable float32; bfloat16 compute exactly where the builder puts it."""
    assert {variable.dtype for variable in model.weights} == {"float32"}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        expected = "float32" if stays_float32(layer.name) else COMPUTE_POLICIES["bfloat16"]
        assert layer.dtype_policy.name == expected, layer.name
    assert model.get_layer("stack1_block0_attn_mhsa").compute_dtype == "bfloat16"
    assert model.get_layer("stack0_block0_attn_outlook").compute_dtype == "bfloat16"
    assert model.get_layer("stem_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("logits").compute_dtype == "float32"


@pytest.fixture(scope="module")
def tiny_models(tiny_state_dict: dict) -> dict[str, keras.Model]:
    """The tiny model computing in float32 and in bfloat16, with the same weights."""
    models = {}
    for compute_dtype in ("float32", "bfloat16"):
        model = build_volo(TINY_CONFIG, TINY_SIZE, compute_dtype=compute_dtype)
        port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
        models[compute_dtype] = model
    return models


def test_bfloat16_computes_where_it_should_and_leaves_the_global_policy(
    tiny_models: dict,
) -> None:
    assert keras.config.dtype_policy().name == "float32"
    check_bfloat16_layers(tiny_models["bfloat16"])
    assert {layer.dtype_policy.name for layer in tiny_models["float32"].layers} == {"float32"}


def test_bfloat16_logits_are_float32_and_near_the_float32_model(tiny_models: dict) -> None:
    images = sample_images(MANY_VERIFY_IMAGES, TINY_SIZE, 0)
    bfloat16 = tiny_models["bfloat16"].predict_on_batch(images)
    assert bfloat16.dtype == np.float32
    float32 = np.asarray(tiny_models["float32"].predict_on_batch(images))
    diff = np.abs(bfloat16 - float32)
    assert 0 < diff.mean() <= TINY_MAX_MEAN_ABS and diff.max() <= TINY_MAX_ABS
    agreement = (bfloat16.argmax(-1) == float32.argmax(-1)).mean()
    assert agreement >= DEFAULT_MIN_TOP1["bfloat16"]


def test_a_global_policy_does_not_change_the_built_model(tiny_state_dict: dict) -> None:
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_volo(TINY_CONFIG, TINY_SIZE)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.inputs[0].dtype == "float32"
    computing = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.dtype_policy.name for layer in computing} == {"float32"}


@pytest.fixture(scope="module")
def bfloat16_files(d1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """d1 at 32px converted with --compute-dtype bfloat16 to .keras, .h5 and a SavedModel.

    Returns:
        format -> (the file, its report as read back).
    """
    folder = tmp_path_factory.mktemp("bfloat16")
    files = {}
    for fmt, name in (("keras", "d1.keras"), ("h5", "d1.h5"), ("savedmodel", "d1_savedmodel")):
        output, report = folder / name, folder / f"{fmt}.json"
        result = run(
            d1_checkpoint, "-o", output, "--compute-dtype", "bfloat16", "--device", "cpu",
            "--report", report,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"{fmt}, bfloat16 compute" in result.output
        files[fmt] = (output, json.loads(report.read_text()))
    return files


@pytest.mark.large  # the agreement and mean figures are d1's
@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_bfloat16_file_is_judged_by_top1_and_records_its_compute(
    fmt: str, bfloat16_files: dict
) -> None:
    path, report = bfloat16_files[fmt]
    parity = report["parity"]
    assert report["compute_dtype"] == "bfloat16" and report["status"] == "passed"
    assert parity["atol"] is None and parity["min_top1"] == DEFAULT_MIN_TOP1["bfloat16"]
    assert parity["batch_size"] == MANY_VERIFY_IMAGES
    assert parity["top1_agreement"] >= DEFAULT_MIN_TOP1["bfloat16"]
    assert 0 < parity["mean_abs_diff"] <= D1_MAX_MEAN_ABS
    assert read_provenance(path).compute_dtype == "bfloat16"
    inspected = run("inspect", path)
    assert ", bfloat16 compute" in inspected.output.splitlines()[3]
    assert precision(load_artifact(path)) == "bfloat16"


@pytest.mark.large
@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_bfloat16_keras_file_reloads_as_bfloat16(fmt: str, bfloat16_files: dict) -> None:
    path, _ = bfloat16_files[fmt]
    model = keras.models.load_model(path, compile=False)
    check_bfloat16_layers(model)
    logits = model.predict_on_batch(sample_images(2, 32, 0))
    assert logits.dtype == np.float32 and logits.shape == (2, 1000)


@pytest.mark.large
def test_verify_finds_bfloat16_in_a_savedmodel(bfloat16_files: dict, d1_checkpoint: Path) -> None:
    path, _ = bfloat16_files["savedmodel"]
    result = run("verify", path, d1_checkpoint, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "savedmodel, bfloat16 compute" in result.output
    assert "(64 images, min 90%)" in result.output


@pytest.mark.large
def test_a_savedmodel_without_a_recorded_compute_dtype_is_float32(
    bfloat16_files: dict, tmp_path: Path
) -> None:
    """Folders written before the compute dtype was recorded computed in float32."""
    path, _ = bfloat16_files["savedmodel"]
    metadata = tmp_path / "volo_convert.json"
    metadata.write_text(json.dumps({"input": "images"}))
    assert _recorded_metadata(metadata) == ("images", "float32")
    assert json.loads((path / METADATA_FILE).read_text())["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("output", "args", "message"),
    [
        (
            "d1.tflite",
            [],
            "Error: --compute-dtype bfloat16 applies to Keras files and SavedModels, not "
            ".tflite; use --tflite-dtype for a smaller TFLite file",
        ),
        (
            "d1.keras",
            ["--head", "features"],
            "Error: a bfloat16 file is judged by top-1 agreement, which the features head has "
            "not; use --compute-dtype float32 for features",
        ),
        (
            "d1.keras",
            ["--verify-images", "8"],
            "Error: a bfloat16 file is judged on at least 64 images, got --verify-images 8",
        ),
        (
            "d1.keras",
            ["--explain"],
            "Error: --explain holds every tensor to a float32 tolerance, which bfloat16 compute "
            "cannot meet; drop --explain, or use --compute-dtype float32",
        ),
        (
            "d1.keras",
            ["--compute-dtype", "float16"],
            "Error: Invalid value for '--compute-dtype': 'float16' is not one of 'float32', "
            "'bfloat16'.",
        ),
    ],
)
def test_convert_refusals_exit_2_and_write_nothing(
    tiny_checkpoint: Path, tmp_path: Path, output: str, args: list[str], message: str
) -> None:
    (tmp_path / "keep.keras").write_bytes(b"user data")
    before = snapshot(tmp_path)
    result = run(tiny_checkpoint, "-o", tmp_path / output, "--compute-dtype", "bfloat16", *args)
    assert result.exit_code == 2, result.output
    assert error_line(result) == message
    assert snapshot(tmp_path) == before


@pytest.mark.large
def test_verify_refusals_name_the_file_and_exit_2(
    bfloat16_files: dict, d1_checkpoint: Path, tmp_path: Path
) -> None:
    path, _ = bfloat16_files["keras"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 40), (index * 80, 100, 200)).save(photos / f"{index}.png")
    before = snapshot(tmp_path, path.parent)
    cases = [
        (
            ["--compute-dtype", "float32"],
            f"Error: {path}: the model computes in bfloat16, but --compute-dtype float32 was given",
        ),
        (
            ["--training"],
            "Error: --training holds every tensor to a float32 tolerance, which bfloat16 "
            "compute cannot meet; drop --training, or use --compute-dtype float32",
        ),
        (
            ["--images", photos],
            "Error: --images gave 3 readable images, but a bfloat16 file is judged on at least 64",
        ),
    ]
    for args, message in cases:
        result = run("verify", path, d1_checkpoint, "--device", "cpu", *args)
        assert result.exit_code == 2, result.output
        assert error_line(result) == message
    assert snapshot(tmp_path, path.parent) == before


# Loads a bfloat16 .keras file under the backend KERAS_BACKEND names; prints what it found.
BACKEND_SCRIPT = """
import sys
import keras, numpy as np
import volo_convert
model = keras.models.load_model(sys.argv[1], compile=False)
logits = keras.ops.convert_to_numpy(model(np.zeros((2, 64, 64, 3), "float32")))
mhsa = model.get_layer("stack1_block0_attn_mhsa")
print(keras.backend.backend(), mhsa.compute_dtype, logits.dtype, bool(np.isfinite(logits).all()))
"""


@pytest.mark.large  # one process per Keras backend
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bfloat16_file_runs_on_other_backends(
    backend: str, tiny_models: dict, tmp_path: Path
) -> None:
    path = tmp_path / "tiny_bf16.keras"
    tiny_models["bfloat16"].save(path)
    completed = subprocess.run(
        [sys.executable, "-c", BACKEND_SCRIPT, path],
        env={**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == [backend, "bfloat16", "float32", "True"]
