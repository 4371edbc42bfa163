"""What a user installs and imports: the wheel's tables, and `import volo_convert` alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import DOCUMENTS, TINY_CONFIG

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
# IMPORTS names the order: Keras first (registered at once) or the package first
# (registered the moment Keras is imported).
LOAD_AFTER_IMPORT = """
import sys
{imports}
import numpy as np
images, expected = np.load(sys.argv[1]), np.load(sys.argv[2])
for path in sys.argv[3:]:
    model = keras.models.load_model(path)
    print(path, float(np.abs(model.predict_on_batch(images) - expected).max()))
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.large
@pytest.mark.parametrize(
    "imports", ["import keras\nimport volo_convert", "import volo_convert\nimport keras"]
)
def test_plain_import_registers_the_layers_without_torch(
    imports: str, tiny_state_dict: dict, tmp_path: Path
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
        [sys.executable, "-c", LOAD_AFTER_IMPORT.format(imports=imports), tmp_path / "images.npy",
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
        [sys.executable, "-X", "importtime", "-c", "import volo_convert; import keras"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    imported = {line.split("|")[-1].strip() for line in completed.stderr.splitlines()}
    assert "volo_convert.architecture.keras_layers" in imported
    assert "torch" not in imported


ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"


def _table(header: str) -> list[list[str]]:
    """The rows of the ARCHITECTURE.md table under `header`, each a list of its cells."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = lines.index(header) + 2  # past the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _named(cell: str) -> list[str]:
    """The code names in a table cell: `cli/`, `api.py`, `weights/loading.py`."""
    import re

    return re.findall(r"`([^`]+)`", cell)


def _import_layers() -> list[tuple[str, ...]]:
    """The layer table of ARCHITECTURE.md, top to bottom, as units (`cli`, `api`, ...)."""
    return [
        tuple(name.removesuffix("/").removesuffix(".py") for name in _named(modules))
        for _, modules in _table("| layer | modules |")
    ]


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
    """As ARCHITECTURE.md says: a module imports from its own row or the rows below it,
    and no two units import each other, directly or round a cycle."""
    layer_of = {unit: index for index, units in enumerate(_import_layers()) for unit in units}
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


def _top_level_names(source: Path) -> list[str]:
    """The functions, classes and constants a module defines at its top level."""
    import ast

    names = []
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
    return [name for name in names if not name.startswith("__")]


def _identifiers(sources: list[Path]) -> set[str]:
    """Every name and attribute the sources use, and every identifier their strings hold."""
    import ast
    import re

    used = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                used |= set(re.findall(r"\w+", node.value))
    return used


def test_the_package_holds_no_dead_or_test_only_code() -> None:
    """Every top-level name is used by the package itself or its scripts; what only tests
    use is a hook, and tests reach such points through public seams instead."""
    package = sorted((REPO / "volo_convert").rglob("*.py"))
    used = _identifiers(package + sorted((REPO / "scripts").glob("*.py")))
    unused = [
        f"{source.relative_to(REPO)}: {name}"
        for source in package
        for name in _top_level_names(source)
        if name not in used and not source.match("cli/*.py")  # click registers commands
    ]
    assert unused == []


def test_the_package_reads_only_documented_environment_variables() -> None:
    """An environment variable the documentation does not name is a hidden switch (a test hook)."""
    import ast

    readme = "".join(document.read_text() for document in DOCUMENTS)
    read = set()
    for source in (REPO / "volo_convert").rglob("*.py"):
        tree = ast.parse(source.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript):
                owner, key = node.value, node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, key = node.func.value, (node.args or [None])[0]
            else:
                continue
            if isinstance(owner, ast.Attribute) and owner.attr == "environ":
                if isinstance(key, ast.Name):
                    read.add(constants[key.id])
                elif isinstance(key, ast.Constant):
                    read.add(key.value)
    assert read == {name for name in read if f"{name}=" in readme or f"`{name}`" in readme}


def test_every_module_has_a_row_in_the_architecture_table() -> None:
    """Each module is named by its path, or by its file name in its folder's row; a
    subpackage's `__init__.py` by any row of its folder."""
    rows = _table("| module | concern |")
    named = {name for cells in rows for name in _named(cells[0])}
    in_folder_row = {
        f"{folder}{name}"
        for cells in rows
        for folder in _named(cells[0])
        if folder.endswith("/")
        for name in _named(" ".join(cells))
        if name.endswith(".py") and "/" not in name
    }
    folders = {name.rpartition("/")[0] + "/" for name in named if "/" in name}
    missing = []
    for source in sorted((REPO / "volo_convert").rglob("*.py")):
        module = source.relative_to(REPO / "volo_convert").as_posix()
        folder = module.rpartition("/")[0] + "/"
        covered = module in named or module in in_folder_row
        if source.name == "__init__.py" and folder in folders:
            covered = True
        if not covered:
            missing.append(module)
    assert missing == []
