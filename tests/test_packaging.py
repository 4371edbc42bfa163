"""A plain, non-editable install must carry the mapping tables."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_mapping_tables(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools writes build files beside the sources
    for folder in ("volo_convert", "mappings"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
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
    expected = {f"volo_convert/mappings/{path.name}" for path in (REPO / "mappings").glob("*.yaml")}
    assert shipped == expected

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import volo_convert.mapping as m; from volo_convert.variants import VARIANTS; "
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
