"""The private Keras, TensorFlow and torch APIs: checked on named versions, named when gone."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
import tensorflow as tf
from helpers import error_line, run, snapshot

from volo_convert import compat
from volo_convert.compat import CHECKED_ON, PRIVATE_ATTRIBUTES, PRIVATE_SYMBOLS


@pytest.mark.parametrize("library", sorted(CHECKED_ON))
def test_the_installed_library_is_a_checked_version(library: str) -> None:
    """Fails on a release the private names were not checked on: check each name in
    volo_convert/compat.py against it (the test below), then add it to CHECKED_ON."""
    installed = compat.version(library)
    assert installed in CHECKED_ON[library], (
        f"{library} {installed} is not among the versions volo_convert/compat.py was checked "
        f"on ({', '.join(CHECKED_ON[library])})"
    )


@pytest.mark.parametrize("name", [name for names in PRIVATE_SYMBOLS.values() for name in names])
def test_every_private_name_is_there(name: str) -> None:
    assert compat.private(name) is not None


def test_every_private_attribute_is_there() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    instances = {
        "keras.Model": model,
        "tensorflow.lite.TFLiteConverter": converter,
        "tensorflow.lite.Interpreter": tf.lite.Interpreter(model_content=converter.convert()),
    }
    for attribute, (_, class_name) in PRIVATE_ATTRIBUTES.items():
        assert compat.private_attribute(instances[class_name], attribute) is not None


def test_a_private_name_gone_is_named_with_the_version(
    d1_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = "keras.src.legacy.saving.legacy_h5_format._legacy_weights"
    monkeypatch.delattr(missing)
    before = snapshot(tmp_path, d1_checkpoint.parent)
    result = run(d1_checkpoint, "-o", tmp_path / "d1.h5", "--no-verify")
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: internal error: PrivateApiMissing: keras {keras.__version__} has no {missing}, "
        "a private API volo-convert relies on (checked on keras 3.15.1); install keras 3.15.1 "
        "(rerun with --debug for the traceback, and please report it)"
    )
    assert snapshot(tmp_path, d1_checkpoint.parent) == before


def test_a_private_attribute_gone_is_named_with_the_version() -> None:
    with pytest.raises(compat.PrivateApiMissing) as raised:
        compat.own_variables(object())  # a model from a Keras without the private list
    assert str(raised.value) == (
        f"keras {keras.__version__} has no keras.Model._trainable_variables, a private API "
        "volo-convert relies on (checked on keras 3.15.1); install keras 3.15.1"
    )
