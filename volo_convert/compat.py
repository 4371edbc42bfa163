"""The private Keras, TensorFlow and torch APIs volo-convert uses, each behind one function.

Keras' legacy `.h5` writer and its list of variables whose initialisation is deferred,
TensorFlow Lite's calibrate-only conversion, quantizer and flatbuffer schema, and torch's
weights-only unpickler's allow-list have no public equivalent. Every private name is
listed once, in PRIVATE_SYMBOLS or PRIVATE_ATTRIBUTES, and reached through this module,
which says which version lacks which name when a release has moved one, instead of an
AttributeError deep inside a conversion. CHECKED_ON holds the versions they were checked
on; tests/test_compat.py fails on any other, so a new release is checked before it is used.

Nothing is imported until a function runs: the libraries load only where they are used.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from typing import Any

# The library versions every name below was checked on.
CHECKED_ON = {
    "keras": ("3.15.1",),
    "tensorflow": ("2.21.0",),
    "torch": ("2.13.0",),
}
# Private modules, functions and classes, by the library they belong to.
PRIVATE_SYMBOLS = {
    "keras": (
        "keras.src.backend.common.global_state.get_global_attribute",
        "keras.src.backend.common.global_state.set_global_attribute",
        "keras.src.legacy.saving.json_utils.get_json_type",
        "keras.src.legacy.saving.legacy_h5_format._legacy_weights",
        "keras.src.legacy.saving.legacy_h5_format.save_attributes_to_hdf5_group",
        "keras.src.legacy.saving.saving_options.keras_option_scope",
        "keras.src.legacy.saving.saving_utils.model_metadata",
    ),
    "tensorflow": (
        "tensorflow.lite.python.convert.mlir_quantize",
        "tensorflow.lite.python.schema_py_generated",
        "tensorflow.lite.python.schema_util.get_builtin_code_from_operator_code",
        "tensorflow.lite.python.util.modify_model_io_type",
    ),
    "torch": ("torch._weights_only_unpickler._get_allowed_globals",),
}
# Private attributes of public objects: attribute -> (library, the public class).
PRIVATE_ATTRIBUTES = {
    "_trainable_variables": ("keras", "keras.Model"),
    "_non_trainable_variables": ("keras", "keras.Model"),
    "_experimental_calibrate_only": ("tensorflow", "tensorflow.lite.TFLiteConverter"),
    # LiteRT's Interpreter is TensorFlow's, moved: the same private method in both.
    "_get_ops_details": ("tensorflow", "tensorflow.lite.Interpreter"),
}
# Where Keras lists the variables a StatelessScope left for later: a global_state key.
UNINITIALIZED_VARIABLES = "uninitialized_variables"


class PrivateApiMissing(RuntimeError):
    """A private name this module relies on is gone from the installed library."""


def version(library: str) -> str:
    """The installed version of `library` (keras, tensorflow, torch), without local tags."""
    return str(importlib.import_module(library).__version__).split("+")[0]


def _missing(library: str, name: str) -> PrivateApiMissing:
    checked = ", ".join(CHECKED_ON[library])
    return PrivateApiMissing(
        f"{library} {version(library)} has no {name}, a private API volo-convert relies on "
        f"(checked on {library} {checked}); install {library} {checked}"
    )


def _library(name: str) -> str:
    """The library a private name belongs to; only listed names may be used."""
    libraries = [library for library, names in PRIVATE_SYMBOLS.items() if name in names]
    assert libraries, f"{name} is not listed in PRIVATE_SYMBOLS"
    return libraries[0]


def private(name: str) -> Any:
    """The private module, function or class `name` (dotted, listed in PRIVATE_SYMBOLS).

    Raises:
        PrivateApiMissing: naming the installed version and `name`, when it is gone.
    """
    library = _library(name)
    module_name, _, attribute = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            importlib.import_module(name)  # a submodule nothing has imported yet
        return getattr(module, attribute)
    except (ImportError, AttributeError):
        raise _missing(library, name) from None


def private_attribute(instance: Any, attribute: str) -> Any:
    """`instance.attribute`, a private attribute listed in PRIVATE_ATTRIBUTES.

    Raises:
        PrivateApiMissing: naming the installed version and the attribute, when it is gone.
    """
    assert attribute in PRIVATE_ATTRIBUTES, f"{attribute} is not listed in PRIVATE_ATTRIBUTES"
    library, class_name = PRIVATE_ATTRIBUTES[attribute]
    if not hasattr(instance, attribute):
        raise _missing(library, f"{class_name}.{attribute}")
    return getattr(instance, attribute)


# Keras


@contextlib.contextmanager
def deferred_variables_kept() -> Iterator[None]:
    """Keras' list of variables whose initialisation is deferred is put back, as it was
    on the way in, on the way out: what the block added is forgotten."""
    get_attribute = private("keras.src.backend.common.global_state.get_global_attribute")
    set_attribute = private("keras.src.backend.common.global_state.set_global_attribute")
    pending = list(get_attribute(UNINITIALIZED_VARIABLES) or [])
    try:
        yield
    finally:
        set_attribute(UNINITIALIZED_VARIABLES, pending)


def legacy_h5_metadata(model: Any) -> dict[str, Any]:
    """The root attributes Keras' legacy `.h5` writer gives `model` (config, version, backend)."""
    option_scope = private("keras.src.legacy.saving.saving_options.keras_option_scope")
    model_metadata = private("keras.src.legacy.saving.saving_utils.model_metadata")
    with option_scope(use_legacy_config=True):
        return model_metadata(model, include_optimizer=False)


def legacy_json(value: Any) -> str:
    """`value` as JSON, encoded as Keras' legacy `.h5` writer encodes it."""
    return json.dumps(value, default=private("keras.src.legacy.saving.json_utils.get_json_type"))


def legacy_layer_weights(layer: Any) -> list[Any]:
    """A layer's variables in the order Keras' legacy `.h5` writer stores them."""
    return private("keras.src.legacy.saving.legacy_h5_format._legacy_weights")(layer)


def save_hdf5_attribute(group: Any, name: str, data: list[bytes]) -> None:
    """Stores a list attribute on an HDF5 group as Keras does (split when too large)."""
    private("keras.src.legacy.saving.legacy_h5_format.save_attributes_to_hdf5_group")(
        group, name, data
    )


def own_variables(model: Any) -> list[Any]:
    """The variables `model` tracks itself, not through a layer: trainable ones first."""
    return private_attribute(model, "_trainable_variables") + private_attribute(
        model, "_non_trainable_variables"
    )


# TensorFlow Lite


def calibrate_only(converter: Any) -> None:
    """Makes `converter.convert()` return the float model with each tensor's recorded range,
    for `quantize_calibrated` (what TensorFlow's QuantizationDebugger does too)."""
    private_attribute(converter, "_experimental_calibrate_only")
    converter._experimental_calibrate_only = True


def quantize_calibrated(calibrated: bytes, float_nodes: list[str]) -> bytes:
    """A calibrated flatbuffer quantized to int8, but for the ops writing `float_nodes`."""
    mlir_quantize = private("tensorflow.lite.python.convert.mlir_quantize")
    return mlir_quantize(calibrated, denylisted_nodes=float_nodes)


def with_io_types(content: bytes, input_type: Any, output_type: Any) -> bytes:
    """A quantized flatbuffer whose input and output take the given TensorFlow dtypes."""
    modify_model_io_type = private("tensorflow.lite.python.util.modify_model_io_type")
    return modify_model_io_type(content, input_type, output_type)


def interpreter_nodes(interpreter: Any) -> list[dict[str, Any]]:
    """A loaded TFLite interpreter's nodes (`index`, `op_name`, `inputs`, `outputs`): the
    file's, then the delegate nodes that took some of them over."""
    return private_attribute(interpreter, "_get_ops_details")()


def tflite_schema() -> Any:
    """TensorFlow's generated TFLite flatbuffer schema module."""
    return private("tensorflow.lite.python.schema_py_generated")


def builtin_code(operator_code: Any) -> int:
    """An operator code's builtin operator, read from whichever field the file uses."""
    return private("tensorflow.lite.python.schema_util.get_builtin_code_from_operator_code")(
        operator_code
    )


# torch


def weights_only_globals() -> set[str]:
    """The globals torch's weights-only unpickler allows, as `module.qualname` strings."""
    return set(private("torch._weights_only_unpickler._get_allowed_globals")())
