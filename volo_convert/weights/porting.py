"""Moves checkpoint tensors into Keras variables through the expanded mapping tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import keras
import torch

from volo_convert.errors import ConversionError
from volo_convert.weights.checkpoint import COUNTER_SUFFIX
from volo_convert.weights.mapping import WeightMapping
from volo_convert.weights.transforms import TRANSFORMS

MAX_LISTED = 8


def _listing(names: list[str]) -> str:
    """At most MAX_LISTED names, then a count of the rest."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def check_coverage(
    torch_keys: list[str], keras_paths: list[str], mappings: list[WeightMapping]
) -> None:
    """Raises a ConversionError unless tensors and variables pair up one to one.

    Every checkpoint tensor (bar `num_batches_tracked`) must be mapped exactly once, to
    a Keras variable or, for a head left out, to none; every Keras variable must be
    filled exactly once.
    """
    torch_uses = Counter(mapping.torch_key for mapping in mappings)
    keras_uses = Counter(mapping.keras_path for mapping in mappings if mapping.keras_path)
    wanted_keys = {key for key in torch_keys if not key.endswith(COUNTER_SUFFIX)}
    problems = []
    if missing := sorted(set(torch_uses) - wanted_keys):
        problems.append(f"tensors missing from the checkpoint: {_listing(missing)}")
    if unused := sorted(wanted_keys - set(torch_uses)):
        problems.append(f"checkpoint tensors no mapping uses: {_listing(unused)}")
    if twice := sorted(key for key, count in torch_uses.items() if count > 1):
        problems.append(f"tensors mapped more than once: {_listing(twice)}")
    if unfilled := sorted(set(keras_paths) - set(keras_uses)):
        problems.append(f"Keras weights no mapping fills: {_listing(unfilled)}")
    if unknown := sorted(set(keras_uses) - set(keras_paths)):
        problems.append(f"mapped Keras weights the model lacks: {_listing(unknown)}")
    if refilled := sorted(path for path, count in keras_uses.items() if count > 1):
        problems.append(f"Keras weights filled more than once: {_listing(refilled)}")
    if problems:
        raise ConversionError("; ".join(problems))


def port_weights(
    model: keras.Model,
    state_dict: Mapping[str, torch.Tensor],
    mappings: list[WeightMapping],
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Fills every variable of `model` from `state_dict`.

    Args:
        model: a freshly built Keras VOLO.
        state_dict: torch tensor name -> float32 tensor.
        mappings: the expanded mapping tables.
        on_tensor: called with each torch key once its tensor is ported.
    """
    variables = {variable.path: variable for variable in model.weights}
    check_coverage(list(state_dict), list(variables), mappings)
    shape_errors = []
    ported = []
    for mapping in (mapping for mapping in mappings if mapping.keras_path):
        variable = variables[mapping.keras_path]
        source = state_dict[mapping.torch_key].numpy()
        try:
            array = TRANSFORMS[mapping.transform](source)
            transformed = f"which after {mapping.transform} is {tuple(array.shape)}"
        except ValueError:  # fewer dimensions than the transform's axes
            array, transformed = None, f"which {mapping.transform} cannot take"
        if array is None or tuple(array.shape) != tuple(variable.shape):
            shape_errors.append(
                f"{mapping.torch_key} has shape {tuple(source.shape)}, {transformed}, but "
                f"{mapping.keras_path} expects {tuple(variable.shape)}"
            )
        else:
            ported.append((variable, array, mapping.torch_key))
    if shape_errors:
        raise ConversionError("; ".join(shape_errors[:MAX_LISTED]))
    for variable, array, torch_key in ported:
        variable.assign(array)
        if on_tensor is not None:
            on_tensor(torch_key)
