"""Keras starting in a process that imported volo_convert: start-up lines held back, layers
registered.

`import volo_convert` promises that `keras.models.load_model` then reads a converted file,
which needs the custom layers registered with Keras. Importing Keras (and TensorFlow with
it) takes seconds that `volo-convert --help` and `inspect` have no use for, so the package
does not import it: `register_layers_with_keras` registers the layers at once where Keras
is already imported, and otherwise the moment it is, from a finder on `sys.meta_path`.
The first import of `keras` or `tensorflow` (either may come first; Keras imports
TensorFlow) runs inside `known_lines_held_back(STARTUP_LINES)`, as when `import
volo_convert` imported them itself.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from volo_convert.native_logs import STARTUP_LINES, find_tensorflow_devices, known_lines_held_back

WATCHED = ("keras", "tensorflow")


def _register_layers() -> None:
    """Importing the layers' module registers them: each class is decorated."""
    from volo_convert.architecture import keras_layers  # noqa: F401


class _KerasImportFinder:
    """Finds `keras` and `tensorflow` as the other finders would, and runs their first import
    with the start-up lines held back; once Keras is imported, registers the layers and
    leaves `sys.meta_path`. (A meta path finder needs only `find_spec`; `importlib.abc`
    would cost the CLI's start 0.1 s.)"""

    def __init__(self) -> None:
        self.busy = False  # inside a watched import or search: the nested ones run as usual

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in WATCHED or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(fullname)  # the finders after this one
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        load_module_body = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            self.busy = True
            try:
                with known_lines_held_back(STARTUP_LINES):
                    load_module_body(module)
                    find_tensorflow_devices()
            finally:
                self.busy = False
                del loader.exec_module  # the loader as it was
            if "keras" in sys.modules:
                _register_layers()
                sys.meta_path.remove(self)

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this module's loader only
        return spec


def register_layers_with_keras() -> None:
    """Registers the custom layers now if Keras is imported, else when it is imported."""
    if "keras" in sys.modules:
        _register_layers()
    elif not any(isinstance(finder, _KerasImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportFinder())
