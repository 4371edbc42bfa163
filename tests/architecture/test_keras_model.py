"""The three heads: published logits, class head alone, and class-token features."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest
from helpers import TINY_CONFIG, error_line, run, snapshot

from volo_convert.architecture.keras_model import build_volo, model_head
from volo_convert.checks.parity import check_parity
from volo_convert.checks.reference import run_reference
from volo_convert.errors import ConversionError
from volo_convert.options import DEFAULT_ATOL, HEADS
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

TINY_IMAGE_SIZE = 64
OUTPUT_WIDTH = {"full": TINY_CONFIG.num_classes, "cls": TINY_CONFIG.num_classes, "features": 32}


@pytest.mark.parametrize("head", HEADS)
def test_each_head_matches_the_reference(head: str, tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE, head)
    assert model.output_shape == (None, OUTPUT_WIDTH[head])
    assert model_head(model) == head
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG, head))
    parity = check_parity(
        model,
        run_reference(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, device="cpu", head=head),
        1e-5,
    )
    assert parity.passed, parity
    assert (parity.top1_agreement is None) == (head == "features")
    keras.backend.clear_session()


def test_heads_differ_where_they_should(tiny_state_dict: dict) -> None:
    """The aux term changes the logits; comparing the wrong heads must fail."""
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE, "cls")
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG, "cls"))
    parity = check_parity(
        model,
        run_reference(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, device="cpu", head="full"),
        DEFAULT_ATOL,
    )
    assert not parity.passed and parity.max_abs_diff > 0.1


@pytest.mark.parametrize(
    ("head", "dropped"),
    [
        ("full", set()),
        ("cls", {"aux_head.weight", "aux_head.bias"}),
        ("features", {"head.weight", "head.bias", "aux_head.weight", "aux_head.bias"}),
    ],
)
def test_dropped_head_tensors_are_declared_unused(head: str, dropped: set[str]) -> None:
    mappings = weight_mappings(TINY_CONFIG, head)
    assert {mapping.torch_key for mapping in mappings if mapping.keras_path is None} == dropped
    assert len(mappings) == len(weight_mappings(TINY_CONFIG))


def test_coverage_stays_strict_for_dropped_heads(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE, "cls")
    state_dict = dict(tiny_state_dict)
    del state_dict["aux_head.bias"]
    with pytest.raises(
        ConversionError, match=r"tensors missing from the checkpoint: aux_head\.bias"
    ):
        port_weights(model, state_dict, weight_mappings(TINY_CONFIG, "cls"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"head": "logits"}, r"unknown head 'logits', expected one of full, cls"),
        ({"input_kind": "camera"}, r"unknown input 'camera'"),
        ({"compute_dtype": "float16"}, r"unknown compute dtype 'float16'"),
        ({"drop_rate": 1.0}, r"drop rate must be at least 0 and below 1"),
        ({"image_size": 100}, r"image size must be a positive multiple of 16"),
    ],
)
def test_build_refuses_what_options_let_through_as_a_bug(settings: dict, message: str) -> None:
    """Options check the user's input; a bad value reaching the build is a bug (exit 3),
    never read as the user's mistake (ConversionError, exit 2)."""
    arguments = {"image_size": TINY_IMAGE_SIZE, "head": "full", **settings}
    with pytest.raises(ValueError, match=message) as raised:
        build_volo(TINY_CONFIG, arguments.pop("image_size"), arguments.pop("head"), **arguments)
    assert not isinstance(raised.value, ConversionError)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_heads_survive_saving(suffix: str, tmp_path: Path) -> None:
    for head in ("cls", "features"):
        path = tmp_path / f"{head}{suffix}"
        build_volo(TINY_CONFIG, TINY_IMAGE_SIZE, head).save(path)
        reloaded = keras.models.load_model(path, compile=False)
        assert model_head(reloaded) == head
        assert reloaded.output_shape == (None, OUTPUT_WIDTH[head])


def test_cli_features_head_verify_reads_the_head(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_features.h5"
    result = run(tiny_checkpoint, "-o", output, "--head", "features", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "10 classes, 69,324 parameters, features head" in result.output
    assert keras.models.load_model(output, compile=False).output_shape == (None, 32)

    result = run(
        "verify",
        output,
        tiny_checkpoint,
        "--device",
        "cpu",
        "--explain",
        "--report",
        tmp_path / "v.json",
    )
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "top-1" not in result.output
    assert "every stage is within tolerance" in result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["head"] == "features" and report["parity"]["top1_agreement"] is None
    assert [stage["stage"] for stage in report["diagnosis"]["stages"]][-2:] == ["norm", "features"]

    before = snapshot(tmp_path)
    result = run("verify", output, tiny_checkpoint, "--head", "full")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: the model ends in the features head, but --head full was given"
    )
    # features have no classes: a top-1 bar could never pass, so it is refused, not failed
    result = run("verify", output, tiny_checkpoint, "--min-top1", "0.5", "--report", tmp_path / "x")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: --min-top1 bars top-1 agreement, which the features head has not; features are "
        "judged by --atol"
    )
    assert snapshot(tmp_path) == before


def test_cli_unknown_head_and_explain_without_verify(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "x.h5", "--head", "aux")
    assert result.exit_code == 2
    assert "'aux' is not one of 'full', 'cls', 'features'" in result.output
    result = run(tiny_checkpoint, "-o", tmp_path / "x.h5", "--no-verify", "--explain")
    assert result.exit_code == 2
    assert "Error: --explain compares with PyTorch, so it needs verification" in result.output
    assert list(tmp_path.iterdir()) == []
