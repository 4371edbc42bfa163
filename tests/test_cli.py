"""The command line through click's CliRunner: exit codes, messages, files left behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import keras
import numpy as np
import pytest
from helpers import TINY_CONFIG, SyntheticCheckpoint, error_line, run, user_environment

from volo_convert import __version__
from volo_convert.checks.images import sample_images
from volo_convert.cli import cli
from volo_convert.weights import mapping


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_convert_writes_verified_file_and_report(
    sized_checkpoint: SyntheticCheckpoint, tmp_path: Path, suffix: str
) -> None:
    checkpoint, config = sized_checkpoint.path, sized_checkpoint.config
    output = tmp_path / f"{config.name}{suffix}"
    result = run(checkpoint, "-o", output, "--device", "cpu", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert f"VOLO {config.name} at 32px, {config.num_classes} classes" in result.output
    assert "PASS" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "passed" and report["variant"] == config.name
    assert report["parity"]["max_abs_diff"] <= 2e-5
    assert report["parity"]["top1_agreement"] == 1.0
    assert leftovers(tmp_path) == sorted([output.name, "r.json"])
    reloaded = keras.models.load_model(output, compile=False)
    images = sample_images(1, 32, seed=4)
    assert np.isfinite(keras.ops.convert_to_numpy(reloaded.predict_on_batch(images))).all()


def _without_timings(text: str, output: Path) -> list[str]:
    """Output lines with the output path and the durations, which differ between runs, cut."""
    text = text.replace(str(output), "OUTPUT")
    return [re.sub(r"\d+\.\ds\b", "N.Ns", line) for line in text.splitlines()]


@pytest.mark.large
def test_convert_subcommand_and_module_entry_agree(d1_checkpoint: Path, tmp_path: Path) -> None:
    """`volo-convert convert CKPT`, `volo-convert CKPT` and `python -m volo_convert CKPT`
    print the same lines and write the same model."""
    outputs = [tmp_path / f"{name}.h5" for name in ("subcommand", "default", "module")]
    subcommand = run("convert", d1_checkpoint, "-o", outputs[0], "--no-verify")
    default = run(d1_checkpoint, "-o", outputs[1], "--no-verify")
    module = subprocess.run(
        [sys.executable, "-m", "volo_convert", d1_checkpoint, "-o", outputs[2], "--no-verify"],
        capture_output=True,
        text=True,
        env=user_environment(PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    assert (subcommand.exit_code, default.exit_code, module.returncode) == (0, 0, 0)
    printed = [
        _without_timings(subcommand.stdout, outputs[0]),
        _without_timings(default.stdout, outputs[1]),
        _without_timings(module.stdout, outputs[2]),
    ]
    assert printed[0] == printed[1] == printed[2]
    assert "not verified (--no-verify)" in printed[0]
    models = [keras.models.load_model(output, compile=False) for output in outputs]
    for weights in zip(*(model.get_weights() for model in models), strict=True):
        np.testing.assert_array_equal(weights[0], weights[1])
        np.testing.assert_array_equal(weights[0], weights[2])


def test_verify_command_passes_then_warns_and_fails_on_wrong_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from volo_convert.synthetic import write_checkpoint

    converted = tmp_path / "tiny.keras"
    assert run(tiny_checkpoint, "-o", converted, "--no-verify").exit_code == 0
    result = run(
        "verify", converted, tiny_checkpoint, "--device", "cpu", "--report", tmp_path / "v.json",
        "--junit", tmp_path / "v.xml",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    assert json.loads((tmp_path / "v.json").read_text())["status"] == "passed"
    (case,) = ElementTree.parse(tmp_path / "v.xml").iter("testcase")
    assert case.get("name") == f"{tiny_checkpoint.name} -> {converted}"
    assert list(case) == case.findall("properties") + case.findall("system-out")
    figures = case.find("properties/property[@name='figures']").get("value")
    assert re.fullmatch(
        r"max abs diff \S+ \(atol 0.0001\), top-1 agreement 100% \(2 images\)", figures
    )

    other = write_checkpoint(tmp_path / "other.pth.tar", TINY_CONFIG, 32, seed=99)
    result = run("verify", converted, other, "--device", "cpu", "--junit", tmp_path / "w.xml")
    assert result.exit_code == 1
    warning = (
        f"Warning: {other} is not the checkpoint {converted} was converted from (SHA-256 "
        f"{hashlib.sha256(other.read_bytes()).hexdigest()[:12]}, recorded "
        f"{hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()[:12]}); verifying anyway"
    )
    lines = result.output.splitlines()
    assert lines[0] == warning  # before any figure: it is given while loading
    assert lines.count(warning) == 1
    assert error_line(result).startswith("Error: parity failed: max abs diff")
    assert "exceeds atol 0.0001" in error_line(result)
    assert "first stage out of tolerance: stem" in error_line(result)  # every weight differs
    suite = ElementTree.parse(tmp_path / "w.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "1", "0")
    failure = suite.find("testcase/failure")
    assert failure.get("message") == "verifying: " + error_line(result).removeprefix("Error: ")
    assert suite.find("testcase/system-out").text.startswith(warning)


def test_wrong_mapping_transform_fails_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = mapping.load_tables()
    broken = [
        mapping.MappingTable(
            table.source,
            table.scope,
            tuple(
                dataclasses.replace(row, transform="identity")
                if row.keras.endswith("attn_v/kernel")
                else row
                for row in table.rows
            ),
        )
        for table in tables
    ]
    monkeypatch.setattr(mapping, "load_tables", lambda: broken)
    output = tmp_path / "d1.h5"
    result = run(tiny_checkpoint, "-o", output, "--device", "cpu")
    assert result.exit_code == 1
    assert "Error: parity failed" in result.output
    assert f"nothing was written at {output}" in result.output
    assert leftovers(tmp_path) == []


def test_a_newline_in_the_output_name_is_escaped_in_the_summary(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    output = tmp_path / "new\nline.h5"
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert result.exit_code == 0, result.output
    assert output.is_file()
    named = [line for line in result.output.splitlines() if "line.h5" in line]
    assert len(named) == 1
    assert named[0].startswith(f"{tiny_checkpoint} -> {tmp_path}/new\\nline.h5: VOLO tiny at 32px")


def test_missing_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run(tmp_path / "nope.pth.tar", "-o", tmp_path / "x.h5")
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {tmp_path / 'nope.pth.tar'}: no such file"
    assert leftovers(tmp_path) == []


def test_existing_output_is_not_overwritten(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1.h5"
    output.write_bytes(b"precious")
    result = run(tiny_checkpoint, "-o", output)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {output}: already exists; pass --overwrite to replace it"
    assert output.read_bytes() == b"precious"


def test_unknown_extension_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.onnx")
    assert result.exit_code == 2
    assert "unknown output extension '.onnx', expected one of .h5, .keras" in error_line(result)


def test_not_volo_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    checkpoint = tmp_path / "resnet.pth"
    torch.save(
        {"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, checkpoint
    )
    result = run(checkpoint, "-o", tmp_path / "x.h5")
    assert result.exit_code == 2
    assert (
        "not a VOLO checkpoint: expected tensors such as patch_embed.conv.0.weight" in result.output
    )


@pytest.mark.parametrize("command", ["", *cli.commands])
def test_every_command_has_help_with_example(command: str) -> None:
    result = run(*([command] if command else []), "-h")
    assert result.exit_code == 0, command
    assert "Example:" in result.output, command


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"volo-convert, version {__version__}\n"


def test_help_lists_the_exit_codes() -> None:
    result = run("-h")
    assert result.exit_code == 0
    assert re.sub(r"-\s+", "-", " ".join(result.output.split())).endswith(
        "Exit codes: 0 passed, 1 parity failed, 2 bad input or usage, 3 a bug in volo-convert "
        "(please report it), 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."
    )
