"""What every benchmark here states beside its figures: how loaded the machine was, and its limit.

One load guard for all scripts: a benchmark refuses to start when the 1-minute load average is
above `--max-load` (0.5 by default, for the 2-core machines we share), unless `--allow-busy` is
given, in which case it runs and its table is flagged. The machine's own limit is measured the
same way for every script: a large float32 (and bfloat16) matmul in PyTorch and in TensorFlow
(and, for the inference benchmark's other contenders, in ONNX Runtime and LiteRT), each in a
fresh process, so a ratio always has its ceiling next to it; for the conversion
scripts, the I/O floor (imports, torch.load, an h5py write of the same tensors).

    python scripts/quiet_machine.py --threads 2     # print the load and the matmul rates
    python scripts/quiet_machine.py --frameworks torch tensorflow onnxruntime litert
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_LOAD = 0.5  # 1-minute load average on 2 cores; above it a figure is not a result
EXIT_BUSY = 4  # a benchmark refused to start on a busy machine

# Each program prints GFLOP/s of an N x N matmul (2 N^3 FLOP), the median of 7 timed runs.
_MATMUL_PROGRAMS = {
    "torch": """
import statistics, sys, time, torch
size, threads, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
torch.set_num_threads(threads)
a = torch.randn(size, size).to(dtype); b = torch.randn(size, size).to(dtype)
for _ in range(3): a @ b
times = []
for _ in range(7):
    started = time.perf_counter(); a @ b; times.append(time.perf_counter() - started)
print(2 * size**3 / statistics.median(times) / 1e9)
""",
    "tensorflow": """
import os, statistics, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
size, threads, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(tf, sys.argv[3])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
a = tf.cast(tf.random.normal((size, size)), dtype)
b = tf.cast(tf.random.normal((size, size)), dtype)
matmul = tf.function(lambda x, y: tf.matmul(x, y))
for _ in range(3): matmul(a, b).numpy()
times = []
for _ in range(7):
    started = time.perf_counter(); matmul(a, b).numpy(); times.append(time.perf_counter() - started)
print(2 * size**3 / statistics.median(times) / 1e9)
""",
    # The benchmark dependencies (the `bench` extra): B is a constant, as a model's weights
    # are, so each runtime may prepack it the way it does in the model.
    "onnxruntime": """
import statistics, sys, time
import numpy as np, onnxruntime
from onnx import TensorProto, helper, numpy_helper
size, threads, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
generator = np.random.default_rng(0)
a = generator.standard_normal((size, size), dtype=np.float32)
b = numpy_helper.from_array(generator.standard_normal((size, size), dtype=np.float32), "b")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], [b])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
options = onnxruntime.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
session = onnxruntime.InferenceSession(
    model.SerializeToString(), options, providers=["CPUExecutionProvider"])
for _ in range(3): session.run(None, {"a": a})
times = []
for _ in range(7):
    started = time.perf_counter(); session.run(None, {"a": a})
    times.append(time.perf_counter() - started)
print(2 * size**3 / statistics.median(times) / 1e9)
""",
    "litert": """
import os, statistics, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
size, threads, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
generator = np.random.default_rng(0)
b = tf.constant(generator.standard_normal((size, size), dtype=np.float32))
matmul = tf.function(lambda a: tf.matmul(a, b), input_signature=[tf.TensorSpec([size, size])])
converter = tf.lite.TFLiteConverter.from_concrete_functions(
    [matmul.get_concrete_function()], matmul)
interpreter = Interpreter(model_content=converter.convert(), num_threads=threads)
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                       generator.standard_normal((size, size), dtype=np.float32))
for _ in range(3): interpreter.invoke()
times = []
for _ in range(7):
    started = time.perf_counter(); interpreter.invoke(); times.append(time.perf_counter() - started)
print(2 * size**3 / statistics.median(times) / 1e9)
""",
}
# The sizes at which each reaches its peak
MATMUL_SIZES = {"torch": 4096, "tensorflow": 2048, "onnxruntime": 2048, "litert": 2048}
MATMUL_DTYPES = {  # the dtypes each program can time
    "torch": ("float32", "bfloat16"),
    "tensorflow": ("float32", "bfloat16"),
    "onnxruntime": ("float32",),
    "litert": ("float32",),
}
DEFAULT_FRAMEWORKS = ("torch", "tensorflow")

# The I/O floor of a conversion: import the libraries, read the checkpoint with torch.load and
# write the same tensors with h5py. No converter can take less.
IO_FLOOR_PROGRAM = """
import sys
import h5py, keras, tensorflow, torch
state_dict = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
with h5py.File(sys.argv[2], "w") as output:
    for name, tensor in state_dict.items():
        output.create_dataset(name, data=tensor.numpy())
"""


@dataclass(frozen=True)
class Load:
    """The 1-minute load average when a benchmark started, and whether that was too busy."""

    average: float
    max_load: float

    @property
    def busy(self) -> bool:
        return self.average > self.max_load

    def note(self) -> str:
        """One line for the top of a table."""
        line = f"1-min load average {self.average:.2f} at the start ({os.cpu_count()} cores)"
        if self.busy:
            line += f": ABOVE {self.max_load}, a busy machine; these figures are not a result"
        return line


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The two options every benchmark takes about the load."""
    parser.add_argument(
        "--max-load",
        type=float,
        default=DEFAULT_MAX_LOAD,
        help=f"refuse to start above this 1-minute load average (default {DEFAULT_MAX_LOAD})",
    )
    parser.add_argument(
        "--allow-busy", action="store_true", help="run on a busy machine, and flag the table"
    )


def require_quiet(args: argparse.Namespace) -> Load:
    """The load now; exits with EXIT_BUSY when it is too high and --allow-busy is not given."""
    load = Load(os.getloadavg()[0], args.max_load)
    if load.busy and not args.allow_busy:
        print(
            f"refusing to measure: {load.note()}; wait for a quiet machine, "
            "or pass --allow-busy to flag the figures",
            file=sys.stderr,
        )
        sys.exit(EXIT_BUSY)
    return load


def matmul_rate(framework: str, threads: int, dtype: str = "float32") -> float:
    """GFLOP/s of a large matmul in `framework` (a key of MATMUL_SIZES), in a fresh process."""
    size = MATMUL_SIZES[framework]
    command = [sys.executable, "-c", _MATMUL_PROGRAMS[framework], str(size), str(threads), dtype]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(printed.split()[-1])


def matmul_rates(
    threads: int,
    dtypes: tuple[str, ...] = ("float32",),
    frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS,
) -> dict[str, float]:
    """Maps "framework dtype" to GFLOP/s, for each framework and each dtype it can time."""
    return {
        f"{framework} {dtype}": matmul_rate(framework, threads, dtype)
        for dtype in dtypes
        for framework in frameworks
        if dtype in MATMUL_DTYPES[framework]
    }


def measure(command: list[str]) -> tuple[float, int]:
    """Runs `command` as a child; returns its wall seconds and its own peak RSS in bytes."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def io_floor_command(checkpoint: Path, output: Path) -> list[str]:
    """The command that measures the I/O floor of converting `checkpoint` (see IO_FLOOR_PROGRAM)."""
    return [sys.executable, "-c", IO_FLOOR_PROGRAM, str(checkpoint), str(output)]


def limit_line(rates: dict[str, float]) -> str:
    """The machine's matmul rates as one line."""
    shown = ", ".join(f"{name} {gflops:.0f}" for name, gflops in rates.items())
    return f"machine limit, large matmul GFLOP/s: {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bfloat16", action="store_true", help="measure bfloat16 matmuls too")
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=list(_MATMUL_PROGRAMS),
        default=list(DEFAULT_FRAMEWORKS),
        help="onnxruntime and litert need the `bench` extra (default: torch tensorflow)",
    )
    parser.add_argument("--json", action="store_true")
    add_load_arguments(parser)
    args = parser.parse_args()
    load = require_quiet(args)
    dtypes = ("float32", "bfloat16") if args.bfloat16 else ("float32",)
    rates = matmul_rates(args.threads, dtypes, tuple(args.frameworks))
    if args.json:
        print(json.dumps({"load_average": load.average, "busy": load.busy, "gflops": rates}))
    else:
        print(load.note())
        print(limit_line(rates))


if __name__ == "__main__":
    main()
