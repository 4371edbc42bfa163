"""Shared fixtures: tiny and full-size synthetic checkpoints. Helpers are in helpers.py.

Tests marked `large` (full-size d1 widths, or a spawned process) run in the second tier:
`pytest -m large`; plain `pytest` runs the rest, and `.ci/run` runs both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
import torch
from helpers import SMALL_IMAGE_SIZE, TINY_CONFIG, SyntheticCheckpoint, tiny_variant_known

from volo_convert.architecture.variants import VARIANTS
from volo_convert.synthetic import make_state_dict, write_checkpoint

MAX_WORKERS = 4  # each holds torch, TensorFlow and a model or two: about 2-4 GB


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto` (pyproject.toml): one per core, at most MAX_WORKERS, when whole
    folders run (plain `pytest`); none when files or tests are named, which run here."""
    whole_folders = all(Path(arg.split("::")[0]).is_dir() for arg in config.args)
    return min(MAX_WORKERS, os.cpu_count() or 1) if whole_folders else 0


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return make_state_dict(TINY_CONFIG, 64, seed=3)


@pytest.fixture(scope="session")
def tiny_checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic release-format checkpoint of TINY_CONFIG at 32px (a bare state dict)."""
    folder = tmp_path_factory.mktemp("tiny_checkpoints")
    return write_checkpoint(folder / "tiny_32.pth.tar", TINY_CONFIG, SMALL_IMAGE_SIZE, seed=5)


@pytest.fixture
def tiny_variant() -> Iterator[None]:
    """The CLI and the API know the tiny layout while the test runs (tiny_variant_known)."""
    with tiny_variant_known():
        yield


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_file: Path, tiny_variant: None) -> Path:
    """The tiny checkpoint, which the CLI converts in seconds; use d1_checkpoint (large)
    where a behaviour depends on the real widths."""
    return tiny_checkpoint_file


@pytest.fixture(scope="session")
def d1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic release-format d1 checkpoint at 32px (real widths, 107 MB)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return write_checkpoint(folder / "d1_32.pth.tar", VARIANTS["d1"], SMALL_IMAGE_SIZE, seed=5)


@pytest.fixture(params=["tiny", pytest.param("d1", marks=pytest.mark.large)])
def sized_checkpoint(request: pytest.FixtureRequest, tiny_variant: None) -> SyntheticCheckpoint:
    """Runs the test twice: on the tiny checkpoint, and on d1 (large), for the behaviours
    whose figures (tolerances, sizes) depend on the real widths."""
    if request.param == "tiny":
        return SyntheticCheckpoint(request.getfixturevalue("tiny_checkpoint_file"), TINY_CONFIG)
    return SyntheticCheckpoint(request.getfixturevalue("d1_checkpoint"), VARIANTS["d1"])
