"""Per-stage diagnosis: a deliberately broken mapping must be traced to its stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY_CONFIG

from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.diagnosis import compare_stages, diagnose, format_diagnosis
from volo_convert.checks.reference import run_reference
from volo_convert.cli import cli
from volo_convert.weights import mapping
from volo_convert.weights.mapping import WeightMapping, weight_mappings
from volo_convert.weights.porting import port_weights

TINY_IMAGE_SIZE = 64
STAGES = [
    "stem",
    "stack0",
    "downsample",
    "stack1",
    "stack2",
    "stack3",
    "classifier0",
    "classifier1",
    "norm",
    "logits",
]


def swapped(mappings: list[WeightMapping], first: str, second: str) -> list[WeightMapping]:
    """`mappings` with the checkpoint tensors of two Keras weights exchanged."""
    torch_keys = {item.keras_path: item.torch_key for item in mappings}
    exchange = {first: torch_keys[second], second: torch_keys[first]}
    return [
        WeightMapping(
            exchange.get(item.keras_path, item.torch_key), item.keras_path, item.transform
        )
        for item in mappings
    ]


def untransposed(mappings: list[WeightMapping], keras_path: str) -> list[WeightMapping]:
    """`mappings` with one square dense kernel copied without its transpose."""
    return [
        WeightMapping(item.torch_key, item.keras_path, "identity")
        if item.keras_path == keras_path
        else item
        for item in mappings
    ]


BREAKAGES = {
    "stem": lambda mappings: swapped(mappings, "stem_bn1/moving_mean", "stem_bn1/moving_variance"),
    "stack0": lambda mappings: swapped(
        mappings, "stack0_block0_attn_v/kernel", "stack0_block1_attn_v/kernel"
    ),
    "stack1": lambda mappings: swapped(
        mappings, "stack1_block0_attn_qkv/kernel", "stack2_block0_attn_qkv/kernel"
    ),
    "classifier1": lambda mappings: untransposed(mappings, "classifier1_attn_q/kernel"),
    "logits": lambda mappings: swapped(mappings, "head/bias", "aux_head/bias"),
}


@pytest.mark.parametrize("broken_stage", sorted(BREAKAGES))
def test_broken_mapping_is_traced_to_its_stage(broken_stage: str, tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE)
    port_weights(model, tiny_state_dict, BREAKAGES[broken_stage](weight_mappings(TINY_CONFIG)))
    diagnosis = diagnose(
        model,
        TINY_CONFIG,
        run_reference(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, device="cpu"),
        1e-4,
    )
    assert [stage.stage for stage in diagnosis.stages] == STAGES
    assert diagnosis.first_failing_stage == broken_stage
    failing_at = STAGES.index(broken_stage)
    assert all(stage.within_tolerance for stage in diagnosis.stages[:failing_at])
    assert all(stage.max_abs_diff < 1e-4 for stage in diagnosis.stages[:failing_at])
    assert diagnosis.stages[failing_at].max_abs_diff > 1e-2
    keras.backend.clear_session()


def test_correct_conversion_has_every_stage_within_tolerance(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, TINY_IMAGE_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    diagnosis = diagnose(
        model,
        TINY_CONFIG,
        run_reference(TINY_CONFIG, TINY_IMAGE_SIZE, tiny_state_dict, device="cpu"),
        1e-4,
    )
    assert diagnosis.first_failing_stage is None
    assert format_diagnosis(diagnosis).endswith("every stage is within tolerance")


def test_tolerance_scales_with_magnitude_except_at_the_output() -> None:
    torch_outputs = {
        "stem": np.array([100.0, 0.0]),
        "norm": np.array([0.5, 0.0]),
        "logits": np.array([100.0, 0.0]),
    }
    keras_outputs = {
        "stem": np.array([100.005, 0.0]),  # 5e-3 off, allowed 1e-4 * 100
        "norm": np.array([0.5, 2e-4]),  # 2e-4 off, allowed 1e-4 (never below atol)
        "logits": np.array([100.005, 0.0]),  # 5e-3 off, allowed atol itself
    }
    diagnosis = compare_stages(keras_outputs, torch_outputs, atol=1e-4)
    assert [stage.tolerance for stage in diagnosis.stages] == pytest.approx([1e-2, 1e-4, 1e-4])
    assert [stage.within_tolerance for stage in diagnosis.stages] == [True, False, False]
    assert diagnosis.first_failing_stage == "norm"


def test_non_finite_output_fails_its_stage() -> None:
    diagnosis = compare_stages(
        {"stem": np.array([np.nan]), "logits": np.array([1.0])},
        {"stem": np.array([1.0]), "logits": np.array([1.0])},
        atol=1e-4,
    )
    assert math.isinf(diagnosis.stages[0].max_abs_diff)
    assert diagnosis.first_failing_stage == "stem"


def test_table_marks_the_first_failing_stage() -> None:
    diagnosis = compare_stages(
        {"stem": np.array([1.0]), "stack0": np.array([3.0]), "logits": np.array([9.0])},
        {"stem": np.array([1.0]), "stack0": np.array([2.0]), "logits": np.array([7.0])},
        atol=1e-4,
    )
    lines = format_diagnosis(diagnosis).splitlines()
    assert " ".join(lines[0].split()) == "stage Keras max|x| PyTorch max|x| max abs diff tolerance"
    assert lines[1].split() == ["stem", "1", "1", "0", "0.0001", "ok"]
    assert lines[2].split() == ["stack0", "3", "2", "1", "0.0002", "OUT", "<-", "first"]
    assert lines[3].split()[-1] == "OUT"
    assert lines[-1] == "first stage out of tolerance: stack0"


def broken_tables(source: str, changes: dict[str, dict[str, str]]) -> list[mapping.MappingTable]:
    """The shipped tables where, in table `source`, each row whose Keras pattern ends with a
    key of `changes` gets that key's values."""

    def broken_row(row: mapping.MappingRow) -> mapping.MappingRow:
        for suffix, change in changes.items():
            if row.keras.endswith(suffix):
                return dataclasses.replace(row, **change)
        return row

    return [
        mapping.MappingTable(table.source, table.scope, tuple(map(broken_row, table.rows)))
        if table.source == source
        else table
        for table in mapping.load_tables()
    ]


def test_cli_failure_names_the_transformer_stack(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transformer blocks' square attention projection loses its transpose."""
    tables = broken_tables("transformer.yaml", {"_attn_proj/kernel": {"transform": "identity"}})
    monkeypatch.setattr(mapping, "load_tables", lambda: tables)
    report = tmp_path / "r.json"
    output = tmp_path / "d1.h5"
    result = CliRunner().invoke(
        cli, [str(tiny_checkpoint), "-o", str(output), "--device", "cpu", "--report", str(report)]
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert "first stage out of tolerance: stack1" in result.output
    error = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert "exceeds atol 0.0001; first stage out of tolerance: stack1; nothing was written" in error
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("st")}
    assert rows["stem"].endswith("ok") and rows["stack0"].endswith("ok")
    assert rows["stack1"].endswith("OUT  <- first")
    assert json.loads(report.read_text())["diagnosis"]["first_failing_stage"] == "stack1"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.json"]
