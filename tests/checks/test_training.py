"""Training-mode parity: logits, every gradient, one SGD step and the BatchNorm statistics
against PyTorch, each torch tensor moved through the same mapping row that ported it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import SMALL_IMAGE_SIZE, TINY_CONFIG, error_line, run, tiny_variant_known

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.parity import check_parity
from volo_convert.checks.reference import run_reference
from volo_convert.checks.training import check_training_parity, weight_stage
from volo_convert.errors import ConversionError
from volo_convert.options import TRAINING_GRADIENT_RTOL, ConvertOptions
from volo_convert.pipeline import convert
from volo_convert.synthetic import make_state_dict
from volo_convert.weights import mapping
from volo_convert.weights.mapping import WeightMapping, weight_mappings
from volo_convert.weights.porting import port_weights

ROOT = Path(__file__).resolve().parents[2]
TINY_IMAGE_SIZE = 64
# Measured at small sizes: every gradient within 1e-5 of PyTorch's (relative L2) on every
# backend; the tool's tolerance is looser for TensorFlow's float32 sums at large sizes.
SMALL_GRADIENT_RTOL = 1e-4
BROKEN_KERNEL = "stack1_block0_attn_proj/kernel"  # square: every shape check passes


def ported(config, image_size: int, state_dict: dict, mappings=None) -> keras.Model:
    model = build_volo(config, image_size)
    port_weights(model, state_dict, mappings or weight_mappings(config))
    return model


def untransposed(mappings: list[WeightMapping], keras_path: str) -> list[WeightMapping]:
    """`mappings` with one square dense kernel's transform swapped for `identity`."""
    return [
        WeightMapping(item.torch_key, item.keras_path, "identity")
        if item.keras_path == keras_path
        else item
        for item in mappings
    ]


def worst_gradient(parity) -> float:
    return max(item.relative_error for item in parity.gradients)


@pytest.mark.large
def test_d1_trains_like_pytorch_at_small_resolution() -> None:
    config = VARIANTS["d1"]
    state_dict = make_state_dict(config, TINY_IMAGE_SIZE, seed=4)
    model = ported(config, TINY_IMAGE_SIZE, state_dict)
    before = [keras.ops.convert_to_numpy(weight) for weight in model.weights]
    parity = check_training_parity(model, config, state_dict, device="cpu")
    assert parity.passed, parity.failure_reason
    assert parity.logits_max_abs_diff <= 1e-4 and parity.loss_abs_diff <= 1e-5
    assert worst_gradient(parity) <= SMALL_GRADIENT_RTOL
    assert len(parity.gradients) == len(parity.steps) == len(model.trainable_weights) == 251
    assert len(parity.statistics) == 6  # moving mean and variance of the three stem BNs
    assert {item.stage for item in parity.gradients} == set(parity.worst_per_stage())
    for weight, value in zip(model.weights, before, strict=True):  # the model is untouched
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), value)


@pytest.mark.large
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_like_pytorch_at_32px(variant: str) -> None:
    config = VARIANTS[variant]
    state_dict = make_state_dict(config, SMALL_IMAGE_SIZE, seed=12)
    model = ported(config, SMALL_IMAGE_SIZE, state_dict)
    parity = check_training_parity(model, config, state_dict, batch_size=2, device="cpu")
    assert parity.passed, parity.failure_reason
    assert worst_gradient(parity) <= SMALL_GRADIENT_RTOL
    assert len(parity.gradients) == len(model.trainable_weights)
    keras.backend.clear_session()


def test_features_head_gradients_cover_the_backbone(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE, "features")
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG, "features"))
    parity = check_training_parity(model, TINY_CONFIG, tiny_state_dict, device="cpu")
    assert parity.passed, parity.failure_reason
    assert "head" not in parity.worst_per_stage()
    assert len(parity.gradients) == len(model.trainable_weights)


def test_wrong_square_transform_fails_the_gradient_check(tiny_state_dict: dict) -> None:
    """Ported and checked with the same wrong row: inference and training both fail."""
    broken = untransposed(weight_mappings(TINY_CONFIG), BROKEN_KERNEL)
    model = ported(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, broken)
    reference = run_reference(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, device="cpu")
    assert not check_parity(model, reference, 1e-4).passed
    parity = check_training_parity(
        model, TINY_CONFIG, tiny_state_dict, mappings=broken, device="cpu"
    )
    assert not parity.passed
    assert parity.logits_max_abs_diff > 0.1
    by_path = {item.keras_path: item for item in parity.gradients}
    assert by_path[BROKEN_KERNEL].relative_error > 0.1
    assert by_path["stack1_block0_attn_qkv/kernel"].relative_error > 0.1  # upstream of it
    assert parity.failure_reason.startswith("training-mode logits differ by")


def test_gradients_are_compared_through_the_mapping_table(tiny_state_dict: dict) -> None:
    """Ported right, compared through a wrong row: only that tensor is out, forward is fine."""
    model = ported(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict)
    broken = untransposed(weight_mappings(TINY_CONFIG), BROKEN_KERNEL)
    parity = check_training_parity(
        model, TINY_CONFIG, tiny_state_dict, mappings=broken, device="cpu"
    )
    assert parity.logits_max_abs_diff <= 1e-4
    for items in (parity.gradients, parity.steps):
        failed = [item.keras_path for item in items if not item.within_tolerance]
        assert failed == [BROKEN_KERNEL]
    (broken_gradient,) = [item for item in parity.gradients if item.keras_path == BROKEN_KERNEL]
    assert broken_gradient.relative_error > 100 * TRAINING_GRADIENT_RTOL
    assert parity.failure_reason == (
        "1 of 104 gradients out of tolerance, worst network.2.0.attn.proj.weight "
        f"({BROKEN_KERNEL}) off by {broken_gradient.relative_error:.3g} relative L2, "
        "tolerance 0.01"
    )


def test_every_weight_has_a_stage() -> None:
    stages = {weight_stage(item.keras_path) for item in weight_mappings(TINY_CONFIG)}
    assert stages == {
        "stem", "stack0", "downsample", "stack1", "stack2", "stack3",
        "classifier0", "classifier1", "norm", "head",
    }  # fmt: skip
    with pytest.raises(ValueError, match="no stage for Keras weight 'other/kernel'"):
        weight_stage("other/kernel")


@pytest.fixture(scope="module")
def tiny_with_drop_path(
    tiny_checkpoint_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny model at 32px converted for fine-tuning: drop path in every transformer block."""
    output = tmp_path_factory.mktemp("training") / "tiny.keras"
    with tiny_variant_known():
        convert(tiny_checkpoint_file, output, ConvertOptions(drop_path_rate=0.2, verify=False))
    return output


def test_cli_verify_training_passes(
    tiny_with_drop_path: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    report = tmp_path / "training.json"
    result = run(
        "verify", tiny_with_drop_path, tiny_checkpoint, "--training", "--device", "cpu",
        "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "training mode: tensorflow gradients, 2 images" in result.output
    assert "gradient: 104 tensors" in result.output
    assert "after SGD step (lr 0.1): 104 tensors" in result.output
    assert "BatchNorm statistic: 6 tensors" in result.output
    assert "training parity passed" in result.output and "PASS" in result.output
    figures = json.loads(report.read_text())
    assert figures["status"] == "passed"
    training = figures["training"]
    assert training["passed"] and training["backend"] == "tensorflow"
    assert len(training["gradients"]) == 104
    assert max(item["relative_error"] for item in training["gradients"]) <= SMALL_GRADIENT_RTOL


def break_transformer_row(monkeypatch: pytest.MonkeyPatch, keras_suffix: str) -> None:
    """Makes the transformer table copy the kernel ending in `keras_suffix` untransposed."""
    broken = [
        mapping.MappingTable(
            table.source,
            table.scope,
            tuple(
                dataclasses.replace(row, transform="identity")
                if table.scope == "transformer_block" and row.keras.endswith(keras_suffix)
                else row
                for row in table.rows
            ),
        )
        for table in mapping.load_tables()
    ]
    monkeypatch.setattr(mapping, "load_tables", lambda: broken)


def test_cli_verify_training_fails_on_a_gradient_only_the_table_gets_wrong(
    tiny_with_drop_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A right file checked through a wrong table: the logits agree, the gradients do not.

    (A file converted through the wrong table fails both checks: see
    test_wrong_square_transform_fails_the_gradient_check.)
    """
    break_transformer_row(monkeypatch, "_attn_proj/kernel")
    result = run("verify", tiny_with_drop_path, tiny_checkpoint, "--training", "--device", "cpu")
    assert result.exit_code == 1
    assert "top-1 agreement 100%" in result.output
    assert "training parity FAILED" in result.output and "FAIL\n" in result.output
    assert error_line(result).startswith(
        "Error: training parity failed: 3 of 104 gradients out of tolerance, worst network."
    )
    assert ".attn.proj.weight (stack" in error_line(result)


def test_training_check_needs_a_keras_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as raised:
        convert(tiny_checkpoint, tmp_path / "d1.tflite", ConvertOptions(training=True))
    assert str(raised.value) == (
        "--training trains the model in Keras, so it needs a .h5 or .keras file, not tflite"
    )
    assert list(tmp_path.iterdir()) == []


# Trains the tiny model under the backend KERAS_BACKEND names; prints the verdict and the
# worst gradient error.
CHECK_UNDER_BACKEND = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import TINY_CONFIG
from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.training import check_training_parity
from volo_convert.synthetic import make_state_dict
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights
state_dict = make_state_dict(TINY_CONFIG, 32, seed=3)
model = build_volo(TINY_CONFIG, 32)
port_weights(model, state_dict, weight_mappings(TINY_CONFIG))
parity = check_training_parity(model, TINY_CONFIG, state_dict, device="cpu")
print(parity.backend, parity.passed, max(item.relative_error for item in parity.gradients))
"""


@pytest.mark.large
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_gradients_under_the_other_backends(backend: str) -> None:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", CHECK_UNDER_BACKEND, str(ROOT / "tests")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    name, passed, worst = completed.stdout.split()[-3:]
    assert (name, passed) == (backend, "True")
    assert float(worst) <= SMALL_GRADIENT_RTOL
