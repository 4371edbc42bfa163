"""Keras' legacy `.h5` layout, written value by value instead of from a filled model.

The layout is the one `model.save("x.h5")` writes (Keras 3's `legacy_h5_format`): the
model config, Keras version and backend as root attributes; under `model_weights`, the
layer names, then one group per layer (sorted by name) holding each of its variables as a
dataset named by the variable's path and listed in the group's `weight_names`; last a
`top_level_model_weights` group. The layout (names, shapes, order, config) comes from a
model that may be a skeleton (built in `skeleton_scope`: no values held); the values come
one at a time from `ported_weights`, so the weights are never held in Keras and never
assigned.

Keras' private helpers (through `compat.py`) encode the attributes exactly as its own
writer does; tests/formats/test_keras_h5.py holds the file to what `model.save` writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import h5py
import keras
import numpy as np

from volo_convert.compat import (
    legacy_h5_metadata,
    legacy_json,
    legacy_layer_weights,
    own_variables,
    save_hdf5_attribute,
)

WEIGHTS_GROUP = "model_weights"
TOP_LEVEL_GROUP = "top_level_model_weights"


def _write_metadata(file: h5py.File, model: keras.Model) -> None:
    """The root attributes: model_config, keras_version, backend, JSON-encoded as Keras does."""
    for name, value in legacy_h5_metadata(model).items():
        if isinstance(value, dict | list | tuple):
            file.attrs[name] = legacy_json(value).encode("utf8")
        else:
            file.attrs[name] = value


def _variable_groups(model: keras.Model) -> list[tuple[str, list[keras.Variable]]]:
    """Group name -> its variables, in the order Keras writes them."""
    layer_groups = [
        (layer.name, legacy_layer_weights(layer))
        for layer in sorted(model.layers, key=lambda layer: layer.name)
    ]
    model_weight_ids = {id(variable) for variable in model.weights}
    top_level = [variable for variable in own_variables(model) if id(variable) in model_weight_ids]
    return [*layer_groups, (TOP_LEVEL_GROUP, top_level)]


def _create_datasets(group: h5py.Group, model: keras.Model) -> dict[str, h5py.Dataset]:
    """Writes the weight groups and their attributes, with empty datasets to fill.

    Returns:
        Keras variable path -> its dataset.
    """
    layer_names = [layer.name.encode("utf8") for layer in model.layers]
    save_hdf5_attribute(group, "layer_names", layer_names)
    group.attrs["backend"] = keras.backend.backend().encode("utf8")
    group.attrs["keras_version"] = str(keras.__version__).encode("utf8")
    datasets = {}
    for group_name, variables in _variable_groups(model):
        variable_group = group.create_group(group_name)
        weight_names = [str(variable.path).encode("utf8") for variable in variables]
        save_hdf5_attribute(variable_group, "weight_names", weight_names)
        for variable in variables:
            datasets[variable.path] = variable_group.create_dataset(
                variable.path, tuple(variable.shape), dtype=variable.dtype
            )
    return datasets


def model_values(model: keras.Model) -> Iterable[tuple[str, np.ndarray]]:
    """Each variable's path and value, for writing a model that holds its weights."""
    for variable in model.weights:
        yield variable.path, keras.ops.convert_to_numpy(variable)


def write_h5(
    model: keras.Model, weights: Iterable[tuple[str, np.ndarray]], path: str | Path
) -> None:
    """Writes `model`'s layout with `weights` as its values, as `model.save(path)` would.

    Args:
        model: the Keras VOLO; a skeleton does, its variables are not read.
        weights: (Keras variable path, value) for every variable, each once, in any order.
        path: the `.h5` file to create.

    Raises:
        ValueError: when `weights` names an unknown variable or one twice, or misses one.
    """
    with h5py.File(path, "w") as file:
        _write_metadata(file, model)
        datasets = _create_datasets(file.create_group(WEIGHTS_GROUP), model)
        for keras_path, array in weights:
            if keras_path not in datasets:
                raise ValueError(f"{keras_path}: not a variable of the model, or given twice")
            datasets.pop(keras_path)[...] = array
        if datasets:
            raise ValueError(f"no value given for {', '.join(datasets)}")
