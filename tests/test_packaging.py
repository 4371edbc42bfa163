"""What a user installs and imports: the wheel's tables, and `import volo_convert` alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import TINY_CONFIG

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.large
def test_wheel_ships_the_mapping_tables(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools writes build files beside the sources
    shutil.copytree(
        REPO / "volo_convert", source / "volo_convert", ignore=shutil.ignore_patterns("__pycache__")
    )
    for file_name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file_name, source / file_name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("volo_convert-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    tables = REPO / "volo_convert" / "weights" / "tables"
    expected = {f"volo_convert/weights/tables/{path.name}" for path in tables.glob("*.yaml")}
    assert shipped == expected

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import volo_convert.weights.mapping as m; "
        "from volo_convert.architecture.variants import VARIANTS; "
        "print(m.__file__); print(len(m.weight_mappings(VARIANTS['d1'])))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    )
    module_file, count = completed.stdout.split()
    assert module_file.startswith(str(site))
    assert int(count) == 257


# Run in a fresh process: loads the files after a plain `import volo_convert`, reports
# whether torch came in with it, and the largest logit difference from `expected.npy`.
LOAD_AFTER_IMPORT = """
import sys
import keras, numpy as np
import volo_convert
images, expected = np.load(sys.argv[1]), np.load(sys.argv[2])
for path in sys.argv[3:]:
    model = keras.models.load_model(path)
    print(path, float(np.abs(model.predict_on_batch(images) - expected).max()))
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.large
def test_plain_import_registers_the_layers_without_torch(
    tiny_state_dict: dict, tmp_path: Path
) -> None:
    import numpy as np

    from volo_convert.architecture.keras_model import build_volo
    from volo_convert.checks.images import sample_images
    from volo_convert.weights.mapping import weight_mappings
    from volo_convert.weights.porting import port_weights

    model = build_volo(TINY_CONFIG, 64)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    images = sample_images(2, 64, seed=1)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", np.asarray(model.predict_on_batch(images)))
    files = [tmp_path / "tiny.h5", tmp_path / "tiny.keras"]
    for path in files:
        model.save(path)
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_AFTER_IMPORT, tmp_path / "images.npy",
         tmp_path / "expected.npy", *files],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    for path, line in zip(files, lines, strict=False):
        name, diff = line.rsplit(" ", 1)
        assert name == str(path) and float(diff) <= 1e-6
    assert lines[-1] == "torch imported: False"


@pytest.mark.large
def test_importtime_shows_no_torch() -> None:
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import volo_convert"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    imported = {line.split("|")[-1].strip() for line in completed.stderr.splitlines()}
    assert "volo_convert.architecture.keras_layers" in imported
    assert "torch" not in imported


# Top to bottom; a module may import from its own row or the rows below it, never above.
# The package itself registers the Keras layers, so it sits on top; importing its
# `__version__` is no dependency (any submodule import runs the package first anyway).
IMPORT_LAYERS = (
    ("__init__", "cli", "__main__"),
    ("api", "junit"),
    ("pipeline", "batch", "results"),
    ("checks", "formats"),
    ("weights", "architecture", "synthetic"),
    ("options", "errors", "environment", "paths", "signals", "provenance", "native_logs"),
)


def _unit(module: str) -> str:
    """`volo_convert.checks.parity` -> `checks`; the package itself -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_imports() -> dict[str, set[str]]:
    """Module -> the volo_convert modules it imports, anywhere in its body."""
    import ast

    package = REPO / "volo_convert"
    imports = {}
    for source in package.rglob("*.py"):
        relative = source.relative_to(REPO).with_suffix("")
        module = ".".join(part for part in relative.parts if part != "__init__")
        found = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("volo_convert"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("volo_")}
        imports[module] = found
    return imports


def test_imports_run_one_way_without_cycles() -> None:
    layer_of = {unit: index for index, units in enumerate(IMPORT_LAYERS) for unit in units}
    imports = _package_imports()
    upward = [
        f"{module} -> {target}"
        for module, targets in imports.items()
        for target in targets
        if target != "volo_convert" and layer_of[_unit(target)] < layer_of[_unit(module)]
    ]
    assert upward == []
    units: dict[str, set[str]] = {}
    for module, targets in imports.items():
        units.setdefault(_unit(module), set()).update(
            _unit(target)
            for target in targets
            if target != "volo_convert" and _unit(target) != _unit(module)
        )
    visiting: list[str] = []

    def visit(unit: str) -> None:
        assert unit not in visiting, f"import cycle: {' -> '.join([*visiting, unit])}"
        visiting.append(unit)
        for target in units.get(unit, ()):
            visit(target)
        visiting.pop()

    for unit in units:
        visit(unit)
