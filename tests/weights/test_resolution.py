"""--image-size: pos_embed resized with torch's bicubic, verified at the new size."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from helpers import TINY_CONFIG, run

from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.parity import check_parity
from volo_convert.checks.reference import run_reference
from volo_convert.weights.checkpoint import load_state_dict
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights
from volo_convert.weights.resolution import resize_pos_embed

TINY_SOURCE_SIZE = 64  # the tiny state dict's size: a 4x4 pos_embed grid
TINY_TARGET_SIZE = 96  # 6x6


def torch_bicubic(pos_embed: torch.Tensor, grid: int) -> np.ndarray:
    """The upstream resize, written out independently: 1, h, w, C -> 1, grid, grid, C."""
    channels_first = pos_embed.permute(0, 3, 1, 2)  # 1, C, h, w
    resized = F.interpolate(channels_first, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).numpy()  # 1, grid, grid, C


def tensorflow_bicubic(pos_embed: torch.Tensor, grid: int) -> np.ndarray:
    """TensorFlow's bicubic resize of the same 1, h, w, C grid (a different kernel)."""
    return tf.image.resize(pos_embed.numpy(), (grid, grid), method="bicubic").numpy()


def check_pos_embed(model_path: Path, checkpoint: Path, image_size: int) -> None:
    """The Keras pos_embed is torch's bicubic resize of the checkpoint's, and not TF's."""
    model = keras.models.load_model(model_path, compile=False)
    assert model.input_shape == (None, image_size, image_size, 3)
    keras_pos_embed = np.asarray(model.get_layer("pos_embed").weights[0].numpy())
    source = load_state_dict(checkpoint).state_dict["pos_embed"]  # 1, 2, 2, 32 at 32px
    grid = image_size // 16
    np.testing.assert_array_equal(keras_pos_embed, torch_bicubic(source, grid))
    assert np.abs(keras_pos_embed - tensorflow_bicubic(source, grid)).max() > 1e-2


def test_convert_to_another_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_64.keras"
    result = run(
        *(tiny_checkpoint, "-o", output, "--image-size", 64, "--device", "cpu"),
        *("--report", tmp_path / "r.json"),
    )
    assert result.exit_code == 0, result.output
    assert "VOLO tiny at 64px" in result.output and "PASS" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["image_size"] == 64 and report["status"] == "passed"
    assert report["parity"]["max_abs_diff"] <= 2e-5
    check_pos_embed(output, tiny_checkpoint, 64)


def test_verify_resizes_to_the_keras_input_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_48.h5"
    assert run(tiny_checkpoint, "-o", output, "--image-size", 48, "--no-verify").exit_code == 0
    check_pos_embed(output, tiny_checkpoint, 48)
    result = run("verify", output, tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "VOLO tiny at 48px" in result.output and "PASS" in result.output
    result = run("verify", output, tiny_checkpoint, "--image-size", 32)
    assert result.exit_code == 2
    assert f"{output}: the model takes 48px images, but --image-size 32 was given" in result.output


def test_tensorflow_bicubic_would_fail_parity(tiny_state_dict: dict) -> None:
    """Why the resize must be torch's: TF's kernel puts the logits far outside tolerance."""
    resized = dict(tiny_state_dict)
    resized["pos_embed"] = resize_pos_embed(tiny_state_dict["pos_embed"], TINY_TARGET_SIZE)
    tf_resized = dict(resized)
    tf_resized["pos_embed"] = torch.from_numpy(
        tensorflow_bicubic(tiny_state_dict["pos_embed"], TINY_TARGET_SIZE // 16)
    )
    results = {}
    for name, state_dict in (("torch", resized), ("tensorflow", tf_resized)):
        model = build_volo(TINY_CONFIG, TINY_TARGET_SIZE)
        port_weights(model, state_dict, weight_mappings(TINY_CONFIG))
        results[name] = check_parity(
            model, run_reference(TINY_CONFIG, TINY_TARGET_SIZE, resized, device="cpu"), 1e-5
        )
    assert results["torch"].passed, results["torch"]
    assert not results["tensorflow"].passed
    assert results["tensorflow"].max_abs_diff > 1e-3


def test_resize_keeps_the_grid_when_the_size_is_unchanged(tiny_state_dict: dict) -> None:
    pos_embed = tiny_state_dict["pos_embed"]
    assert resize_pos_embed(pos_embed, TINY_SOURCE_SIZE) is pos_embed


@pytest.mark.parametrize("image_size", ["30", "0", "-16"])
def test_size_not_a_multiple_of_16_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, image_size: str
) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "x.h5", "--image-size", image_size)
    assert result.exit_code == 2
    assert f"Error: image size must be a positive multiple of 16, got {image_size}" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
