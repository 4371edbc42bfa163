"""Reading VOLO checkpoints: release `.pth.tar`, training dicts, DataParallel, safetensors."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volo_convert.errors import ConversionError

SAFETENSORS_SUFFIX = ".safetensors"
CONTAINER_KEYS = ("state_dict", "model")
EMA_KEY = "state_dict_ema"
DATA_PARALLEL_PREFIX = "module."


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty")


def _torch_load(path: Path, weights_only: bool) -> Any:
    """torch.load, memory-mapped (pages come in as tensors are read; see memory.py)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # The legacy (pre-zip) format cannot be mapped; read it whole.
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _load_pickle(path: Path, trust_checkpoint: bool) -> Any:
    """torch.load with weights_only unless the user vouches for the file."""
    try:
        return _torch_load(path, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise ConversionError(
                f"{path}: refusing to unpickle, the file holds objects that run code when "
                "loaded; if you trust its source, pass --trust-checkpoint"
            ) from None
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint, it may be truncated or corrupt ({reason})"
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from None


def _select_state_dict(loaded: Any, path: Path, ema: bool) -> Mapping[str, Any]:
    """Finds the state dict inside a checkpoint container."""
    if not isinstance(loaded, Mapping):
        raise ConversionError(
            f"{path}: expected a state dict (tensor name -> tensor), got {type(loaded).__name__}"
        )
    if ema:
        if EMA_KEY not in loaded:
            raise ConversionError(f"{path}: --ema was given but the file holds no {EMA_KEY!r}")
        return loaded[EMA_KEY]
    for key in CONTAINER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return loaded[key]
    return loaded


def load_state_dict(
    path: str | Path, *, ema: bool = False, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """Reads a checkpoint and returns its state dict as float32 CPU tensors.

    Args:
        path: a `.pth.tar`/`.pth`/`.bin` pickle or a `.safetensors` file.
        ema: take `state_dict_ema` from a training checkpoint.
        trust_checkpoint: allow pickles that need arbitrary code to load.

    Returns:
        torch tensor name (without a `module.` prefix) -> tensor; floating tensors are
        float32, integer buffers keep their dtype.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        loaded: Any = _load_safetensors(path)
    else:
        loaded = _load_pickle(path, trust_checkpoint)
    raw_state_dict = _select_state_dict(loaded, path, ema)
    state_dict = {}
    for key, tensor in raw_state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ConversionError(
                f"{path}: expected a state dict of named tensors, found entry {key!r} of type "
                f"{type(tensor).__name__}"
            )
        name = key.removeprefix(DATA_PARALLEL_PREFIX)
        state_dict[name] = tensor.float() if tensor.is_floating_point() else tensor
    if not state_dict:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    return state_dict


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Raises a ConversionError naming the tensors that hold NaN or Inf."""
    bad = [
        key
        for key, tensor in state_dict.items()
        # numpy, not torch: one pass per tensor without torch's per-op thread start-up
        if tensor.is_floating_point() and not np.isfinite(tensor.numpy()).all()
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConversionError(f"{path}: weights hold NaN or Inf values in {shown}")


def tensor_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for detection."""
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
