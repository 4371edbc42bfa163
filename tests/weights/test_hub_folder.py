"""Hugging Face hub folders as CHECKPOINT (docs/USAGE.md and docs/ERRORS.md).

The folders are written here the way timm 1.0.31's `save_for_hf` writes them (config.json
beside model.safetensors or pytorch_model.bin), so the tests need no timm. Conversions run
on the tiny test configuration, registered as the variant `tiny` (timm's `volo_tiny`);
the errors on a d1 at 32px.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, error_line, error_table, run, snapshot
from PIL import Image
from safetensors.torch import save_file

from volo_convert.architecture import variants
from volo_convert.architecture.variants import IMAGENET_MEAN, EvalTransform
from volo_convert.batch.runner import find_checkpoints, output_stem
from volo_convert.checks import photos
from volo_convert.formats import read_provenance
from volo_convert.formats.tflite_flatbuffer import metadata_document
from volo_convert.provenance import PROVENANCE_NAME
from volo_convert.weights.hub_folder import read_hub_config

CLASS_NAMES = [f"n{index:08d}" for index in range(TINY_CONFIG.num_classes)]
TINY_SIZE = 64  # conftest's tiny_state_dict


def timm_config(
    architecture: str = "volo_d1_224", num_classes: int = 1000, image_size: int = 32
) -> dict[str, Any]:
    """config.json as timm 1.0.31's save_for_hf writes it for a VOLO made with
    `timm.create_model(architecture, num_classes=..., img_size=...)`."""
    return {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": 384,
        "global_pool": "token",
        "model_args": {
            "num_classes": num_classes,
            "in_chans": 3,
            "global_pool": "token",
            "img_size": [image_size, image_size],
        },
        "pretrained_cfg": {
            "tag": "sail_in1k",
            "custom_load": False,
            "input_size": [3, image_size, image_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.96,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": [0.229, 0.224, 0.225],
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.conv.0",
            "classifier": ["head", "aux_head"],
            "license": "apache-2.0",
        },
    }


def write_hub_folder(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any] | str | None = None,
    weights_name: str = "model.safetensors",
) -> Path:
    """A hub folder: `config` (a dict as JSON, or text as it is; None for none) and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, tensor in state_dict.items()}
    if weights_name.endswith(".safetensors"):
        save_file(tensors, str(folder / weights_name))
    else:
        torch.save(tensors, folder / weights_name)
    config = timm_config() if config is None else config
    if config != "":
        text = config if isinstance(config, str) else json.dumps(config, indent=2)
        (folder / "config.json").write_text(text)
    return folder


def changed(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """timm's config for d1 at 32px, with `change` made to it."""
    config = copy.deepcopy(timm_config())
    change(config)
    return config


def write_snapshot(folder: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """The hub cache's layout: snapshots/<revision>/ holds symbolic links into blobs/."""
    blobs = write_hub_folder(folder / "blobs", state_dict, tiny_config())
    snapshot_folder = folder / "snapshots" / "0123abcd"
    snapshot_folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.relpath(blobs / name, snapshot_folder), snapshot_folder / name)
    return snapshot_folder


def write_config_only(folder: Path, weights: Callable[[Path], Any] | None = None) -> Path:
    """A folder with timm's config.json, and `weights(path)` called for model.safetensors."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(timm_config()))
    if weights is not None:
        weights(folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def d1_state_dict(d1_checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(d1_checkpoint, weights_only=True)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny configuration as a variant volo-convert detects, as timm's `volo_tiny`."""
    monkeypatch.setitem(variants.VARIANTS, "tiny", TINY_CONFIG)


def tiny_config(change: Callable[[dict[str, Any]], None] = lambda config: None) -> dict[str, Any]:
    """timm's config for the tiny configuration at 64px, with `change` made to it."""
    config = timm_config("volo_tiny", TINY_CONFIG.num_classes, TINY_SIZE)
    change(config)
    return config


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# case id -> (writes the hub folder into a folder and returns its path, the message)
HUB_ERROR_CASES: dict[str, tuple[Callable[[Path, dict], Path], str]] = {
    "hub-config-missing": (
        lambda folder, sd: write_hub_folder(folder / "hub", sd, config=""),
        "{input}: holds model.safetensors but no config.json, which names its architecture, "
        "classes and preprocessing; name {input}/model.safetensors itself to convert it by its "
        "tensors alone",
    ),
    "hub-weights-missing": (
        lambda folder, sd: write_config_only(folder / "hub"),
        "{input}: is a folder that holds config.json but no model.safetensors or "
        "pytorch_model.bin; expected a checkpoint file or a hub folder (config.json beside "
        "the weights)",
    ),
    "hub-weights-fifo": (
        lambda folder, sd: write_config_only(folder / "hub", weights=os.mkfifo),
        "{input}/model.safetensors: is a FIFO (named pipe), expected a checkpoint file; "
        "refusing to read it",
    ),
    "hub-weights-dangling-link": (
        lambda folder, sd: write_config_only(
            folder / "hub", weights=lambda path: os.symlink("../blobs/gone", path)
        ),
        "{input}/model.safetensors: no such file",
    ),
    "hub-config-malformed": (
        lambda folder, sd: write_hub_folder(folder / "hub", sd, config='{"architecture": '),
        "{input}/config.json: is not valid JSON (Expecting value at line 1 column 18)",
    ),
    "hub-config-not-an-object": (
        lambda folder, sd: write_hub_folder(folder / "hub", sd, config="[1, 2]"),
        "{input}/config.json: holds list, expected a JSON object",
    ),
    "hub-not-volo": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c.update(architecture="resnet50"))
        ),
        "{input}/config.json: architecture is 'resnet50', not a VOLO (volo_d1, volo_d2, "
        "volo_d3, volo_d4, volo_d5)",
    ),
    "hub-architecture-contradicts": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c.update(architecture="volo_d2_224"))
        ),
        "{input}: config.json says volo_d2_224, but the tensors are VOLO d1",
    ),
    "hub-num-classes-contradicts": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c.update(num_classes=10))
        ),
        "{input}: config.json says num_classes 10, but the head has 1000 classes (head.weight)",
    ),
    "hub-input-size-contradicts": (
        lambda folder, sd: write_hub_folder(folder / "hub", sd, timm_config(image_size=224)),
        "{input}: config.json says input size 224, but pos_embed is for 32px",
    ),
    "hub-label-count": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c.update(label_names=["cat", "dog"]))
        ),
        "{input}/config.json: label_names holds 2 names, but num_classes is 1000",
    ),
    "hub-mean-not-imagenet": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c["pretrained_cfg"].update(mean=[0.5] * 3))
        ),
        "{input}/config.json: mean is [0.5, 0.5, 0.5], but volo-convert normalises with "
        "ImageNet's mean [0.485, 0.456, 0.406], as VOLO was trained",
    ),
    "hub-field-wrong-type": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c.update(num_classes="1000"))
        ),
        '{input}/config.json: num_classes is "1000", which is not a whole number',
    ),
    "hub-crop-pct-out-of-range": (
        lambda folder, sd: write_hub_folder(
            folder / "hub", sd, changed(lambda c: c["pretrained_cfg"].update(crop_pct=0.001))
        ),
        "{input}/config.json: crop_pct is 0.001, expected 0.25 to 4.0",
    ),
    "hub-interpolation-unknown": (
        lambda folder, sd: write_hub_folder(
            folder / "hub",
            sd,
            changed(lambda c: c["pretrained_cfg"].update(interpolation="random")),
        ),
        "{input}/config.json: interpolation is 'random', expected one of bicubic, bilinear, "
        "nearest, lanczos, box, hamming",
    ),
}


@pytest.mark.parametrize("case", sorted(HUB_ERROR_CASES))
def test_bad_hub_folder_gets_one_line_and_exit_2(
    case: str, d1_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    write_input, message = HUB_ERROR_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    hub = write_input(inputs, d1_state_dict)
    before = snapshot(inputs, out_dir)
    result = run(hub, "-o", out_dir / "d1.keras", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert error_line(result) == "Error: " + message.format(input=hub)
    assert snapshot(inputs, out_dir) == before


def test_readme_lists_every_hub_case() -> None:
    table = error_table()
    for case in [*HUB_ERROR_CASES, *HUB_FORMS]:
        assert f"`{case}`" in table, case


# Accepted hub folders: case id -> (writes it, the provenance's source_file, class names)
HUB_FORMS: dict[str, tuple[Callable[[Path, dict], Path], str, list[str] | None]] = {
    "hub-safetensors": (
        lambda folder, sd: write_hub_folder(
            folder / "volo_tiny", sd, tiny_config(lambda c: c.update(label_names=CLASS_NAMES))
        ),
        "volo_tiny/model.safetensors",
        CLASS_NAMES,
    ),
    "hub-pytorch-bin": (
        lambda folder, sd: write_hub_folder(
            folder / "volo_tiny", sd, tiny_config(), weights_name="pytorch_model.bin"
        ),
        "volo_tiny/pytorch_model.bin",
        None,
    ),
    "hub-cache-snapshot": (
        lambda folder, sd: write_snapshot(folder / "models--timm--volo_tiny", sd),
        "0123abcd/model.safetensors",
        None,
    ),
}


@pytest.mark.parametrize("form", sorted(HUB_FORMS))
def test_hub_folder_converts_verifies_and_records_its_source(
    form: str, tiny: None, tiny_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    write_input, source_file, labels = HUB_FORMS[form]
    hub = write_input(tmp_path / "in", tiny_state_dict)
    before = snapshot(tmp_path / "in")
    report = out_dir / "report.json"
    output = out_dir / "tiny.keras"
    result = run(hub, "-o", output, "--device", "cpu", "--report", report)
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["status"] == "passed"
    assert figures["parity"]["max_abs_diff"] <= 5e-5  # float32 noise, at half the default atol
    assert (figures["variant"], figures["image_size"], figures["num_classes"]) == ("tiny", 64, 10)
    provenance = read_provenance(output)
    assert provenance is not None
    assert provenance.source_file == source_file
    weights = (hub / source_file.split("/")[1]).read_bytes()  # through the link, if one
    assert provenance.source_sha256 == hashlib.sha256(weights).hexdigest()
    assert provenance.labels == labels
    checked = run("verify", output, hub, "--device", "cpu")
    assert checked.exit_code == 0, checked.output
    assert "is not the checkpoint" not in checked.output
    assert snapshot(tmp_path / "in") == before


def test_a_hub_folder_converts_as_its_weights_file_does(
    tiny: None, tiny_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    """The folder and its weights file named directly give the same model."""
    hub = write_hub_folder(tmp_path / "hub", tiny_state_dict, tiny_config())
    assert run(hub, "-o", out_dir / "hub.h5", "--no-verify").exit_code == 0
    direct = run(hub / "model.safetensors", "-o", out_dir / "file.h5", "--no-verify")
    assert direct.exit_code == 0, direct.output
    import keras

    images = np.random.default_rng(0).normal(size=(2, TINY_SIZE, TINY_SIZE, 3))
    from_hub = keras.models.load_model(out_dir / "hub.h5").predict(images, verbose=0)
    from_file = keras.models.load_model(out_dir / "file.h5").predict(images, verbose=0)
    np.testing.assert_array_equal(from_hub, from_file)


def test_labels_reach_the_tflite_metadata_and_inspect(
    tiny: None, tiny_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    descriptions = {name: f"class {index}" for index, name in enumerate(CLASS_NAMES)}
    hub = write_hub_folder(
        tmp_path / "hub",
        tiny_state_dict,
        tiny_config(
            lambda c: c.update(
                label_names={str(index): name for index, name in enumerate(CLASS_NAMES[:-1])},
                label_descriptions=descriptions,
            )
        ),
    )
    output = out_dir / "tiny.tflite"
    result = run(hub, "-o", output, "--device", "cpu")
    assert result.exit_code == 0, result.output
    document = json.loads(metadata_document(output.read_bytes(), PROVENANCE_NAME))
    # the id -> name mapping's gap (class 9) reads as the class index
    assert document["labels"] == [*CLASS_NAMES[:-1], "9"]
    assert document["label_descriptions"] == [f"class {index}" for index in range(9)] + ["9"]
    shown = run("inspect", output)
    assert "labels     10 class names: n00000000, n00000001, n00000002, ..." in shown.output
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((70, 90, 3), 120, dtype=np.uint8)).save(photo)
    predicted = run("predict", output, photo, "--json", "--top-k", "10")
    assert predicted.exit_code == 0, predicted.output
    (image,) = json.loads(predicted.output)["images"]
    # predict names classes by their descriptions where the record has them
    assert sorted(score["label"] for score in image["top"]) == sorted(
        [f"class {index}" for index in range(9)] + ["9"]
    )


def test_photos_are_prepared_with_the_config_preprocessing(
    tiny: None,
    tiny_state_dict: dict,
    tmp_path: Path,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--images and --calibration-images use config.json's crop_pct, interpolation and
    crop mode; without a hub folder, the release ones."""
    hub = write_hub_folder(
        tmp_path / "hub",
        tiny_state_dict,
        tiny_config(
            lambda c: c["pretrained_cfg"].update(
                crop_pct=1.0, interpolation="bilinear", crop_mode="squash"
            )
        ),
    )
    photo_folder = tmp_path / "photos"
    photo_folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(2):
        pixels = generator.integers(0, 256, (80 + 8 * index, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photo_folder / f"photo{index}.png")
    used: list[EvalTransform] = []
    prepare = photos.prepare_photo

    def recording(path: Path, image_size: int, transform: EvalTransform) -> np.ndarray:
        used.append(transform)
        return prepare(path, image_size, transform)

    monkeypatch.setattr(photos, "prepare_photo", recording)
    calibrated = ["--tflite-dtype", "int8", "--calibration-images", photo_folder]
    result = run(hub, "-o", out_dir / "tiny.tflite", *calibrated, "--no-verify")
    assert result.exit_code == 0, result.output
    result = run(hub, "-o", out_dir / "tiny.keras", "--device", "cpu", "--images", photo_folder)
    assert result.exit_code == 0, result.output
    assert used == [EvalTransform(1.0, "bilinear", "squash")] * 4
    used.clear()
    predicted = run("predict", out_dir / "tiny.keras", photo_folder)
    assert predicted.exit_code == 0, predicted.output
    assert "crop_pct 1, bilinear interpolation, crop mode squash" in predicted.output
    assert used == [EvalTransform(1.0, "bilinear", "squash")] * 2
    used.clear()
    plain = hub / "model.safetensors"
    result = run(plain, "-o", out_dir / "plain.keras", "--device", "cpu", "--images", photo_folder)
    assert result.exit_code == 0, result.output
    assert used == [EvalTransform(0.96, "bicubic", "center")] * 2


def test_squash_and_border_crop_modes_as_timm(tmp_path: Path) -> None:
    """squash resizes both sides; border fits the longer side and pads with the mean colour."""
    wide = tmp_path / "wide.png"
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :150] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 150:] = (0, 0, 255)
    Image.fromarray(pixels).save(wide)
    squashed = photos.prepare_photo(wide, 32, EvalTransform(1.0, "nearest", "squash"))
    assert squashed.shape == (32, 32, 3)
    assert tuple(squashed[16, 0]) == (255, 0, 0) and tuple(squashed[16, 31]) == (0, 0, 255)
    bordered = photos.prepare_photo(wide, 32, EvalTransform(1.0, "nearest", "border"))
    # 300 x 100 fits 32 wide as 32 x round(100 / 9.375) = 11 rows, padded to 32: rows 10..20
    fill = tuple(round(255 * mean) for mean in IMAGENET_MEAN)
    assert all(tuple(bordered[row, 16]) == fill for row in (*range(10), *range(21, 32)))
    assert tuple(bordered[15, 0]) == (255, 0, 0) and tuple(bordered[15, 31]) == (0, 0, 255)
    centred = photos.prepare_photo(wide, 32, EvalTransform(1.0, "nearest", "center"))
    # centre mode keeps the aspect ratio and crops: 96 x 32, the middle 32 columns
    assert tuple(centred[16, 0]) == (255, 0, 0) and tuple(centred[16, 31]) == (0, 0, 255)
    assert (centred[:, :16] == (255, 0, 0)).all() and (centred[:, 16:] == (0, 0, 255)).all()


def test_batch_takes_hub_folders_beside_files(tmp_path: Path) -> None:
    """A batch folder's hub subfolders are checkpoints named after the folder; a hub
    folder given itself is one checkpoint; other subfolders are not looked into."""
    (tmp_path / "a.pth.tar").write_bytes(b"x")
    hub = tmp_path / "volo_d1_hub"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.pth").write_bytes(b"x")
    assert find_checkpoints([tmp_path]) == [tmp_path / "a.pth.tar", hub]
    assert find_checkpoints([hub]) == [hub]
    assert output_stem(hub) == "volo_d1_hub"


def test_configs_as_the_hub_holds_them_read_as_timm_reads_them(tmp_path: Path) -> None:
    """Without model_args (older timm), and timm's single-dict layout with `labels`."""
    hub_held = timm_config("volo_d2_384", 1000, 384)
    del hub_held["model_args"]
    hub_held["pretrained_cfg"].update(crop_pct=1.0)
    (tmp_path / "hub.json").write_text(json.dumps(hub_held))
    config = read_hub_config(tmp_path / "hub.json")
    assert (config.variant, config.num_classes, config.image_size) == ("d2", 1000, 384)
    assert config.transform(384) == EvalTransform(1.0, "bicubic", "center")
    assert config.labels is None
    single = {"architecture": "volo_d1_224", "num_classes": 2, "labels": ["cat", "dog"]}
    (tmp_path / "single.json").write_text(json.dumps(single))
    config = read_hub_config(tmp_path / "single.json")
    assert (config.variant, config.image_size, config.labels) == ("d1", None, ("cat", "dog"))
    assert config.transform(224) == EvalTransform(0.96)  # what the config leaves out: the release's


@pytest.mark.large
def test_batch_converts_a_hub_folder_and_resumes(d1_state_dict: dict, tmp_path: Path) -> None:
    """A hub folder inside a batch folder is converted in its own process as
    OUT_DIR/<folder>.h5; a re-run finds it done by its weights file's SHA-256."""
    members = tmp_path / "members"
    hub = write_hub_folder(members / "volo_d1_hub", d1_state_dict)
    out_dir = tmp_path / "out"
    result = run("batch", members, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads((out_dir / "report.json").read_text())["checkpoints"]
    assert [(row["file"], row["output"], row["status"]) for row in rows] == [
        ("volo_d1_hub", "volo_d1_hub.h5", "passed")
    ]
    assert rows[0]["sha256"] == hashlib.sha256((hub / "model.safetensors").read_bytes()).hexdigest()
    again = run("batch", members, "-o", out_dir, "--device", "cpu")
    assert again.exit_code == 0, again.output
    rows = json.loads((out_dir / "report.json").read_text())["checkpoints"]
    assert rows[0]["status"] == "skipped"
