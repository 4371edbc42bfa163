"""Which delegates can run a TFLite file: the GPU delegate, XNNPACK, and the largest rank.

Three facts, each read from the file itself:
- GPU-delegate compatibility as TensorFlow's model analyzer judges it, with the operators
  it flags. The analyzer checks each operator's type and options; it does not check
  tensor ranks, which the GPU delegate limits to 4 for most operators, so the largest
  rank is reported beside it.
- How much of the graph XNNPACK takes: the interpreter applies the XNNPACK delegate when
  it loads a file, replacing runs of supported nodes by one delegate node each. Nodes
  outside every such partition run in the interpreter's own kernels, one at a time.
- The largest tensor rank in the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import Any

from volo_convert.compat import interpreter_nodes
from volo_convert.formats.tflite_flatbuffer import schema
from volo_convert.provenance import describe_delegates

DELEGATE_OPERATOR = "DELEGATE"  # what the interpreter names a node a delegate took over
_OPERATOR_LINE = re.compile(r"^\s*Op#(\d+) (\w+)\(")
_GPU_WARNING = "GPU COMPATIBILITY WARNING: "
_GPU_VERDICT = "looks compatible with GPU delegate"
_SUBGRAPH_WARNING = re.compile(r"^GPU COMPATIBILITY WARNING: Subgraph#\d+ has GPU delegate")


@dataclasses.dataclass(frozen=True)
class DelegateReport:
    """What runs a TFLite file where.

    `gpu_flagged` names each operator the analyzer flags, as `Op#N NAME: reason`.
    `xnnpack_nodes` of `nodes` run inside `xnnpack_partitions` XNNPACK delegate nodes.
    """

    gpu_compatible: bool
    gpu_flagged: tuple[str, ...]
    xnnpack_nodes: int
    nodes: int
    xnnpack_partitions: int
    max_tensor_rank: int

    def to_dict(self) -> dict[str, Any]:
        """The report as reports and provenance records store it."""
        return {**dataclasses.asdict(self), "gpu_flagged": list(self.gpu_flagged)}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> DelegateReport:
        """The inverse of `to_dict`."""
        return cls(**{**document, "gpu_flagged": tuple(document["gpu_flagged"])})

    def summary(self) -> str:
        """One line, as `inspect` and the printed summary show it (`describe_delegates`)."""
        return describe_delegates(self.to_dict())


def gpu_compatibility(content: bytes) -> tuple[bool, tuple[str, ...]]:
    """The model analyzer's verdict on the GPU delegate, and the operators it flags."""
    import tensorflow as tf

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tf.lite.experimental.Analyzer.analyze(model_content=content, gpu_compatibility=True)
    return parse_gpu_analysis(printed.getvalue())


def parse_gpu_analysis(analysis: str) -> tuple[bool, tuple[str, ...]]:
    """(compatible, flagged operators) from the text the model analyzer prints.

    The analyzer prints each operator as `Op#N NAME(...)`, follows one it flags with a
    `GPU COMPATIBILITY WARNING: reason` line, and ends with a verdict line.
    """
    flagged, operator = [], "an operator"
    for line in analysis.splitlines():
        match = _OPERATOR_LINE.match(line)
        if match:
            operator = f"Op#{match[1]} {match[2]}"
        elif line.startswith(_GPU_WARNING) and not _SUBGRAPH_WARNING.match(line):
            flagged.append(f"{operator}: {line.removeprefix(_GPU_WARNING).strip()}")
    compatible = _GPU_VERDICT in analysis
    return compatible and not flagged, tuple(flagged)


def _executed(operators: list[dict[str, Any]], outputs: list[int]) -> set[int]:
    """The indices of the nodes a loaded interpreter runs: its own kernels and delegates.

    `operators` are the interpreter's node details (`index`, `op_name`, `inputs`,
    `outputs`), the file's nodes followed by the delegate nodes that replaced some of
    them; `outputs` are the graph's output tensors. The nodes it runs are found by walking
    back from the outputs: a tensor a delegate node produces comes from that node, so the
    nodes it replaced are never reached.
    """
    producers: dict[int, dict[str, Any]] = {}
    for operator in sorted(operators, key=lambda op: op["op_name"] == DELEGATE_OPERATOR):
        for tensor in operator["outputs"]:
            producers[tensor] = operator  # delegate nodes last: they win
    executed: set[int] = set()
    pending, seen = list(outputs), set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor not in producers:
            continue  # an input, a constant, or a tensor already followed
        seen.add(tensor)
        operator = producers[tensor]
        if operator["index"] not in executed:
            executed.add(operator["index"])
            pending.extend(index for index in operator["inputs"] if index >= 0)
    return executed


def nodes_run_alone(operators: list[dict[str, Any]], outputs: list[int]) -> list[dict[str, Any]]:
    """The file's nodes a loaded interpreter runs in its own kernels, outside every delegate
    (`_executed` says what `operators` and `outputs` are)."""
    executed = _executed(operators, outputs)
    return [
        op for op in operators if op["op_name"] != DELEGATE_OPERATOR and op["index"] in executed
    ]


def xnnpack_coverage(operators: list[dict[str, Any]], outputs: list[int]) -> tuple[int, int, int]:
    """(nodes XNNPACK runs, all nodes, XNNPACK partitions) of a loaded interpreter
    (`_executed` says what `operators` and `outputs` are)."""
    executed = _executed(operators, outputs)
    delegated = [op for op in operators if op["op_name"] == DELEGATE_OPERATOR]
    file_nodes = [op for op in operators if op["op_name"] != DELEGATE_OPERATOR]
    run_alone = sum(1 for op in file_nodes if op["index"] in executed)
    partitions = sum(1 for op in delegated if op["index"] in executed)
    return len(file_nodes) - run_alone, len(file_nodes), partitions


def max_tensor_rank(content: bytes) -> int:
    """The largest rank of any tensor in the flatbuffer's subgraphs."""
    flatbuffer = schema().Model.GetRootAsModel(content, 0)
    return max(
        (
            subgraph.Tensors(index).ShapeLength()
            for subgraph in map(flatbuffer.Subgraphs, range(flatbuffer.SubgraphsLength()))
            for index in range(subgraph.TensorsLength())
        ),
        default=0,
    )


def delegate_report(content: bytes, interpreter: Any) -> DelegateReport:
    """The delegate report of a flatbuffer, `interpreter` having loaded and allocated it."""
    compatible, flagged = gpu_compatibility(content)
    outputs = [details["index"] for details in interpreter.get_output_details()]
    delegated, nodes, partitions = xnnpack_coverage(interpreter_nodes(interpreter), outputs)
    return DelegateReport(
        gpu_compatible=compatible,
        gpu_flagged=flagged,
        xnnpack_nodes=delegated,
        nodes=nodes,
        xnnpack_partitions=partitions,
        max_tensor_rank=max_tensor_rank(content),
    )
