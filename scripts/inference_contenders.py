"""The contenders of scripts/bench_inference.py: one registry of the ways of running VOLO.

Each framework builds a `Runner` (NHWC float32 images -> logits) from one `Setup`: the same
synthetic weights, the PyTorch reference on them, the thread count, and a folder for the files
a contender writes. Adding a contender touches this module only: a builder and its
`FRAMEWORKS` entry, naming the quiet_machine matmul program that bounds it and the benchmark
dependencies it needs (the `bench` extra).

- torch: the PyTorch reference in `inference_mode` (float32: the baseline), or under bfloat16
  autocast;
- keras: the converted Keras model's `predict_on_batch`, in float32 or bfloat16 compute;
- onnxruntime: the reference exported with torch's dynamo exporter (opset 18, dynamic batch
  dimension), in onnxruntime's CPU provider with `threads` intra-op threads;
- tflite: a float32 TFLite file under LiteRT with `threads` threads: the Keras model converted
  by the project (batch 1), or a given file, timed at the batch sizes its input signature takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from volo_convert.architecture.torch_reference import Volo
    from volo_convert.architecture.variants import VoloConfig

PARITY_IMAGES = 2  # compared with the reference before timing (or the batch a file takes)
PARITY_SEED = 2  # other images than the timed ones (TIMING_SEED)
TIMING_SEED = 1
ONNX_OPSET = 18


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
    allocated_batch = 0  # the batch size the interpreter's tensors are allocated for

    def tflite_call(images: np.ndarray) -> np.ndarray:
        nonlocal allocated_batch
        if len(images) != allocated_batch:
            interpreter.resize_tensor_input(input_details["index"], list(images.shape))
            interpreter.allocate_tensors()
            allocated_batch = len(images)
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


def flops_per_image(setup: Setup) -> float:
    """Matmul and convolution FLOPs of one image through the PyTorch reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from volo_convert.checks.images import sample_images

    call = _torch_runner(BASELINE.dtype, setup).call
    with FlopCounterMode(display=False) as counter:
        call(sample_images(1, setup.image_size, seed=TIMING_SEED))
    return float(counter.get_total_flops())


def max_abs_diff(runner: Runner, setup: Setup) -> float:
    """Largest difference between the runner's logits and the reference's, on seeded images."""
    import numpy as np

    from volo_convert.checks.images import sample_images

    images = sample_images(runner.batch_size or PARITY_IMAGES, setup.image_size, PARITY_SEED)
    expected = _torch_runner(BASELINE.dtype, setup).call(images)
    logits = np.asarray(runner.call(images), dtype=np.float32)
    return float(np.max(np.abs(logits - expected)))
