"""Training-time structure: drop path and dropout where upstream puts them, identity in
inference, whole samples kept or dropped with the right scaling."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, run

from volo_convert.architecture.keras_layers import DropPath
from volo_convert.architecture.keras_model import build_volo, drop_rates_at_zero
from volo_convert.architecture.torch_reference import DropPath as TorchDropPath
from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.parity import check_parity
from volo_convert.checks.reference import run_reference
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

RATE = 0.3
DRAWS = 4000  # samples per draw; the mean's standard error is then about 1% of the value


def keras_drop_path(x: np.ndarray, seed: int) -> np.ndarray:
    return keras.ops.convert_to_numpy(DropPath(RATE, seed=seed)(x, training=True))


def torch_drop_path(x: np.ndarray, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return TorchDropPath(RATE).train()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("drop_path", [keras_drop_path, torch_drop_path])
def test_drop_path_keeps_or_drops_whole_samples(drop_path) -> None:
    x = np.random.default_rng(0).normal(size=(64, 4, 4, 8)).astype(np.float32) + 3.0
    out = drop_path(x, seed=1)
    kept = np.isclose(out, x / (1 - RATE), rtol=1e-6).all(axis=(1, 2, 3))
    dropped = (out == 0).all(axis=(1, 2, 3))
    assert (kept | dropped).all()  # every sample whole: all kept and scaled, or all zero
    assert kept.any() and dropped.any()


@pytest.mark.parametrize("drop_path", [keras_drop_path, torch_drop_path])
def test_drop_path_mean_over_draws_is_the_identity(drop_path) -> None:
    row = np.random.default_rng(1).normal(size=(1, 5, 16)).astype(np.float32)
    x = np.repeat(row, DRAWS, axis=0)  # the same sample, drawn DRAWS times
    out = drop_path(x, seed=2)
    kept_fraction = (out != 0).all(axis=(1, 2)).mean()
    # Five standard errors: sqrt(p (1 - p) / n) for the fraction, scaled for the mean.
    fraction_error = 5 * np.sqrt(RATE * (1 - RATE) / DRAWS)
    assert abs(kept_fraction - (1 - RATE)) <= fraction_error
    np.testing.assert_allclose(
        out.mean(axis=0), row[0], atol=5 * np.abs(row).max() * np.sqrt(RATE / (1 - RATE) / DRAWS)
    )


def test_drop_path_is_the_identity_outside_training() -> None:
    x = np.random.default_rng(2).normal(size=(8, 3, 6)).astype(np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(DropPath(0.9)(x)), x)
    np.testing.assert_array_equal(TorchDropPath(0.9).eval()(torch.from_numpy(x)).numpy(), x)


def expected_rates(layers: tuple[int, ...], rate: float) -> dict[str, float]:
    """The spec's formula, written out: transformer block j of stage s (1-3)."""
    return {
        f"stack{stage}_block{block}": rate * (block + sum(layers[:stage])) / (sum(layers) - 1)
        for stage in (1, 2, 3)
        for block in range(layers[stage])
    }


def test_drop_path_sits_on_transformer_blocks_only_as_upstream() -> None:
    config = VARIANTS["d1"]
    expected = expected_rates(config.layers, 0.1)
    assert expected["stack1_block0"] == pytest.approx(0.1 * 4 / 17)  # counts the 4 outlookers
    assert expected["stack3_block1"] == pytest.approx(0.1)  # the last block gets the rate

    model = build_volo(config, 32, drop_path_rate=0.1)
    found = {layer.name: layer.rate for layer in model.layers if isinstance(layer, DropPath)}
    assert set(found) == {f"{block}_drop_path_{index}" for block in expected for index in (1, 2)}
    for name, rate in found.items():
        assert rate == pytest.approx(expected[name.rsplit("_drop_path_", 1)[0]])

    with torch.device("meta"):
        reference = Volo(config, 32, drop_path_rate=0.1)
    for stage in (1, 2, 3):
        for block, module in enumerate(reference.network[stage + 1]):
            assert module.drop_path.rate == pytest.approx(expected[f"stack{stage}_block{block}"])
    assert not any(isinstance(module, TorchDropPath) for module in reference.network[0].modules())
    assert not any(isinstance(module, TorchDropPath) for module in reference.post_network.modules())


def test_residual_branches_go_through_drop_path() -> None:
    model = build_volo(TINY_CONFIG, 32, drop_path_rate=0.2, drop_rate=0.1)
    add = model.get_layer("stack2_block0_add_1")
    assert add.input[1].name == model.get_layer("stack2_block0_drop_path_1").output.name
    add = model.get_layer("stack2_block0_add_2")
    assert add.input[1].name == model.get_layer("stack2_block0_drop_path_2").output.name
    assert model.get_layer("pos_drop").input.name == model.get_layer("pos_embed").output.name
    assert model.get_layer("pos_drop").rate == 0.1
    plain = build_volo(TINY_CONFIG, 32)
    assert not [layer for layer in plain.layers if "drop" in layer.name]
    assert len(plain.weights) == len(model.weights)


def test_rates_leave_inference_parity_unchanged(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, 64, drop_path_rate=0.5, drop_rate=0.5)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    parity = check_parity(
        model, run_reference(TINY_CONFIG, 64, tiny_state_dict, device="cpu"), 1e-5
    )
    assert parity.passed, parity


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_drop_layers_survive_saving_and_can_be_zeroed(
    suffix: str, tiny_state_dict: dict, tmp_path: Path
) -> None:
    model = build_volo(TINY_CONFIG, 64, drop_path_rate=0.4, drop_rate=0.2)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    model.save(tmp_path / f"tiny{suffix}")
    reloaded = keras.models.load_model(tmp_path / f"tiny{suffix}")
    rates = {layer.name: layer.rate for layer in reloaded.layers if "drop" in layer.name}
    assert rates == {layer.name: layer.rate for layer in model.layers if "drop" in layer.name}
    images = np.random.default_rng(3).normal(size=(6, 64, 64, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)), expected, atol=1e-6)

    noisy = keras.ops.convert_to_numpy(reloaded(images, training=True))
    with drop_rates_at_zero(reloaded):
        assert {layer.rate for layer in reloaded.layers if "drop" in layer.name} == {0.0}
        exact = keras.ops.convert_to_numpy(reloaded(images, training=True))
    assert {layer.name: layer.rate for layer in reloaded.layers if "drop" in layer.name} == rates
    assert not np.allclose(noisy, exact, atol=1e-3)  # the rates were in use, and are again


def test_bad_rates_are_refused_on_the_command_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.h5", "--drop-path-rate", "1")
    assert result.exit_code == 2
    assert "Invalid value for '--drop-path-rate': 1.0 is not in the range 0.0<=x<1.0." in (
        result.output
    )
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.h5", "--drop-rate", "-0.1")
    assert result.exit_code == 2
    assert "Invalid value for '--drop-rate': -0.1 is not in the range 0.0<=x<1.0." in (
        result.output
    )
    assert list(tmp_path.iterdir()) == []


def test_rates_reach_the_converted_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1.keras"
    result = run(tiny_checkpoint, "-o", output, "--drop-path-rate", "0.1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    model = keras.models.load_model(output)
    rates = [layer.rate for layer in model.layers if isinstance(layer, DropPath)]
    assert len(rates) == 2 * sum(TINY_CONFIG.layers[1:]) and max(rates) == pytest.approx(0.1)
    assert "pos_drop" not in {layer.name for layer in model.layers}
