"""The Python API, called the way the README's "Python API" section calls it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import SMALL_IMAGE_SIZE, SyntheticCheckpoint

import volo_convert
from volo_convert.api import VerificationWarning
from volo_convert.errors import ConversionError
from volo_convert.synthetic import write_checkpoint

# `import volo_convert` stays torch-free; the API brings torch in when first used.
LAZY_API = """
import sys
import volo_convert
print("torch" in sys.modules, "volo_convert.pipeline" in sys.modules)
convert = volo_convert.convert
print("torch" in sys.modules, convert.__module__, "convert" in dir(volo_convert))
"""


def test_convert_then_verify_as_the_readme_shows(
    sized_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = sized_checkpoint.config
    checkpoint = tmp_path / f"{config.name}_32.pth.tar"
    shutil.copy(sized_checkpoint.path, checkpoint)
    model_file = tmp_path / f"{config.name}.keras"

    result = volo_convert.convert(checkpoint, model_file, device="cpu")
    assert result.passed and result.status == "passed"
    assert (result.variant, result.image_size, result.head) == (
        config.name,
        SMALL_IMAGE_SIZE,
        "full",
    )
    assert 0 < result.parity.max_abs_diff <= 2e-5
    assert result.parity.top1_agreement == 1.0
    assert str(result) == result.summary()
    assert str(result).splitlines()[-1] == "PASS"
    assert keras.models.load_model(model_file).output_shape == (None, config.num_classes)

    check = volo_convert.verify(model_file, checkpoint)
    assert check.passed and check.warnings == []
    assert check.checkpoint_sha256 == check.recorded_sha256 == result.checkpoint_sha256

    other = write_checkpoint(tmp_path / "other.pth.tar", config, SMALL_IMAGE_SIZE, seed=9)
    with pytest.warns(VerificationWarning, match=r"other.pth.tar is not the checkpoint") as caught:
        mismatch = volo_convert.verify(model_file, other)
    assert caught[0].filename == __file__  # the warning points at the user's line
    assert not mismatch.passed and mismatch.status == "failed"
    assert mismatch.parity.max_abs_diff > 1
    assert mismatch.diagnosis.first_failing_stage == "stem"


def test_options_are_checked_once_and_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="image size must be a positive multiple of 16"):
        volo_convert.convert(tmp_path / "d1.pth.tar", tmp_path / "d1.h5", image_size=200)
    with pytest.raises(ConversionError, match=r"d1.pth.tar: no such file"):
        volo_convert.convert(tmp_path / "d1.pth.tar", tmp_path / "d1.h5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        volo_convert.verify(tmp_path / "d1.h5", tmp_path / "d1.pth.tar", colour="red")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.large
def test_the_api_is_imported_on_first_use() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", LAZY_API], capture_output=True, text=True, check=True
    )
    assert completed.stdout.splitlines() == ["False False", "True volo_convert.api True"]


def test_photos_given_as_one_path_and_a_bad_photo_warns(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`images` takes one path or several; an unreadable photo warns at the user's line."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    gradient = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).astype(np.uint8)
    Image.fromarray(gradient).save(photos / "gradient.png")
    (photos / "cut.png").write_bytes((photos / "gradient.png").read_bytes()[:50])
    with pytest.warns(VerificationWarning, match=r"cut.png: skipped, not a readable") as caught:
        result = volo_convert.convert(
            tiny_checkpoint, tmp_path / "d1.h5", images=photos, device="cpu"
        )
    assert caught[0].filename == __file__
    assert result.passed and result.parity.batch_size == 1
    assert result.parity.max_abs_diff <= 1e-4
    assert len(result.warnings) == 1
