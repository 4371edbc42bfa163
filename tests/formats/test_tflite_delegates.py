"""The delegate report: the model analyzer's GPU verdict read, XNNPACK's share counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, error_line, run, snapshot

from volo_convert.architecture import variants
from volo_convert.formats import tflite_delegates
from volo_convert.formats.tflite_delegates import (
    DelegateReport,
    parse_gpu_analysis,
    xnnpack_coverage,
)

# The GPU delegate runs tensors of rank 4 (5 for some ops); outlook attention stays at 5.
MAX_GPU_RANK = 5

# The shape of the analyzer's text around a flagged operator (TensorFlow's own analyzer
# test checks these lines for a model with a Flex op).
FLAGGED_ANALYSIS = """\
Subgraph#0 main(T#0) -> [T#3]
  Op#0 FlexAddV2(T#0, T#1) -> [T#2]
GPU COMPATIBILITY WARNING: Not supported custom op FlexAddV2
  Op#1 ADD(T#2, T#1) -> [T#3]

GPU COMPATIBILITY WARNING: Subgraph#0 has GPU delegate compatibility issues at nodes 0 on \
TFLite runtime version 2.21.0
"""
COMPATIBLE_ANALYSIS = """\
Subgraph#0 main(T#0) -> [T#2]
  Op#0 ADD(T#0, T#1) -> [T#2]

Your model looks compatible with GPU delegate on TFLite runtime version 2.21.0.
"""


def test_a_flagged_operator_is_named_with_its_reason() -> None:
    assert parse_gpu_analysis(FLAGGED_ANALYSIS) == (
        False,
        ("Op#0 FlexAddV2: Not supported custom op FlexAddV2",),
    )


def test_the_analyzers_verdict_alone_makes_a_file_compatible() -> None:
    assert parse_gpu_analysis(COMPATIBLE_ANALYSIS) == (True, ())
    assert parse_gpu_analysis("Subgraph#0 main(T#0) -> [T#1]\n") == (False, ())


def _node(index: int, name: str, inputs: list[int], outputs: list[int]) -> dict:
    return {"index": index, "op_name": name, "inputs": inputs, "outputs": outputs}


def test_xnnpack_coverage_counts_the_nodes_its_partitions_replaced() -> None:
    # 0 -> a -> 1 -> b -> 2 -> c -> 3 -> d -> 4; XNNPACK took a and b (one partition) and
    # d (another); c runs alone. The delegate nodes follow the file's nodes.
    nodes = [
        _node(0, "FULLY_CONNECTED", [0, -1], [1]),
        _node(1, "ADD", [1, 9], [2]),
        _node(2, "STRIDED_SLICE", [2], [3]),
        _node(3, "MUL", [3, 9], [4]),
        _node(4, "DELEGATE", [0, 9], [2]),
        _node(5, "DELEGATE", [3, 9], [4]),
    ]
    assert xnnpack_coverage(nodes, outputs=[4]) == (3, 4, 2)
    assert xnnpack_coverage(nodes[:4], outputs=[4]) == (0, 4, 0)


def test_the_report_round_trips_and_reads_in_one_line() -> None:
    report = DelegateReport(
        gpu_compatible=False,
        gpu_flagged=("Op#0 FlexAddV2: Not supported custom op FlexAddV2",),
        xnnpack_nodes=3,
        nodes=4,
        xnnpack_partitions=2,
        max_tensor_rank=5,
    )
    assert DelegateReport.from_dict(report.to_dict()) == report
    assert report.summary() == (
        "GPU delegate not compatible (1 ops flagged: Op#0 FlexAddV2: Not supported custom op "
        "FlexAddV2); XNNPACK 3 of 4 nodes (2 partitions); largest tensor rank 5"
    )


@pytest.fixture
def tiny_checkpoint(tiny_state_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny configuration, made a variant volo-convert detects, as a checkpoint file."""
    monkeypatch.setitem(variants.VARIANTS, "tiny", TINY_CONFIG)
    checkpoint = tmp_path / "in" / "tiny.pth"
    checkpoint.parent.mkdir()
    torch.save(tiny_state_dict, checkpoint)
    return checkpoint


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_files_stay_gpu_compatible_and_record_it(
    dtype: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Locks in today's verdict: the float32 and float16 files run on the GPU delegate, with
    no tensor above rank 5, and XNNPACK takes most of the graph."""
    output = tmp_path / f"tiny_{dtype}.tflite"
    result = run(
        tiny_checkpoint, "-o", output, "--tflite-dtype", dtype, "--device", "cpu",
        "--require-gpu-compatible", "--report", tmp_path / "report.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = json.loads(run("inspect", "--json", output).output)["delegates"]
    assert recorded == json.loads((tmp_path / "report.json").read_text())["delegates"]
    report = DelegateReport.from_dict(recorded)
    assert (report.gpu_compatible, report.gpu_flagged) == (True, ())
    assert report.max_tensor_rank <= MAX_GPU_RANK
    assert 0.5 * report.nodes < report.xnnpack_nodes <= report.nodes
    assert report.xnnpack_partitions >= 1
    assert f"delegates       {report.summary()}" in result.output.splitlines()
    assert f"delegates  {report.summary()}" in run("inspect", output).output.splitlines()


def test_require_gpu_compatible_refuses_a_flagged_file_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flagged = ("Op#7 RESHAPE: Not supported reshape",)
    monkeypatch.setattr(tflite_delegates, "gpu_compatibility", lambda content: (False, flagged))
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    output = out / "tiny.tflite"
    result = run(tiny_checkpoint, "-o", output, "--device", "cpu", "--require-gpu-compatible")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: the TFLite file is not GPU-delegate compatible "
        "(--require-gpu-compatible): Op#7 RESHAPE: Not supported reshape"
    )
    assert snapshot(tmp_path) == before
    # without the flag the same file is written, its verdict recorded
    assert run(tiny_checkpoint, "-o", output, "--device", "cpu").exit_code == 0
    recorded = json.loads(run("inspect", "--json", output).output)["delegates"]
    assert (recorded["gpu_compatible"], recorded["gpu_flagged"]) == (False, list(flagged))


def test_require_gpu_compatible_needs_a_tflite_output(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    before = snapshot(tmp_path)
    result = run(tiny_checkpoint, "-o", tmp_path / "tiny.h5", "--require-gpu-compatible")
    assert result.exit_code == 2
    assert error_line(result) == "Error: --require-gpu-compatible applies to .tflite outputs only"
    assert snapshot(tmp_path) == before
