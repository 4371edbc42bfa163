"""The `.h5` writer against Keras' own: the same file, loadable by Keras alone.

`keras_h5` reaches into Keras' private legacy-h5 helpers; these tests are the guard that
fails when a Keras release changes the layout `model.save` writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG

from volo_convert.architecture.keras_model import build_volo, skeleton_scope
from volo_convert.formats.keras_h5 import write_h5
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights, ported_weights, variable_shapes

ROOT = Path(__file__).resolve().parents[2]
TINY_SIZE = 64  # the size of conftest's tiny_state_dict
H5Entries = dict[str, tuple[str, dict[str, object], object]]

# Loads the file in a fresh Python that imports nothing of this package but its root.
LOAD_PROGRAM = """
import sys
import numpy as np
import keras
import volo_convert
model = keras.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict_on_batch(np.load(sys.argv[2])))
"""


def _attribute(value: object) -> object:
    """An attribute's value in a comparable form, its type included."""
    if isinstance(value, np.ndarray):  # object arrays (of strings) by value, not pointers
        content = value.tolist() if value.dtype == object else value.tobytes()
        return (value.dtype.str, value.shape, content)
    return (type(value).__name__, value)


def h5_entries(path: Path) -> H5Entries:
    """Every group and dataset: name -> (kind, attributes, dataset dtype, shape and bytes)."""
    entries: H5Entries = {}

    def visit(name: str, item: h5py.Group | h5py.Dataset) -> None:
        attributes = {key: _attribute(value) for key, value in item.attrs.items()}
        if isinstance(item, h5py.Dataset):
            data = item[()]
            content = (item.dtype.str, item.shape, np.asarray(data).tobytes())
            entries[name] = ("dataset", attributes, content)
        else:
            entries[name] = ("group", attributes, None)

    with h5py.File(path, "r") as file:
        entries["/"] = ("group", {k: _attribute(v) for k, v in file.attrs.items()}, None)
        file.visititems(visit)
    return entries


@pytest.fixture(scope="module")
def tiny_h5(tiny_state_dict: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory):
    """The tiny model written from the checkpoint by `write_h5`, and the ported model."""
    folder = tmp_path_factory.mktemp("keras_h5")
    with skeleton_scope():
        skeleton = build_volo(TINY_CONFIG, TINY_SIZE)
    weights = ported_weights(
        variable_shapes(skeleton), tiny_state_dict, weight_mappings(TINY_CONFIG)
    )
    written = folder / "written.h5"
    write_h5(skeleton, weights, written)
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    return written, model


def test_the_file_is_what_keras_writes(tiny_h5: tuple[Path, keras.Model], tmp_path: Path) -> None:
    written, model = tiny_h5
    keras_file = tmp_path / "keras.h5"
    model.save(keras_file)
    ours, theirs = h5_entries(written), h5_entries(keras_file)
    assert sorted(ours) == sorted(theirs)
    for name, entry in theirs.items():
        assert ours[name] == entry, name


@pytest.mark.large
def test_keras_loads_it_after_a_plain_import(
    tiny_h5: tuple[Path, keras.Model], tmp_path: Path
) -> None:
    written, model = tiny_h5
    images = np.random.default_rng(0).normal(size=(2, TINY_SIZE, TINY_SIZE, 3))
    images_path, logits_path = tmp_path / "images.npy", tmp_path / "logits.npy"
    np.save(images_path, images.astype(np.float32))
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", LOAD_PROGRAM, written, images_path, logits_path]
    loaded = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    expected = keras.ops.convert_to_numpy(model.predict_on_batch(images.astype(np.float32)))
    np.testing.assert_array_equal(np.load(logits_path), expected)


def test_a_skeleton_holds_no_values_even_after_another_stateless_scope() -> None:
    with skeleton_scope():
        skeleton = build_volo(TINY_CONFIG, TINY_SIZE)
    with keras.StatelessScope():
        pass  # its exit initialises the variables it knows to be pending
    assert skeleton.weights
    assert all(variable._value is None for variable in skeleton.weights)


def test_a_skeleton_build_that_fails_leaves_nothing_pending() -> None:
    with pytest.raises(RuntimeError, match="halfway"), skeleton_scope():
        halfway = keras.Variable(keras.initializers.Ones(), shape=(3,), name="halfway")
        raise RuntimeError("halfway")
    with keras.StatelessScope():
        pass  # its exit would initialise a variable still listed as pending
    assert halfway._value is None


def test_a_missing_or_unknown_value_is_refused(
    tiny_state_dict: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    with skeleton_scope():
        skeleton = build_volo(TINY_CONFIG, TINY_SIZE)
    weights = list(
        ported_weights(variable_shapes(skeleton), tiny_state_dict, weight_mappings(TINY_CONFIG))
    )
    with pytest.raises(ValueError, match="no value given for"):
        write_h5(skeleton, weights[1:], tmp_path / "short.h5")
    with pytest.raises(ValueError, match="given twice"):
        write_h5(skeleton, [*weights, weights[0]], tmp_path / "twice.h5")
