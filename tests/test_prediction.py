"""`volo-convert predict`: each format's top classes on photos, against PyTorch's; labels;
the README transcript; bad inputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import TINY_CONFIG, error_line, error_table, photo_like, run, snapshot, transcript

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import eval_transform
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.photos import read_photos
from volo_convert.checks.reference import run_reference
from volo_convert.environment import environment
from volo_convert.formats import read_provenance, save_model, write_provenance
from volo_convert.options import CALIBRATION_SEED, DEFAULT_CALIBRATION_IMAGES
from volo_convert.provenance import Provenance

TINY_SIZE = 64
LABELS = [f"class {name}" for name in "abcdefghij"]  # TINY_CONFIG has 10 classes
FLOAT_LOGIT_ATOL = 1e-4
# The tiny model as int8 (uint8 pixels in) moved each photo's logits by at most 0.30 of
# their std (0.08 on another weight seed), measured on these eight photos; fed the wrong
# input, it would move them by several stds.
INT8_DRIFT = 0.5
# file name -> (format, TFLite dtype, TFLite IO, input kind)
FILES = {
    "tiny.h5": ("h5", "float32", "float32", "images"),
    "tiny.keras": ("keras", "float32", "float32", "pixels"),
    "tiny_savedmodel": ("savedmodel", "float32", "float32", "images"),
    "tiny.tflite": ("tflite", "float32", "float32", "images"),
    "tiny_int8.tflite": ("tflite", "int8", "int8", "pixels"),  # uint8 pixels in
}


def _record(fmt: str, dtype: str, head: str = "full", labels: list[str] | None = None):
    return Provenance(
        converter_version="0.1.0",
        created="2026-01-02T03:04:05+00:00",
        source_file="tiny.pth.tar",
        source_sha256="ab" * 32,
        variant=TINY_CONFIG.name,
        image_size=TINY_SIZE,
        head=head,
        num_classes=TINY_CONFIG.num_classes,
        output_format=fmt,
        verification=None,
        environment=environment(),
        tflite_dtype=dtype if fmt == "tflite" else None,
        labels=labels,
    )


@pytest.fixture(scope="module")
def tiny_files(tiny_state_dict: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in every format, each with a provenance record (the .keras file's
    names its classes), plain.h5 without one, and two features files."""
    from volo_convert.weights.mapping import weight_mappings
    from volo_convert.weights.porting import port_weights

    folder = tmp_path_factory.mktemp("models")
    calibration = sample_pixels(DEFAULT_CALIBRATION_IMAGES, TINY_SIZE, CALIBRATION_SEED)
    for name, (fmt, dtype, io, input_kind) in FILES.items():
        model = build_volo(TINY_CONFIG, TINY_SIZE, input_kind=input_kind)
        port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
        inputs = (
            calibration.astype(np.float32) if input_kind == "pixels" else normalize(calibration)
        )
        save_model(model, folder / name, fmt, dtype, io, inputs if dtype == "int8" else None)
        labels = LABELS if fmt == "keras" else None
        write_provenance(folder / name, fmt, _record(fmt, dtype, labels=labels))
        if name == "tiny.h5":
            save_model(model, folder / "plain.h5", fmt)
    features = build_volo(TINY_CONFIG, TINY_SIZE, head="features")
    save_model(features, folder / "features.h5", "h5")
    save_model(features, folder / "features_record.h5", "h5")
    write_provenance(folder / "features_record.h5", "h5", _record("h5", "float32", "features"))
    keras.backend.clear_session()
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight photo-like pictures of several shapes, as JPEG and PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for seed in range(8):
        width, height = [(300, 200), (180, 260), (96, 96), (640, 480)][seed % 4]
        picture = photo_like(width, height, seed)
        if seed % 2:
            picture.save(folder / f"photo{seed}.png")
        else:
            picture.save(folder / f"photo{seed}.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def torch_logits(tiny_state_dict: dict, photos: Path) -> dict[str, np.ndarray]:
    """PyTorch's logits for each photo, prepared as verification prepares them."""
    prepared = read_photos(
        [photos], TINY_SIZE, eval_transform(TINY_CONFIG.name, TINY_SIZE), pytest.fail
    )
    reference = run_reference(
        TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", photos=prepared
    )
    return dict(zip(prepared.names, reference.outputs, strict=True))


def predicted(*args: object) -> dict:
    """`volo-convert predict ... --json`, parsed."""
    result = run("predict", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(FILES))
def test_predict_agrees_with_pytorch_on_every_format(
    name: str, tiny_files: Path, photos: Path, torch_logits: dict[str, np.ndarray]
) -> None:
    found = predicted(tiny_files / name, photos, "--top-k", TINY_CONFIG.num_classes)
    assert [image["image"] for image in found["images"]] == list(torch_logits)
    assert found["input"]["kind"] == FILES[name][3]
    for image in found["images"]:
        expected = torch_logits[image["image"]]
        indices = [score["index"] for score in image["top"]]
        logits = np.array([score["logit"] for score in image["top"]])
        assert sorted(indices) == list(range(TINY_CONFIG.num_classes))
        assert np.all(np.diff(logits) <= 0)  # most probable first
        probabilities = [score["probability"] for score in image["top"]]
        assert abs(sum(probabilities) - 1) < 1e-6
        if FILES[name][1] == "float32":
            assert indices[0] == int(expected.argmax())
            np.testing.assert_allclose(logits, expected[indices], atol=FLOAT_LOGIT_ATOL)
        else:  # int8: every logit within its noise, so PyTorch's top-1 where the margin is clear
            drift = np.abs(logits - expected[indices]).max()
            assert drift <= INT8_DRIFT * expected.std(), (image["image"], drift)
            margin = np.sort(expected)[-1] - np.sort(expected)[-2]
            if margin > 2 * INT8_DRIFT * expected.std():
                assert indices[0] == int(expected.argmax()), image


def test_labels_are_printed_when_recorded_and_indices_otherwise(
    tiny_files: Path, photos: Path
) -> None:
    labelled = run("predict", tiny_files / "tiny.keras", photos / "photo0.jpg", "--top-k", "2")
    assert labelled.exit_code == 0, labelled.output
    lines = labelled.stdout.splitlines()
    assert lines[0] == (
        f"{tiny_files / 'tiny.keras'}: VOLO tiny at 64px, 10 classes; photos cropped as "
        "timm's eval with crop_pct 0.96"
    )
    assert lines[1] == str(photos / "photo0.jpg")
    assert len(lines) == 4
    for line in lines[2:]:
        probability, index, label = line.split(maxsplit=2)
        assert label == LABELS[int(index)] and probability.endswith("%")

    plain = run("predict", tiny_files / "tiny.h5", photos / "photo0.jpg")
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    assert "10 classes, classes by index (no labels recorded)" in lines[0]
    assert len(lines) == 2 + 5  # header, the photo, the default top 5
    assert all(len(line.split()) == 2 for line in lines[2:])


def test_a_record_with_the_wrong_number_of_labels_warns(tiny_files: Path, photos: Path) -> None:
    path = tiny_files.parent / "few_labels.h5"
    path.write_bytes((tiny_files / "tiny.h5").read_bytes())
    write_provenance(path, "h5", dataclasses.replace(read_provenance(path), labels=["one"]))
    result = run("predict", path, photos / "photo1.png", "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "Warning: the record names 1 labels for 10 classes; naming classes by index\n"
    )
    assert len(result.stdout.splitlines()[-1].split()) == 2


def test_unreadable_photos_are_skipped_as_images_does(
    tiny_files: Path, photos: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photos / "photo0.jpg").read_bytes()[:40])
    found = run("predict", tiny_files / "tiny.h5", broken, photos / "photo2.jpg", "--json")
    assert found.exit_code == 0, found.output
    assert found.stderr.startswith(f"Warning: {broken}: skipped, not a readable image (")
    assert [image["image"] for image in json.loads(found.stdout)["images"]] == [
        str(photos / "photo2.jpg")
    ]


def _refused(tmp_path: Path, *args: object) -> str:
    """Runs `predict ARGS`, which must fail with exit 2 and leave tmp_path as it was."""
    before = snapshot(tmp_path)
    result = run("predict", *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert snapshot(tmp_path) == before
    return error_line(result)


def test_bad_inputs_are_one_line_and_exit_2(tiny_files: Path, photos: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    model, photo = tiny_files / "tiny.h5", photos / "photo0.jpg"
    cases = {
        "predict-model-missing": (
            [tmp_path / "none.h5", photo],
            f"{tmp_path / 'none.h5'}: no such file",
        ),
        "predict-not-a-model": (
            [tmp_path / "model.onnx", photo],
            f"{tmp_path / 'model.onnx'}: not a model file: expected a .h5, .keras, .tflite "
            "file or a SavedModel folder",
        ),
        "predict-image-missing": (
            [model, tmp_path / "cat.jpg"],
            f"{tmp_path / 'cat.jpg'}: no such file",
        ),
        "predict-not-an-image": (
            [model, tmp_path / "notes.txt"],
            f"{tmp_path / 'notes.txt'}: no readable JPEG or PNG image among them",
        ),
        "predict-features": (
            [tiny_files / "features_record.h5", photo],
            f"{tiny_files / 'features_record.h5'}: ends in the features head (32 features, no "
            "classes); predict needs a file converted with --head full or cls",
        ),
        "predict-no-images": ([model], "Missing argument 'IMAGE...'."),
    }
    for case, (args, message) in cases.items():
        assert _refused(tmp_path, *args) == f"Error: {message}", case
    # A Keras file without a record: its head read from its layers.
    assert _refused(tmp_path, tiny_files / "features.h5", photo) == (
        f"Error: {tiny_files / 'features.h5'}: ends in the features head (32 features, no "
        "classes); predict needs a file converted with --head full or cls"
    )
    table = error_table()
    assert all(f"`{case}`" in table for case in cases)


def test_a_file_without_a_record_is_predicted_after_a_warning(
    tiny_files: Path, photos: Path, torch_logits: dict[str, np.ndarray]
) -> None:
    path, photo = tiny_files / "plain.h5", photos / "photo3.png"
    result = run("predict", path, photo, "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"Warning: {path}: holds no volo-convert provenance record; photos are cropped with "
        "crop_pct 0.96 and classes named by index\n"
    )
    header, name, top = result.stdout.splitlines()
    assert header.startswith(f"{path}: a model at 64px, 10 classes, classes by index")
    assert name == str(photo) and int(top.split()[1]) == int(torch_logits[name].argmax())


@pytest.mark.large  # a subprocess, to see what it imports
def test_predict_imports_no_torch(tiny_files: Path, photos: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['volo-convert', 'predict', sys.argv[1], sys.argv[2], '--top-k', '1']\n"
        "try:\n"
        "    runpy.run_module('volo_convert', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, tiny_files / "tiny.tflite", photos / "photo0.jpg"],
        capture_output=True,
        text=True,
    )
    assert completed.stderr.splitlines()[-1] == "exit 0 False", completed.stderr
    assert completed.stdout.splitlines()[1] == str(photos / "photo0.jpg")


@pytest.mark.large  # converts a d1 (real widths)
def test_predict_prints_what_the_readme_shows(
    d1_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_terminal import shape

    monkeypatch.chdir(tmp_path)
    (tmp_path / "volo-demo").mkdir()
    (tmp_path / "photos").mkdir()
    for seed, (name, width, height) in enumerate(
        [("beach.jpg", 640, 480), ("portrait.jpg", 300, 400), ("street.png", 256, 256)]
    ):
        photo_like(width, height, seed).save(tmp_path / "photos" / name)
    assert run(d1_checkpoint, "-o", "volo-demo/d1_224.h5", "--no-verify").exit_code == 0
    result = run("predict", "volo-demo/d1_224.h5", "photos/")
    assert result.exit_code == 0, result.output
    shown = transcript("volo-convert predict volo-demo/d1_224.h5 photos/")
    assert [shape(line) for line in result.output.splitlines()] == [shape(line) for line in shown]
