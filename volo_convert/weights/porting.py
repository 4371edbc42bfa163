"""Moves checkpoint tensors into Keras variables through the expanded mapping tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import keras
import numpy as np
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


def _checkpoint_problems(torch_keys: list[str], mappings: list[WeightMapping]) -> list[str]:
    """What keeps the checkpoint's tensors and the tables from pairing up one to one."""
    torch_uses = Counter(mapping.torch_key for mapping in mappings)
    wanted_keys = {key for key in torch_keys if not key.endswith(COUNTER_SUFFIX)}
    problems = []
    if missing := sorted(set(torch_uses) - wanted_keys):
        problems.append(f"tensors missing from the checkpoint: {_listing(missing)}")
    if unused := sorted(wanted_keys - set(torch_uses)):
        problems.append(f"checkpoint tensors no mapping uses: {_listing(unused)}")
    if twice := sorted(key for key, count in torch_uses.items() if count > 1):
        problems.append(f"tensors mapped more than once: {_listing(twice)}")
    return problems


def _model_problems(keras_paths: list[str], mappings: list[WeightMapping]) -> list[str]:
    """What keeps the model's variables and the tables from pairing up one to one."""
    keras_uses = Counter(mapping.keras_path for mapping in mappings if mapping.keras_path)
    problems = []
    if unfilled := sorted(set(keras_paths) - set(keras_uses)):
        problems.append(f"Keras weights no mapping fills: {_listing(unfilled)}")
    if unknown := sorted(set(keras_uses) - set(keras_paths)):
        problems.append(f"mapped Keras weights the model lacks: {_listing(unknown)}")
    if refilled := sorted(path for path, count in keras_uses.items() if count > 1):
        problems.append(f"Keras weights filled more than once: {_listing(refilled)}")
    return problems


def check_coverage(
    torch_keys: list[str], keras_paths: list[str], mappings: list[WeightMapping]
) -> None:
    """Raises a ConversionError unless tensors and variables pair up one to one.

    Every checkpoint tensor (bar `num_batches_tracked`) must be mapped exactly once, to
    a Keras variable or, for a head left out, to none; every Keras variable must be
    filled exactly once.
    """
    problems = _checkpoint_problems(torch_keys, mappings) + _model_problems(keras_paths, mappings)
    if problems:
        raise ConversionError("; ".join(problems))


def _transformed_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `transform` gives a tensor of `shape`, computed on a view of no data."""
    nothing = np.lib.stride_tricks.as_strided(np.zeros(1), shape, (0,) * len(shape))
    return tuple(TRANSFORMS[transform](nothing).shape)


def _after_transform(transform: str, shape: tuple[int, ...]) -> str:
    """How a tensor of `shape` comes out of `transform`, in words for an error message."""
    try:
        return f"which after {transform} is {_transformed_shape(transform, shape)}"
    except ValueError:  # fewer dimensions than the transform's axes
        return f"which {transform} cannot take"


def _shape_error(
    mapping: WeightMapping, shape: tuple[int, ...], keras_shape: tuple[int, ...]
) -> str:
    """One line for a tensor whose shape, once transformed, does not fit its Keras variable."""
    return (
        f"{mapping.torch_key} has shape {shape}, {_after_transform(mapping.transform, shape)}, "
        f"but {mapping.keras_path} expects {keras_shape}"
    )


def check_checkpoint(
    shapes: Mapping[str, tuple[int, ...]],
    mappings: list[WeightMapping],
    expected_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Raises a ConversionError unless the checkpoint fits the tables and the architecture.

    Needs no Keras model, so a bad checkpoint fails as soon as it is read: every tensor
    must be mapped exactly once (as in `check_coverage`) and have the shape the
    architecture expects; a ported tensor's error names the Keras weight it would fill.

    Args:
        shapes: the checkpoint's tensor name -> shape.
        mappings: the expanded mapping tables.
        expected_shapes: tensor name -> shape of the architecture the checkpoint should
            fit (`torch_reference.parameter_shapes`).
    """
    if problems := _checkpoint_problems(list(shapes), mappings):
        raise ConversionError("; ".join(problems))
    shape_errors = []
    for mapping in mappings:
        shape, expected = tuple(shapes[mapping.torch_key]), expected_shapes[mapping.torch_key]
        if shape == expected:
            continue
        if mapping.keras_path is None:
            shape_errors.append(f"{mapping.torch_key} has shape {shape}, expected {expected}")
        else:
            shape_errors.append(
                _shape_error(mapping, shape, _transformed_shape(mapping.transform, expected))
            )
    if shape_errors:
        raise ConversionError("; ".join(shape_errors[:MAX_LISTED]))


def _checked_moves(
    keras_shapes: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    mappings: list[WeightMapping],
) -> list[WeightMapping]:
    """The mappings that fill a variable, once coverage and every shape are checked.

    Shapes are compared on views of no data, so no tensor is read here.
    """
    check_coverage(list(state_dict), list(keras_shapes), mappings)
    moves = [mapping for mapping in mappings if mapping.keras_path]
    shape_errors = []
    for mapping in moves:
        source_shape = tuple(state_dict[mapping.torch_key].shape)
        expected = tuple(keras_shapes[mapping.keras_path])
        try:
            shape = _transformed_shape(mapping.transform, source_shape)
        except ValueError:  # fewer dimensions than the transform's axes
            shape = None
        if shape != expected:
            shape_errors.append(_shape_error(mapping, source_shape, expected))
    if shape_errors:
        raise ConversionError("; ".join(shape_errors[:MAX_LISTED]))
    return moves


def ported_weights(
    keras_shapes: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    mappings: list[WeightMapping],
    on_tensor: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Each Keras variable's path and value, converted from `state_dict` one at a time.

    Coverage and every shape are checked before this returns, so a bad pairing fails
    before anything is written. The values come lazily, in the tables' order: each is a
    view (or transposed view) of the checkpoint tensor, read only by whoever consumes it,
    so one tensor is in flight at a time.

    Args:
        keras_shapes: Keras variable path -> shape, of the model to fill.
        state_dict: torch tensor name -> float32 tensor.
        mappings: the expanded mapping tables.
        on_tensor: called with each torch key once its value has been consumed.
    """
    moves = _checked_moves(keras_shapes, state_dict, mappings)

    def values() -> Iterator[tuple[str, np.ndarray]]:
        for mapping in moves:
            source = state_dict[mapping.torch_key].numpy()
            yield mapping.keras_path, TRANSFORMS[mapping.transform](source)
            if on_tensor is not None:
                on_tensor(mapping.torch_key)

    return values()


def variable_shapes(model: keras.Model) -> dict[str, tuple[int, ...]]:
    """Keras variable path -> shape, for every weight of `model`."""
    return {variable.path: tuple(variable.shape) for variable in model.weights}


def assign_weights(model: keras.Model, weights: Iterator[tuple[str, np.ndarray]]) -> None:
    """Assigns each (variable path, value) of `weights` to `model`'s variable."""
    variables = {variable.path: variable for variable in model.weights}
    for keras_path, array in weights:
        variables[keras_path].assign(array)


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
    weights = ported_weights(variable_shapes(model), state_dict, mappings, on_tensor)
    assign_weights(model, weights)
