"""Reading VOLO checkpoints: release `.pth.tar`, training dicts, DataParallel, safetensors."""

from __future__ import annotations

import argparse
import io
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from volo_convert.compat import weights_only_globals
from volo_convert.errors import ConversionError, about
from volo_convert.paths import check_input
from volo_convert.weights.file_scan import scan_file

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default zip container
PICKLE_MAGIC = b"\x80"  # legacy torch.save: a protocol-2+ pickle
SNIFF_BYTES = 64
UNKNOWN_BINARY = "binary data of an unknown format"
# Harmless classes that training checkpoints hold (timm stores its `args` as a Namespace).
SAFE_GLOBALS = [argparse.Namespace]
CONTAINER_KEYS = ("state_dict", "model")
EMA_KEY = "state_dict_ema"
DATA_PARALLEL_PREFIX = "module."
COUNTER_SUFFIX = ".num_batches_tracked"  # BatchNorm's integer counter: the one non-weight
PICKLE_RECORD = "data.pkl"  # the pickle inside torch.save's zip container


def _check_file(path: Path) -> None:
    check_input(path)
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty")


class _Inert:
    """Stands in for every class a dry-run unpickling meets, so no code runs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _GlobalsRecorder(pickle.Unpickler):
    """Walks a pickle, recording the globals it names without importing any of them."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.names: list[str] = []

    def find_class(self, module: str, name: str) -> type:
        self.names.append(f"{module}.{name}")
        return _Inert

    def persistent_load(self, persistent_id: Any) -> None:
        return None


def _pickle_bytes(path: Path) -> bytes:
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        record = next(name for name in archive.namelist() if name.endswith(PICKLE_RECORD))
        return archive.read(record)


def _refused_global(path: Path) -> str | None:
    """The first global the file names that weights-only loading refuses, if any.

    Found by a dry run of the pickle with inert stand-ins, not from the wording of
    torch's error, which changes between releases.
    """
    allowed = weights_only_globals()
    allowed |= {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    try:
        stream = io.BytesIO(_pickle_bytes(path))
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None
    while stream.tell() < len(stream.getbuffer()):  # a legacy file holds several pickles
        recorder = _GlobalsRecorder(stream)
        try:
            recorder.load()
            complete = True
        except Exception:  # a damaged pickle: what was read so far still counts
            complete = False
        if refused := [name for name in recorder.names if name not in allowed]:
            return refused[0]
        if not complete:
            break
    return None


def _sniff(path: Path) -> str:
    """Names the container from the first bytes: `torch`, `safetensors`, or what it is not."""
    with path.open("rb") as stream:
        head = stream.read(SNIFF_BYTES)
    if head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return "torch"
    if (  # safetensors: a little-endian u64 header length, then the JSON header
        len(head) > 8
        and head[8:9] == b"{"
        and int.from_bytes(head[:8], "little") < path.stat().st_size
    ):
        return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the sniff boundary
            return UNKNOWN_BINARY
        text = head[: error.start].decode("utf-8")
    if not all(char.isprintable() or char.isspace() for char in text):
        return UNKNOWN_BINARY
    return "a JSON file" if text.lstrip().startswith(("{", "[")) else "a text file"


def _torch_load(path: Path, weights_only: bool, mmap: bool) -> Any:
    """torch.load, memory-mapped where the file allows it (pages come in as tensors are
    read; see memory.py): the legacy pre-zip format and deflated records are read whole.

    torch's deprecation warnings about what a file holds are not the user's concern here:
    what matters is reported as an error after loading.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)


def _load_pickle(path: Path, trust_checkpoint: bool, mmap: bool) -> Any:
    """torch.load with weights_only (plus harmless extras) unless the user vouches for the file."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _torch_load(path, weights_only=not trust_checkpoint, mmap=mmap)
    except pickle.UnpicklingError:
        if not trust_checkpoint and (refused := _refused_global(path)):
            raise ConversionError(
                f"{path}: refusing to unpickle, the file needs {refused}, which could run "
                "code when loaded; if you trust its source, pass --trust-checkpoint"
            ) from None
        raise ConversionError(f"{path}: the checkpoint is truncated or corrupt") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        raise ConversionError(f"{path}: the checkpoint is truncated or corrupt") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise ConversionError(f"{path}: the safetensors file is truncated or corrupt") from None


def _select_state_dict(loaded: Any, path: Path, ema: bool) -> Mapping[str, Any]:
    """Finds the state dict inside a checkpoint container.

    A container key counts only when it holds a mapping: `state_dict: None` or `model: None`
    (as training scripts save when there is none) is passed over, and `--ema` on a
    `state_dict_ema` that is not a mapping is refused by name.
    """
    if not isinstance(loaded, Mapping):
        raise ConversionError(
            f"{path}: expected a state dict (tensor name -> tensor), got {type(loaded).__name__}"
        )
    if ema:
        if EMA_KEY not in loaded:
            raise ConversionError(f"{path}: --ema was given but the file holds no {EMA_KEY!r}")
        if not isinstance(loaded[EMA_KEY], Mapping):
            raise ConversionError(
                f"{path}: --ema was given but the file's {EMA_KEY!r} holds "
                f"{_held(loaded[EMA_KEY])}, not a state dict"
            )
        return loaded[EMA_KEY]
    for key in CONTAINER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return loaded[key]
    held = [(key, loaded[key]) for key in (*CONTAINER_KEYS, EMA_KEY) if key in loaded]
    if empty := [key for key, value in held if not isinstance(value, torch.Tensor)]:
        raise ConversionError(
            f"{path}: the file's {empty[0]!r} holds {_held(loaded[empty[0]])}, not a state dict"
        )
    return loaded


def _held(value: Any) -> str:
    """What a container key holds instead of a state dict, in words."""
    return "None" if value is None else f"a {type(value).__name__}"


def _check_tensor(key: str, tensor: torch.Tensor) -> None:
    """Refuses a tensor that cannot be a VOLO weight: sparse, quantized, complex, without
    data, or integer (bar BatchNorm's counters). Cast silently, any of them would convert
    to wrong weights that verification, built from the same tensors, could not catch."""
    problem = None
    if tensor.layout != torch.strided:
        problem = f"is not dense (layout {tensor.layout})"
    elif tensor.is_quantized:
        problem = f"is quantized ({tensor.dtype})"
    elif tensor.device.type == "meta":
        problem = "holds no data (a meta tensor)"
    elif tensor.is_complex():
        problem = f"is complex ({tensor.dtype})"
    elif not tensor.is_floating_point() and not key.endswith(COUNTER_SUFFIX):
        problem = f"has dtype {tensor.dtype}, expected floating-point weights"
    if problem:
        raise ConversionError(f"{key} {problem}")


class CheckpointContent(NamedTuple):
    """A checkpoint's tensors, and the SHA-256 of the file they were read from."""

    state_dict: dict[str, torch.Tensor]
    sha256: str


def load_state_dict(
    path: str | Path, *, ema: bool = False, trust_checkpoint: bool = False
) -> CheckpointContent:
    """Reads a checkpoint: its state dict as float32 CPU tensors, and the file's SHA-256.

    The file is read once for its hash and, for a zip container, its records' CRCs.

    Args:
        path: a `.pth.tar`/`.pth`/`.bin` torch file or a safetensors file (told apart by
            their content, not their extension).
        ema: take `state_dict_ema` from a training checkpoint.
        trust_checkpoint: allow pickles that need arbitrary code to load.

    Returns:
        The state dict (torch tensor name without a `module.` prefix -> tensor, detached
        from autograd; floating tensors are float32, integer buffers keep their dtype) and
        the file's SHA-256.
    """
    path = Path(path)
    _check_file(path)
    container = _sniff(path)
    if container not in ("safetensors", "torch"):
        raise ConversionError(
            f"{path}: not a PyTorch or safetensors checkpoint, it looks like {container}"
        )
    scan = scan_file(path, zip_container=container == "torch" and zipfile.is_zipfile(path))
    if container == "safetensors":
        loaded: Any = _load_safetensors(path)
    else:
        loaded = _load_pickle(path, trust_checkpoint, mmap=scan.mappable)
    raw_state_dict = _select_state_dict(loaded, path, ema)
    state_dict = {}
    original_keys: dict[str, str] = {}
    for key, tensor in raw_state_dict.items():
        if not isinstance(key, str):
            raise ConversionError(
                f"{path}: expected a state dict of named tensors, found a key of type "
                f"{type(key).__name__} ({key!r})"
            )
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(
                f"{path}: expected a state dict of named tensors, found entry {key!r} of type "
                f"{type(tensor).__name__}"
            )
        name = key.removeprefix(DATA_PARALLEL_PREFIX)
        if name in original_keys:
            raise ConversionError(
                f"{path}: two tensors name the same weight: {original_keys[name]!r} and {key!r}"
            )
        original_keys[name] = key
        with about(path):
            _check_tensor(key, tensor)
        tensor = tensor.detach()  # an nn.Parameter (state_dict(keep_vars=True)) as a tensor
        state_dict[name] = tensor.float() if tensor.is_floating_point() else tensor
    if not state_dict:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    return CheckpointContent(state_dict, scan.sha256)


def check_finite(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    on_checked: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Raises a ConversionError naming the tensors that hold NaN or Inf.

    `on_checked` is called with each tensor once read (to hand its pages back).
    """
    bad = []
    for key, tensor in state_dict.items():
        # numpy, not torch: one pass per tensor without torch's per-op thread start-up
        if tensor.is_floating_point() and not np.isfinite(tensor.numpy()).all():
            bad.append(key)
        if on_checked is not None:
            on_checked(tensor)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConversionError(f"{path}: weights hold NaN or Inf values in {shown}")


def tensor_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for detection."""
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
