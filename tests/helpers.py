"""Shared test helpers: the tiny architecture, an in-process runner for the CLI, and checks
of what a run printed and left behind. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from volo_convert.architecture.variants import VARIANTS, VoloConfig
from volo_convert.cli import cli

# Two outlookers and one block per transformer stage, every width small: fast yet complete.
TINY_CONFIG = VoloConfig(
    name="tiny",
    layers=(2, 1, 1, 1),
    embed_dims=(16, 32, 32, 32),
    num_heads=(2, 4, 4, 4),
    mlp_ratio=3,
    stem_hidden_dim=8,
    num_classes=10,
)
SMALL_IMAGE_SIZE = 32  # the smallest size every variant accepts
REPO = Path(__file__).resolve().parents[1]
# The user's documentation: the README, then the pages it links to.
DOCUMENTS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))


def documented(page: str) -> str:
    """The text of one documentation page: "README.md", or a docs/ page ("ERRORS.md")."""
    return (REPO / page if page == "README.md" else REPO / "docs" / page).read_text()


def error_table() -> str:
    """The "Inputs and errors" page from its table on: every accepted form and error case."""
    page = documented("ERRORS.md")
    return page[page.index("## Inputs and errors") :]


def transcript(command: str) -> list[str]:
    """The lines the documentation shows after `$ COMMAND` (the first page that shows it),
    up to the next prompt or the end of the block."""
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        if f"$ {command}" in lines:
            break
    else:
        raise AssertionError(f"no page shows `$ {command}`")
    shown = []
    for line in lines[lines.index(f"$ {command}") + 1 :]:
        if line.startswith(("$ ", "```")):
            break
        shown.append(line)
    return shown


@contextlib.contextmanager
def tiny_variant_known() -> Iterator[None]:
    """The tiny layout joins the variant table inside the block, so the CLI and the API
    detect a tiny checkpoint as they detect d1 (in this process only)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, TINY_CONFIG.name, TINY_CONFIG)
        yield


@dataclasses.dataclass(frozen=True)
class SyntheticCheckpoint:
    """A synthetic release-format checkpoint file at SMALL_IMAGE_SIZE and what it holds."""

    path: Path
    config: VoloConfig


def user_environment(**changes: str) -> dict[str, str]:
    """The environment a user's shell gives a subprocess: without the quieting conftest sets."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TF_CPP_MIN_LOG_LEVEL", "VOLO_CONVERT_DEBUG")
    }
    return {**environment, **changes}


def run(*args: object) -> Result:
    """Runs `volo-convert ARGS` in-process through click's CliRunner."""
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def error_line(result: Result) -> str:
    """The single `Error:` line of a failed run; there must be no traceback."""
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every entry under `folders` -> what it is: a file's SHA-256, a link's target, a kind.

    Taken before and after a run, equal snapshots mean nothing was added, removed or
    changed; FIFOs and devices are named, never opened.
    """
    entries = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                kind = f"link to {os.readlink(path)}"
            elif stat.S_ISREG(mode):
                kind = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                kind = "folder" if stat.S_ISDIR(mode) else f"special {stat.S_IFMT(mode)}"
            entries[str(path)] = kind
    return entries


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A picture with smooth gradients, a sharp-edged shape and mild noise, not uniform noise."""
    generator = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * cols / (width - 1)  # left to right
    green = 255 * rows / (height - 1)  # top to bottom
    blue = np.full_like(red, 60.0 + 40 * seed)
    pixels = np.stack([red, green, blue], axis=-1)
    top, left = height // 3, width // 3
    pixels[top : 2 * top, left : 2 * left] = (240, 30 + 20 * seed, 90)  # a hard-edged block
    pixels += generator.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
