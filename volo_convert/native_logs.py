"""Native libraries' chatter on file descriptor 2: known lines held back, everything else shown.

TensorFlow and absl write their start-up lines (oneDNN, CUDA drivers, CPU features) from
C++ straight to file descriptor 2 while TensorFlow is imported, where neither Python's
logging nor TF_CPP_MIN_LOG_LEVEL reaches them, and the TFLite converter does the same. Inside
`known_lines_held_back`, file descriptor 2 is a pipe to a small relay process that shows
every line except the known ones. The relay outlives this process, so the lines a native
library writes just before it aborts still reach the user. Held-back lines are kept, and
`--debug` prints them; with VOLO_CONVERT_DEBUG=1 nothing is held back at all.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO

DEBUG_ENVIRONMENT = "VOLO_CONVERT_DEBUG"
RELAY_EXIT_SECONDS = 10  # a child process still holding the pipe must not hang us

# Lines printed on every TensorFlow import; the GPU-build ones are tensorflow#62075's.
STARTUP_LINES = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"\bport\.cc:\d+\] oneDNN custom operations are on\.",
    r"\bcudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
    r"\bcpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU ",
    r"^To enable the following instructions: .*, in other operations, rebuild TensorFlow with "
    r"the appropriate compiler flags\.$",
    r"\] failed call to cuInit: ",
    r"\bcuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting ",
    r"\bcomputation_placer\.cc:\d+\] computation placer already registered\.",
    r"\] TF-TRT Warning: Could not find TensorRT$",
)
# Lines of every TFLite conversion and interpreter start: progress notes, no findings.
TFLITE_LINES = (
    r"\btf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored (output_format|drop_control_dependency)\.$",
    r"\breader\.cc:\d+\] Reading (SavedModel from|meta graph with tags|SavedModel debug info)",
    r"\bloader\.cc:\d+\] (Restoring SavedModel bundle\.|Running initialization op on "
    r"SavedModel bundle|SavedModel load for tags .*; Status: success: OK\.)",
    r"\bmlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is not enabled$",
    r"\bdump_mlir_util\.cc:\d+\] disabling MLIR crash reproducer",
    r"\bflatbuffer_export\.cc:\d+\] Estimated count of arithmetic ops: ",
    # The exporter's Identity ops carry a `Truncate` attribute that the op definition lacks.
    r"\bnode_def_util\.cc:\d+\] NodeDef mentions attribute Truncate which is not in the op ",
    r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$",
    # The int8 quantizer's settings, and its note that the exporter adds the runtime version.
    r"^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
    r"output_inference_type: \w+$",
    r"\bflatbuffer_export\.cc:\d+\] Skipping runtime version metadata in the model\. ",
)
# Lines of a Keras training step under TensorFlow: a note that an integer op (the optimizer's
# step counter) runs on Eigen, not oneDNN, on CPUs without AVX-512.
TRAINING_LINES = (
    r"\butil\.cc:\d+\] oneDNN supports DT_INT32 only on platforms with AVX-512\. Falling back ",
)

# Runs in its own interpreter: copies stdin to stdout line by line, except the lines that
# match a pattern (given as arguments), which go to stderr. It ignores SIGINT so that a
# Ctrl-C meant for the converter cannot cut it off before it has passed every line on.
_RELAY = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
known = [re.compile(pattern) for pattern in sys.argv[1:]]
shown, held = sys.stdout.buffer, sys.stderr.buffer
for line in sys.stdin.buffer:
    text = line.decode("utf-8", "replace").rstrip("\\r\\n")
    target = held if any(pattern.search(text) for pattern in known) else shown
    target.write(line)
    target.flush()
"""

_held_back_lines: list[str] = []


def showing_everything() -> bool:
    """True when VOLO_CONVERT_DEBUG=1 asks for every native line, as it is written."""
    return os.environ.get(DEBUG_ENVIRONMENT) == "1"


def show_everything() -> None:
    """Prints the lines held back so far and holds none back from now on (`--debug`).

    Sets VOLO_CONVERT_DEBUG=1, so processes started later (batch workers) show theirs too.
    """
    os.environ[DEBUG_ENVIRONMENT] = "1"
    sys.stderr.writelines(f"{line}\n" for line in _held_back_lines)
    sys.stderr.flush()


def _start_relay(
    known: Sequence[str], held_file: IO[bytes]
) -> tuple[subprocess.Popen[bytes], int] | None:
    """Starts the relay, writing to a copy of file descriptor 2; the relay and that copy.

    None when there is no file descriptor 2 or no interpreter to start: nothing is held
    back then.
    """
    try:
        original_stderr = os.dup(2)
    except OSError:
        return None
    try:
        relay = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RELAY, *known],
            stdin=subprocess.PIPE,
            stdout=original_stderr,
            stderr=held_file,
        )
    except OSError:
        os.close(original_stderr)
        return None
    return relay, original_stderr


@contextlib.contextmanager
def known_lines_held_back(known: Sequence[str]) -> Iterator[None]:
    """Inside the block, lines written to file descriptor 2 that match `known` are held back.

    Python's own writes to `sys.stderr` go through the relay too, in order. A block that
    ends or raises restores file descriptor 2 and waits until the relay has passed on
    every line.

    Args:
        known: regular expressions, each searched for in a line without its newline.
    """
    if showing_everything() or not sys.executable:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held_file:
        started = _start_relay(known, held_file)
        if started is None:
            yield
            return
        relay, original_stderr = started
        assert relay.stdin is not None  # stdin=PIPE
        os.dup2(relay.stdin.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(original_stderr, 2)
            os.close(original_stderr)
            relay.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(RELAY_EXIT_SECONDS)
            held_file.seek(0)
            _held_back_lines.extend(held_file.read().decode("utf-8", "replace").splitlines())


def find_tensorflow_devices() -> None:
    """Lets TensorFlow look for GPUs now, if it is loaded, rather than at its first operation.

    That search logs `failed call to cuInit` on a machine without one; run inside
    `known_lines_held_back(STARTUP_LINES)`, the line is held back with the others. It does
    not create the devices, so they can still be configured afterwards.
    """
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is not None:
        tensorflow.config.list_physical_devices()
