"""The delegate report: the model analyzer's GPU verdict read, XNNPACK's share counted."""

from __future__ import annotations

from volo_convert.formats.tflite_delegates import (
    DelegateReport,
    parse_gpu_analysis,
    xnnpack_coverage,
)

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
        "GPU delegate: not compatible (1 ops flagged: Op#0 FlexAddV2: Not supported custom op "
        "FlexAddV2); XNNPACK: 3 of 4 nodes (2 partitions); largest tensor rank 5"
    )
