"""Inference speed of the converted VOLO against PyTorch and ONNX Runtime, beside matmul rates.

Contenders, all built from the same synthetic release-format weights:

- PyTorch float32 (`inference_mode`), the baseline every time ratio is against;
- the Keras model in float32 (with --bfloat16 also PyTorch under bfloat16 autocast and Keras
  built with `compute_dtype="bfloat16"`);
- ONNX Runtime: the PyTorch reference exported with torch's dynamo exporter (opset 18, dynamic
  batch dimension), run in onnxruntime's CPU provider with --threads intra-op threads;
- TFLite float32: the Keras model converted by the project (its file takes batch 1), or the
  float32 file given by --tflite-file, run under LiteRT with --threads threads; it is timed at
  the batch sizes its input signature takes.

ONNX Runtime and LiteRT are benchmark dependencies, not runtime ones: `pip install torch==2.13.0
'.[bench]'` in the checkout installs them (or leave them out with --contenders).

Each contender lives in its own process and builds its model once. Before anything is timed,
each one's logits are compared with the PyTorch reference's on the same seeded images; a float32
contender outside the project's float32 bar (DEFAULT_ATOL) is not timed, and the run exits 1.
The driver then asks the contenders in turn, round after round, to time one batch, so a
neighbour's load hits every contender alike, and reports the median over the rounds. Beside
each time: the GFLOP/s it achieves (matmul and convolution FLOPs counted from the model by
torch's FlopCounterMode, per image, at this resolution) and that rate as a share of its own
framework's large-matmul rate, measured in the same run (scripts/quiet_machine.py), so every
ratio has the machine's limit next to it.

    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 1 8 --threads 2
    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 8 --bfloat16
    python scripts/bench_inference.py --variant d3 --image-size 448 --batch-sizes 1 \
        --contenders keras
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quiet_machine import add_load_arguments, limit_line, matmul_rates, require_quiet

if TYPE_CHECKING:
    import numpy as np
    import torch

    from volo_convert.architecture.torch_reference import Volo
    from volo_convert.architecture.variants import VoloConfig

MIN_ROUNDS = 5
WARMUP_CALLS = 2
SETTLE_SECONDS = 0.2  # pause between contenders, so one's spinning threads do not slow the next
PARITY_IMAGES = 2  # compared with the reference before timing (or the batch a file takes)
PARITY_SEED = 2  # other images than the timed ones (seed 1)
ONNX_OPSET = 18
ANY_BATCH = "any"  # what a child answers when its model takes every batch size
EXIT_MISMATCH = 1  # a contender's logits did not match the reference: it was not timed
EXIT_USAGE = 2  # a contender's benchmark dependencies are not installed
INSTALL_HINT = (
    "pip install torch==2.13.0 '.[bench]' in the checkout (torch pinned, so that pip keeps "
    "the CPU wheel)"
)


@dataclass(frozen=True)
class Setup:
    """What every contender builds its model from: the same weights, threads and a folder."""

    config: VoloConfig
    image_size: int
    state_dict: dict[str, torch.Tensor]
    reference: Volo  # the PyTorch reference on those weights, for the baseline and parity
    threads: int
    workdir: Path  # for the files a contender writes (ONNX, TFLite); gone when it exits
    tflite_file: Path | None  # a float32 TFLite file to time instead of converting one


@dataclass(frozen=True)
class Runner:
    """A built model: B, S, S, 3 float32 images -> B, K float32 logits."""

    call: Callable[[np.ndarray], np.ndarray]
    batch_size: int | None = None  # the only batch size the model takes; None: any


@dataclass(frozen=True)
class Framework:
    """One way of running the model, in each compute dtype it offers."""

    names: dict[str, str]  # compute dtype -> the contender's name
    rate_framework: str  # the quiet_machine matmul program that bounds it
    build: Callable[[str, Setup], Runner]  # (compute dtype, setup) -> runner
    packages: tuple[str, ...] = ()  # benchmark dependencies beyond the project's own


@dataclass(frozen=True)
class Contender:
    """One way of running the model: its framework, and its compute dtype."""

    framework: str  # a key of FRAMEWORKS
    dtype: str  # "float32" or "bfloat16"

    @property
    def name(self) -> str:
        return FRAMEWORKS[self.framework].names[self.dtype]

    @property
    def rate_key(self) -> str:
        """The quiet_machine.matmul_rates entry that bounds this contender."""
        return f"{FRAMEWORKS[self.framework].rate_framework} {self.dtype}"


def _nchw(images: np.ndarray) -> torch.Tensor:
    """B, S, S, 3 numpy images -> B, 3, S, S torch tensor (a view)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2)  # B, 3, S, S


def _torch_runner(dtype: str, setup: Setup) -> Runner:
    """The PyTorch reference, in inference mode, under bfloat16 autocast for `bfloat16`."""
    import torch

    def torch_call(images: np.ndarray) -> np.ndarray:
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"),
        ):
            return setup.reference(_nchw(images)).float().numpy()

    return Runner(torch_call)


def _keras_model(dtype: str, setup: Setup) -> Any:
    """The converted Keras model in compute dtype `dtype`, with the weights ported."""
    from volo_convert.architecture.keras_model import build_volo
    from volo_convert.weights.mapping import weight_mappings
    from volo_convert.weights.porting import port_weights

    dtype_option = {"compute_dtype": dtype} if dtype != "float32" else {}
    model = build_volo(setup.config, setup.image_size, **dtype_option)
    port_weights(model, setup.state_dict, weight_mappings(setup.config))
    return model


def _keras_runner(dtype: str, setup: Setup) -> Runner:
    """The Keras model's predict_on_batch."""
    return Runner(_keras_model(dtype, setup).predict_on_batch)


def _onnx_runner(dtype: str, setup: Setup) -> Runner:
    """The reference exported to ONNX (dynamo exporter, dynamic batch), in onnxruntime's CPU
    provider with `setup.threads` intra-op threads."""
    import numpy as np
    import onnxruntime
    import torch

    from volo_convert.checks.images import sample_images

    assert dtype == "float32", dtype
    # Two images: an example batch of 1 would make the exporter fix the batch dimension at 1.
    example = _nchw(sample_images(2, setup.image_size)).contiguous()
    path = setup.workdir / "volo.onnx"
    program = torch.onnx.export(
        setup.reference,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(path))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = setup.threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def onnx_call(images: np.ndarray) -> np.ndarray:
        # The copy to the exported layout is timed, as a caller holding NHWC images pays it.
        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # B, 3, S, S
        return session.run(None, {"images": nchw})[0]

    return Runner(onnx_call)


def _tflite_runner(dtype: str, setup: Setup) -> Runner:
    """A float32 TFLite file under LiteRT with `setup.threads` threads: --tflite-file, or the
    Keras model converted by the project. It takes the batch its input signature names (the
    project's files: 1; a batch dimension of -1: any, resized on the first call at each)."""
    from ai_edge_litert.interpreter import Interpreter

    assert dtype == "float32", dtype
    path = setup.tflite_file
    if path is None:
        from volo_convert.formats.tflite import convert_to_tflite

        path = setup.workdir / "volo.tflite"
        path.write_bytes(convert_to_tflite(_keras_model(dtype, setup)))
    interpreter = Interpreter(model_path=str(path), num_threads=setup.threads)
    (input_details,) = interpreter.get_input_details()
    output_index = interpreter.get_output_details()[0]["index"]
    if input_details["dtype"].__name__ != "float32":
        raise SystemExit(f"{path}: takes {input_details['dtype'].__name__}, not float32 images")
    file_batch = int(input_details["shape_signature"][0])  # -1: any batch size
    allocated = [0]  # the batch size the interpreter's tensors are allocated for

    def tflite_call(images: np.ndarray) -> np.ndarray:
        if len(images) != allocated[0]:
            interpreter.resize_tensor_input(input_details["index"], list(images.shape))
            interpreter.allocate_tensors()
            allocated[0] = len(images)
        interpreter.set_tensor(input_details["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    return Runner(tflite_call, None if file_batch == -1 else file_batch)


FRAMEWORKS = {
    "torch": Framework(
        {"float32": "PyTorch inference_mode", "bfloat16": "PyTorch bfloat16 autocast"},
        "torch",
        _torch_runner,
    ),
    "keras": Framework(
        {"float32": "Keras predict_on_batch", "bfloat16": "Keras compute_dtype=bfloat16"},
        "tensorflow",
        _keras_runner,
    ),
    "onnxruntime": Framework(
        {"float32": "ONNX Runtime (CPU provider)"},
        "onnxruntime",
        _onnx_runner,
        ("onnxruntime", "onnx", "onnxscript"),
    ),
    "tflite": Framework(
        {"float32": "TFLite float32 (LiteRT)"}, "litert", _tflite_runner, ("ai-edge-litert",)
    ),
}
BASELINE = Contender("torch", "float32")


def _flops_per_image(setup: Setup) -> float:
    """Matmul and convolution FLOPs of one image through the PyTorch reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from volo_convert.checks.images import sample_images

    call = _torch_runner(BASELINE.dtype, setup).call
    with FlopCounterMode(display=False) as counter:
        call(sample_images(1, setup.image_size, seed=1))
    return float(counter.get_total_flops())


def _max_abs_diff(runner: Runner, setup: Setup) -> float:
    """Largest difference between the runner's logits and the reference's, on seeded images."""
    import numpy as np

    from volo_convert.checks.images import sample_images

    images = sample_images(runner.batch_size or PARITY_IMAGES, setup.image_size, PARITY_SEED)
    expected = _torch_runner(BASELINE.dtype, setup).call(images)
    logits = np.asarray(runner.call(images), dtype=np.float32)
    return float(np.max(np.abs(logits - expected)))


def serve(contender: Contender, args: argparse.Namespace) -> None:
    """Child process: builds the model, then answers one request per line read from stdin:
    a batch size (seconds for one batch), `parity` (max abs diff against the reference) or
    `flops` (per image)."""
    # The answers go to the real stdout; what libraries print (the ONNX exporter, the TFLite
    # converter) goes to stderr, where it cannot be taken for an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    # TensorFlow's threads are set first, before torch is imported, as in a Keras server.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import torch

    from volo_convert.architecture.variants import VARIANTS
    from volo_convert.checks.images import sample_images
    from volo_convert.checks.reference import build_reference
    from volo_convert.synthetic import make_state_dict

    torch.set_num_threads(args.threads)
    config = VARIANTS[args.variant]
    state_dict = make_state_dict(config, args.image_size)
    reference = build_reference(config, args.image_size, state_dict, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="volo-bench-") as workdir:
        setup = Setup(
            config,
            args.image_size,
            state_dict,
            reference,
            args.threads,
            Path(workdir),
            args.tflite_file,
        )
        runner = FRAMEWORKS[contender.framework].build(contender.dtype, setup)
        print(f"ready {runner.batch_size or ANY_BATCH}", file=answers)
        batches: dict[int, Any] = {}
        for request in sys.stdin:
            if request.strip() == "flops":
                print(_flops_per_image(setup), file=answers)
                continue
            if request.strip() == "parity":
                print(_max_abs_diff(runner, setup), file=answers)
                continue
            batch_size = int(request)
            if batch_size not in batches:
                batches[batch_size] = sample_images(batch_size, args.image_size, seed=1)
                for _ in range(WARMUP_CALLS):
                    runner.call(batches[batch_size])
            started = time.perf_counter()
            runner.call(batches[batch_size])
            print(time.perf_counter() - started, file=answers)


class Child:
    """A contender's serving process, asked over a pipe."""

    def __init__(self, contender: Contender, args: argparse.Namespace) -> None:
        command = [
            sys.executable,
            __file__,
            "--serve",
            f"{contender.framework}:{contender.dtype}",
            "--variant",
            args.variant,
            "--image-size",
            str(args.image_size),
            "--threads",
            str(args.threads),
        ]
        if args.tflite_file is not None:
            command += ["--tflite-file", str(args.tflite_file)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        ready, _, batch_size = self._read().partition(" ")
        if ready != "ready":
            raise SystemExit(f"{contender.name}: its process failed to start")
        self.batch_size = None if batch_size == ANY_BATCH else int(batch_size)

    def _read(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def takes(self, batch_size: int) -> bool:
        """Whether the contender's model takes batches of `batch_size`."""
        return self.batch_size in (None, batch_size)

    def ask(self, request: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


@dataclass(frozen=True)
class Measurement:
    """What one run found: medians, the model's FLOPs, parity, and what was left out."""

    medians: dict[tuple[int, Contender], float]  # median seconds per batch
    flops: float  # per image
    diffs: dict[Contender, float]  # max abs diff against the reference, each non-baseline
    mismatched: list[Contender]  # outside the bar: not timed
    batch_sizes: dict[Contender, int | None]  # the only batch a contender takes; None: any


def parity_bar(contender: Contender) -> float | None:
    """The max abs diff a contender must stay within to be timed; None: no bar (bfloat16)."""
    from volo_convert.options import default_atol

    return default_atol(contender.dtype) if contender.dtype == "float32" else None


def measure(args: argparse.Namespace, contenders: list[Contender]) -> Measurement:
    """Starts the contenders, checks their parity, then times them in alternating rounds."""
    children: dict[Contender, Child] = {}
    try:
        for contender in contenders:
            children[contender] = Child(contender, args)
        diffs = {
            contender: child.ask("parity")
            for contender, child in children.items()
            if contender != BASELINE
        }
        mismatched = [
            contender
            for contender, diff in diffs.items()
            if (bar := parity_bar(contender)) is not None and not diff <= bar
        ]
        timed = {
            contender: child for contender, child in children.items() if contender not in mismatched
        }
        samples: dict[tuple[int, Contender], list[float]] = {}
        for batch_size in args.batch_sizes:
            for round_index in range(args.rounds):
                for contender, child in timed.items():
                    if child.takes(batch_size):
                        time.sleep(SETTLE_SECONDS)
                        seconds = child.ask(str(batch_size))
                        samples.setdefault((batch_size, contender), []).append(seconds)
                print(f"batch {batch_size}: round {round_index + 1}/{args.rounds}", file=sys.stderr)
        flops = children[BASELINE].ask("flops")
    finally:
        for child in children.values():
            child.close()
    return Measurement(
        {key: statistics.median(values) for key, values in samples.items()},
        flops,
        diffs,
        mismatched,
        {contender: child.batch_size for contender, child in children.items()},
    )


def require_packages(frameworks: list[str]) -> None:
    """Exits with EXIT_USAGE, saying how to install them, if a framework's packages are missing."""
    for framework in frameworks:
        missing = []
        for package in FRAMEWORKS[framework].packages:
            try:
                importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                missing.append(package)
        if missing:
            print(
                f"Error: {FRAMEWORKS[framework].names['float32']} needs {', '.join(missing)}, "
                f"not installed here. They are benchmark dependencies: {INSTALL_HINT}; or "
                f"leave it out with --contenders",
                file=sys.stderr,
            )
            sys.exit(EXIT_USAGE)


def dependency_line(frameworks: list[str]) -> str:
    """The versions of the benchmark dependencies in use, in one line."""
    packages = [package for framework in frameworks for package in FRAMEWORKS[framework].packages]
    shown = ", ".join(f"{package} {importlib.metadata.version(package)}" for package in packages)
    return f"benchmark dependencies: {shown or 'none'}"


def parity_line(measurement: Measurement) -> str:
    """Each contender's max abs diff against the reference, with its bar."""
    shown = []
    for contender, diff in measurement.diffs.items():
        bar = parity_bar(contender)
        verdict = (
            "no bar"
            if bar is None
            else "NOT TIMED"
            if contender in measurement.mismatched
            else "ok"
        )
        shown.append(f"{contender.name} {diff:.2e} ({verdict})")
    return (
        f"parity against the PyTorch reference, max abs diff of the logits on "
        f"{PARITY_IMAGES} seeded images (a batch-N file: N), float32 bar "
        f"{parity_bar(BASELINE):.0e}: {', '.join(shown)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bfloat16", action="store_true", help="time both in bfloat16 too")
    others = [framework for framework in FRAMEWORKS if framework != BASELINE.framework]
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=others,
        default=others,
        help="who runs beside PyTorch float32 (default: all; onnxruntime and tflite need the "
        "`bench` extra)",
    )
    parser.add_argument(
        "--tflite-file",
        type=Path,
        help="a float32 TFLite file of the same synthetic checkpoint to time (e.g. one that "
        "takes a batch), instead of the batch-1 file converted here",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    add_load_arguments(parser)
    args = parser.parse_args()
    if args.serve:
        framework, dtype = args.serve.split(":")
        serve(Contender(framework, dtype), args)
        return
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    if args.tflite_file is not None:
        args.tflite_file = args.tflite_file.resolve()
        if not args.tflite_file.is_file():
            parser.error(f"--tflite-file {args.tflite_file}: no such file")
    frameworks = [BASELINE.framework, *(f for f in others if f in args.contenders)]
    require_packages(frameworks)

    load = require_quiet(args)
    dtypes = ("float32", "bfloat16") if args.bfloat16 else ("float32",)
    contenders = [
        Contender(framework, dtype)
        for dtype in dtypes
        for framework in frameworks
        if dtype in FRAMEWORKS[framework].names
    ]
    rate_frameworks = tuple(dict.fromkeys(FRAMEWORKS[f].rate_framework for f in frameworks))
    rates = matmul_rates(args.threads, dtypes, rate_frameworks)
    measurement = measure(args, contenders)

    from volo_convert.environment import environment_line

    print(load.note() + f"; {os.getloadavg()[0]:.2f} at the end")
    print(f"environment: {environment_line()}")
    print(dependency_line(frameworks))
    print(limit_line(rates))
    print(
        f"VOLO {args.variant} at {args.image_size}px: {measurement.flops / 1e9:.2f} GFLOP per "
        f"image (matmul and convolution, counted from the model); {args.threads} threads; "
        f"median of {args.rounds} alternating rounds, each contender in its own process"
    )
    print(parity_line(measurement))
    print()
    print(
        "| batch | contender | median s/batch | images/s | GFLOP/s | % of its matmul rate "
        "| time vs PyTorch float32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        baseline = measurement.medians[(batch_size, BASELINE)]
        for contender in contenders:
            if contender in measurement.mismatched:
                print(
                    f"| {batch_size} | {contender.name} | not timed: logits do not match | | | | |"
                )
                continue
            if (batch_size, contender) not in measurement.medians:
                only = f"its file takes batch {measurement.batch_sizes[contender]} only"
                print(f"| {batch_size} | {contender.name} | {only} | | | | |")
                continue
            seconds = measurement.medians[(batch_size, contender)]
            gflops = measurement.flops * batch_size / seconds / 1e9
            print(
                f"| {batch_size} | {contender.name} | {seconds:.4f} | {batch_size / seconds:.1f} "
                f"| {gflops:.0f} | {100 * gflops / rates[contender.rate_key]:.0f}% "
                f"({contender.rate_key}) | {seconds / baseline:.2f}x |"
            )
    if measurement.mismatched:
        names = ", ".join(contender.name for contender in measurement.mismatched)
        print(f"not timed, logits outside the bar: {names}", file=sys.stderr)
        sys.exit(EXIT_MISMATCH)


if __name__ == "__main__":
    main()
