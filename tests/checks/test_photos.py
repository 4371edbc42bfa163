"""Real photographs: reading JPEG/PNG files and folders, timm's eval transform, bad files."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, photo_like, run
from PIL import Image

from volo_convert.architecture.variants import (
    RELEASE_CHECKPOINTS,
    RELEASE_CROP_PCT,
    EvalTransform,
    crop_pct,
)
from volo_convert.checks.photos import load_photos
from volo_convert.errors import ConversionError


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two JPEGs and a PNG, landscape and portrait, plus a text file that is skipped silently."""
    folder = tmp_path_factory.mktemp("photos")
    photo_like(300, 200, seed=0).save(folder / "landscape.jpg", quality=92)
    photo_like(180, 260, seed=1).save(folder / "portrait.JPEG", quality=92)
    photo_like(96, 96, seed=2).save(folder / "square.png")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_release_crop_pct_and_the_rule_for_other_sizes() -> None:
    assert {key: crop_pct(*key) for key in RELEASE_CROP_PCT} == RELEASE_CROP_PCT
    assert set(RELEASE_CROP_PCT) == set(RELEASE_CHECKPOINTS.values())
    assert crop_pct("d1", 256) == 0.96  # nearest release of d1: 224
    assert crop_pct("d4", 384) == 1.15  # nearest release of d4: 448
    assert crop_pct("d2", 304) == 0.96  # a tie between 224 and 384 goes to the smaller
    assert crop_pct("tiny", 64) == 0.96  # no release files


def test_photos_are_resized_and_centre_cropped_as_timm_eval(photo_folder: Path) -> None:
    size, pct = 64, 0.96
    pixels = load_photos([photo_folder], size, EvalTransform(pct), warn=pytest.fail)
    assert pixels.shape == (3, size, size, 3) and pixels.dtype == np.uint8
    # landscape.jpg, 300 x 200: short side to floor(64 / 0.96) = 66, so 99 x 66, then the
    # centre 64 columns start at round(35 / 2) = 18 of 99. Red rises left to right, so the
    # first and last columns of the crop show where it was taken.
    short_side = math.floor(size / pct)
    for index, (width, height, channel) in enumerate([(300, 200, 0), (180, 260, 1)]):
        picture = pixels[index].astype(np.float32)
        long_side = int(short_side * max(width, height) / min(width, height))
        start = round((long_side - size) / 2)
        along = max(width, height)  # the gradient runs along the long side in both
        for position in (0, size - 1):
            source = (start + position + 0.5) * along / long_side - 0.5
            expected = 255 * source / (along - 1)
            line = picture[:, position, channel] if channel == 0 else picture[position, :, channel]
            assert abs(np.median(line) - expected) < 6, (index, position)


def test_files_and_folders_mix_in_order(photo_folder: Path) -> None:
    pixels = load_photos(
        [photo_folder / "square.png", photo_folder], 32, EvalTransform(1.0), warn=pytest.fail
    )
    assert len(pixels) == 4
    np.testing.assert_array_equal(pixels[0], pixels[3])  # square.png, given twice


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(
    photo_folder: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photo_folder / "landscape.jpg").read_bytes()[:40])
    warned: list[str] = []
    pixels = load_photos(
        [broken, photo_folder / "square.png"], 32, EvalTransform(0.96), warn=warned.append
    )
    assert len(pixels) == 1
    (warning,) = warned
    assert warning.startswith(f"{broken}: skipped, not a readable image (")
    assert "\n" not in warning


def test_a_decompression_bomb_is_skipped_and_a_large_photo_read_quietly(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL's limits, scaled down: over twice MAX_IMAGE_PIXELS is refused, under it read."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 96)
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")  # 10x the limit
    photo_like(120, 120, seed=3).save(tmp_path / "large.png")  # 1.6x: PIL only warns
    warned: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = load_photos([tmp_path], 32, EvalTransform(0.96), warn=warned.append)
    assert pixels.shape == (1, 32, 32, 3)
    assert warned == [
        f"{tmp_path / 'bomb.png'}: skipped, not a readable image (Image size (90000 pixels) "
        "exceeds limit of 18432 pixels, could be decompression bomb DOS attack.)"
    ]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder, "{folder}: the folder holds no images (.jpg, .jpeg, .png)"),
        (lambda folder: folder / "missing.jpg", "{folder}/missing.jpg: no such file"),
        (
            lambda folder: (os.mkfifo(folder / "camera.jpg"), folder / "camera.jpg")[1],
            "{folder}/camera.jpg: is a FIFO (named pipe), expected a JPEG/PNG photo or a folder "
            "of them; refusing to read it",
        ),
    ],
)
def test_no_images_is_an_error(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "readme.txt").write_text("no photos here")
    with pytest.raises(ConversionError) as raised:
        load_photos([make(tmp_path)], 32, EvalTransform(0.96), warn=pytest.fail)
    assert str(raised.value) == message.format(folder=tmp_path)


def test_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("not a png")
    warned: list[str] = []
    with pytest.raises(ConversionError) as raised:
        load_photos([tmp_path], 32, EvalTransform(0.96), warn=warned.append)
    assert str(raised.value) == f"{tmp_path}: no readable JPEG or PNG image among them"
    assert len(warned) == 1 and warned[0].startswith(f"{tmp_path / 'fake.png'}: skipped")


def test_cli_verifies_on_photos_and_warns_once_per_bad_file(
    tiny_checkpoint: Path, photo_folder: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in photo_folder.iterdir():
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "cut.png").write_bytes((photo_folder / "square.png").read_bytes()[:60])
    output = tmp_path / "d1.h5"
    result = run(
        tiny_checkpoint, "-o", output, "--device", "cpu", "--images", photos,
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.output
    assert warnings[0].startswith(f"Warning: {photos / 'cut.png'}: skipped, not a readable image")
    assert "top-1 agreement 100%  (3 images)" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["batch_size"] == 3 and report["parity"]["max_abs_diff"] <= 1e-4
    per_image = report["parity"]["per_image"]
    names = ["landscape.jpg", "portrait.JPEG", "square.png"]
    assert [image["image"] for image in per_image] == [str(photos / name) for name in names]
    assert report["parity"]["photos"] and all(image["agrees"] for image in per_image)
    worst = max(per_image, key=lambda image: image["max_abs_diff"])
    assert worst["max_abs_diff"] == report["parity"]["max_abs_diff"]
    assert (
        f"worst image     {worst['image']}: top-1 {worst['torch_top1']} on both, max abs diff "
        f"{worst['max_abs_diff']:.3g}" in result.output.splitlines()
    )
    assert report["warnings"] == [warnings[0].removeprefix("Warning: ")]


def test_demo_warns_of_a_skipped_photo_as_convert_does(
    tiny_checkpoint: Path, photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`demo` shows the pipeline's warnings too; its checkpoint is the tiny one."""
    from volo_convert import synthetic

    def small_checkpoint(folder: Path, names: list[str], **settings: object) -> list[Path]:
        (folder / names[0]).parent.mkdir(parents=True, exist_ok=True)
        (folder / names[0]).write_bytes(tiny_checkpoint.read_bytes())
        return [folder / names[0]]

    monkeypatch.setattr(synthetic, "write_release_checkpoints", small_checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "square.png").write_bytes((photo_folder / "square.png").read_bytes())
    (photos / "cut.png").write_bytes((photo_folder / "square.png").read_bytes()[:60])
    result = run("demo", "--workdir", tmp_path / "demo", "--device", "cpu", "--images", photos)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.output
    assert warnings[0].startswith(f"Warning: {photos / 'cut.png'}: skipped, not a readable image")


def test_cli_refuses_a_folder_without_photos(tiny_checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.h5", "--device", "cpu", "--images", empty)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {empty}: the folder holds no images (.jpg, .jpeg, .png)"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]
