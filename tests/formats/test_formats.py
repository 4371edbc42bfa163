"""Deployment formats: SavedModel folders and TFLite files, written, reloaded and verified."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from helpers import SMALL_IMAGE_SIZE, TINY_CONFIG, error_line, run, snapshot

from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.diagnosis import REBUILT_PASSES
from volo_convert.checks.parity import check_parity, model_outputs
from volo_convert.checks.reference import ReferenceRun, run_reference
from volo_convert.environment import environment
from volo_convert.errors import ConversionError
from volo_convert.formats import (
    artifact_format,
    input_contract,
    load_artifact,
    output_format,
    read_provenance,
    runtime_name,
    save_model,
    write_provenance,
)
from volo_convert.formats.savedmodel import SavedModelRunner
from volo_convert.formats.tflite import TFLiteRunner, convert_to_tflite
from volo_convert.formats.tflite_flatbuffer import check_builtin_ops, operator_names, weight_dtype
from volo_convert.options import FLOAT16_ATOL
from volo_convert.paths import check_output_path, move_into_place, staged_output
from volo_convert.pipeline import conversion
from volo_convert.provenance import PROVENANCE_NAME, Provenance, VerificationRecord
from volo_convert.synthetic import write_checkpoint
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

TINY_SIZE = 64  # the size of conftest's tiny_state_dict
FLOAT32_ATOL = 5e-5  # float32 noise at small sizes, as in test_parity.py

# Loads the artifacts with TensorFlow alone: importing volo_convert would fail.
STANDALONE_SCRIPT = """
import sys
sys.modules["volo_convert"] = None
import numpy as np, tensorflow as tf
folder, tflite_file, images_file, out_file = sys.argv[1:]
images = np.load(images_file)
serve = tf.saved_model.load(folder).signatures["serving_default"]
saved_model_logits = serve(images=tf.constant(images))["logits"].numpy()
interpreter = tf.lite.Interpreter(model_path=tflite_file)
interpreter.allocate_tensors()
tflite_logits = []
for image in images:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
    interpreter.invoke()
    tflite_logits.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
np.savez(out_file, saved_model=saved_model_logits, tflite=np.stack(tflite_logits))
"""


SAMPLE_PROVENANCE = Provenance(
    converter_version="0.1.0",
    created="2026-01-02T03:04:05+00:00",
    source_file="tiny.pth.tar",
    source_sha256="ab" * 32,
    variant="tiny",
    image_size=TINY_SIZE,
    head="full",
    num_classes=10,
    output_format="h5",
    verification=VerificationRecord(
        max_abs_diff=1.5e-6,
        max_rel_diff=2e-7,
        top1_agreement=1.0,
        atol=1e-4,
        images=2,
        seed=0,
        device="cpu",
        runtime="Keras (tensorflow backend)",
        seconds=1.2,
    ),
    environment=environment(),
)
# Reads a file's provenance the way a user does; prints whether torch was imported on the way.
INSPECT_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["volo-convert", "inspect", "--json", sys.argv[1]]
try:
    runpy.run_module("volo_convert", run_name="__main__")
except SystemExit as exit:
    print("exit", exit.code, "torch" in sys.modules, file=sys.stderr)
"""


def inspected(path: Path) -> dict:
    """`volo-convert inspect --json PATH`, through the CLI."""
    result = run("inspect", "--json", path)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def tiny_model(tiny_state_dict: dict) -> keras.Model:
    model = build_volo(TINY_CONFIG, TINY_SIZE)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    return model


@pytest.fixture(scope="module")
def tiny_run(tiny_state_dict: dict) -> ReferenceRun:
    return run_reference(TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", seed=7)


@pytest.fixture(scope="module")
def tiny_images(tiny_run: ReferenceRun) -> np.ndarray:
    return tiny_run.images


@pytest.fixture(scope="module")
def tiny_reference(tiny_run: ReferenceRun) -> np.ndarray:
    return tiny_run.outputs


@pytest.fixture(scope="module")
def tiny_tflite(tiny_model: keras.Model) -> dict[str, bytes]:
    return {dtype: convert_to_tflite(tiny_model, dtype) for dtype in ("float32", "float16")}


@pytest.mark.parametrize(
    ("path", "requested", "expected"),
    [
        ("d1.h5", None, "h5"),
        ("d1.keras", None, "keras"),
        ("d1.tflite", None, "tflite"),
        ("d1_savedmodel", None, "savedmodel"),
        ("out/d1.v2/", None, "savedmodel"),
        ("d1.bin", "tflite", "tflite"),
        ("d1_model", "h5", "h5"),
    ],
)
def test_output_format_from_path_or_request(path: str, requested: str, expected: str) -> None:
    assert output_format(path, requested) == expected


def test_tflite_float32_uses_builtin_ops_only_and_matches(
    tiny_tflite: dict[str, bytes], tmp_path: Path, tiny_images: np.ndarray, tiny_reference
) -> None:
    content = tiny_tflite["float32"]
    names = operator_names(content)
    assert not [name for name in names if name.startswith("custom:")], names
    assert "GELU" in names  # exact GELU is one builtin, not a Flex Erf
    assert not {"EXTRACT_IMAGE_PATCHES", "DEQUANTIZE"} & set(names)
    assert weight_dtype(content) == "float32"
    path = tmp_path / "tiny.tflite"
    path.write_bytes(content)
    runner = TFLiteRunner(path)
    assert runner.input_shape == (None, TINY_SIZE, TINY_SIZE, 3)
    assert np.abs(runner.predict_on_batch(tiny_images) - tiny_reference).max() <= FLOAT32_ATOL


def test_tflite_float16_halves_the_file_within_its_tolerance(
    tiny_tflite: dict[str, bytes], tmp_path: Path, tiny_images: np.ndarray, tiny_reference
) -> None:
    content = tiny_tflite["float16"]
    assert weight_dtype(content) == "float16"
    assert "DEQUANTIZE" in operator_names(content)
    check_builtin_ops(content)
    assert len(content) < 0.75 * len(tiny_tflite["float32"])
    path = tmp_path / "tiny16.tflite"
    path.write_bytes(content)
    logits = TFLiteRunner(path).predict_on_batch(tiny_images)
    assert np.abs(logits - tiny_reference).max() <= FLOAT16_ATOL
    assert (logits.argmax(-1) == tiny_reference.argmax(-1)).all()


def test_check_builtin_ops_refuses_flex_ops() -> None:
    """A bare erf (what an unfused exact GELU would need) is a Flex op in TFLite."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((4,), tf.float32)])
    def needs_flex(values: tf.Tensor) -> tf.Tensor:
        return tf.math.erf(values)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [needs_flex.get_concrete_function()], needs_flex
    )
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    with pytest.raises(ConversionError, match=r"outside the builtin set: custom:FlexErf"):
        check_builtin_ops(converter.convert())


@pytest.mark.large
def test_savedmodel_and_tflite_run_without_volo_convert(
    tiny_model: keras.Model,
    tiny_tflite: dict[str, bytes],
    tmp_path: Path,
    tiny_images: np.ndarray,
    tiny_reference,
) -> None:
    folder = tmp_path / "tiny_savedmodel"
    folder.mkdir()
    save_model(tiny_model, folder, "savedmodel")
    assert artifact_format(folder) == "savedmodel"
    runner = SavedModelRunner(folder)
    assert runner.input_shape == (None, TINY_SIZE, TINY_SIZE, 3)
    assert np.abs(runner.predict_on_batch(tiny_images) - tiny_reference).max() <= FLOAT32_ATOL

    tflite_file = tmp_path / "tiny.tflite"
    tflite_file.write_bytes(tiny_tflite["float32"])
    np.save(tmp_path / "images.npy", tiny_images)
    outside = [tmp_path / "images.npy", tmp_path / "logits.npz"]
    subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE_SCRIPT, folder, tflite_file, *outside],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    standalone = np.load(tmp_path / "logits.npz")
    for name in ("saved_model", "tflite"):
        assert np.abs(standalone[name] - tiny_reference).max() <= FLOAT32_ATOL, name


def test_staged_folder_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        staged_output(tmp_path / "d1_savedmodel", folder=True) as temp,
    ):
        (temp / "variables").mkdir()
        (temp / "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_move_into_place_replaces_a_savedmodel_folder(tmp_path: Path) -> None:
    output = tmp_path / "d1_savedmodel"
    output.mkdir()
    (output / "saved_model.pb").write_bytes(b"old")
    (output / "stale.txt").write_text("old")
    check_output_path(output, overwrite=True, folder=True)
    with staged_output(output, folder=True) as temp:
        (temp / "saved_model.pb").write_bytes(b"new")
        move_into_place(temp, output)
    assert [path.name for path in tmp_path.iterdir()] == ["d1_savedmodel"]
    assert [path.name for path in output.iterdir()] == ["saved_model.pb"]
    assert (output / "saved_model.pb").read_bytes() == b"new"


def test_a_folder_that_is_no_savedmodel_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(ConversionError, match="holds no SavedModel; not replacing it"):
        check_output_path(tmp_path / "photos", overwrite=True, folder=True)


@pytest.mark.large
def test_cli_savedmodel_round_trip(d1_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_savedmodel"
    result = run(
        d1_checkpoint, "-o", f"{output}/", "--device", "cpu", "--report", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    assert "model in TensorFlow (tf.saved_model.load)" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "passed" and report["output_format"] == "savedmodel"
    assert report["parity"]["max_abs_diff"] <= FLOAT32_ATOL
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d1_savedmodel", "r.json"]
    stored = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    assert stored < 1.1 * 4 * 26_558_696  # every float32 weight once (keras#23553 stores two)

    result = run("verify", output, d1_checkpoint, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "26,558,696 parameters" in result.output


@pytest.mark.large
def test_cli_tflite_float16_uses_its_own_tolerance(d1_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1_fp16.tflite"
    result = run(
        d1_checkpoint, "-o", output, "--tflite-dtype", "float16", "--device", "cpu",
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"(atol {FLOAT16_ATOL:g})" in result.output
    assert "model in LiteRT (ai-edge-litert" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_format"] == "tflite"
    assert report["parity"]["atol"] == FLOAT16_ATOL
    assert FLOAT32_ATOL < report["parity"]["max_abs_diff"] <= FLOAT16_ATOL
    assert report["parity"]["top1_agreement"] == 1.0
    content = output.read_bytes()
    check_builtin_ops(content)
    assert weight_dtype(content) == "float16"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d1_fp16.tflite", "r.json"]

    few = ("--verify-images", "8")  # the tolerance is what is checked again, not the count
    result = run("verify", output, d1_checkpoint, "--device", "cpu", *few)
    assert result.exit_code == 0, result.output
    assert f"(atol {FLOAT16_ATOL:g})" in result.output
    result = run("verify", output, d1_checkpoint, "--device", "cpu", "--atol", "1e-4", *few)
    assert result.exit_code == 1


def test_failed_savedmodel_write_leaves_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails_halfway(model: keras.Model, path: Path, fmt: str, *tflite_settings: object) -> None:
        (path / "saved_model.pb").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion, "save_model", fails_halfway)
    output = tmp_path / "d1_savedmodel"
    result = run(tiny_checkpoint, "-o", output, "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"Error: {output}: could not write the SavedModel folder (No space left on device)"
    )
    assert list(tmp_path.iterdir()) == []


def test_tflite_dtype_needs_a_tflite_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run(tiny_checkpoint, "-o", tmp_path / "d1.h5", "--tflite-dtype", "float16")
    assert result.exit_code == 2
    assert "Error: --tflite-dtype float16 applies to .tflite outputs only" in result.output
    assert list(tmp_path.iterdir()) == []


def _write_in_format(
    fmt: str, tiny_model: keras.Model, tiny_tflite: dict[str, bytes], folder: Path
) -> tuple[Path, str]:
    """The tiny model written as `fmt` (`tflite-float16` for half precision): path, format."""
    if fmt.startswith("tflite"):
        path = folder / f"tiny_{fmt}.tflite"
        path.write_bytes(tiny_tflite[fmt.removeprefix("tflite-")])
        return path, "tflite"
    path = folder / ("tiny_savedmodel" if fmt == "savedmodel" else f"tiny.{fmt}")
    if fmt == "savedmodel":
        path.mkdir()
    save_model(tiny_model, path, fmt)
    return path, fmt


def _native_record(path: Path, fmt: str) -> str:
    """The provenance document where each format keeps it, read with that format's tools."""
    if fmt == "h5":
        with h5py.File(path) as file:
            return file.attrs[PROVENANCE_NAME]
    if fmt == "keras":
        return zipfile.ZipFile(path).read(f"{PROVENANCE_NAME}.json").decode()
    if fmt == "savedmodel":
        return (path / "assets" / f"{PROVENANCE_NAME}.json").read_text()
    from tensorflow.lite.python.schema_py_generated import Model

    model = Model.GetRootAsModel(path.read_bytes())
    entries = [model.Metadata(index) for index in range(model.MetadataLength())]
    buffers = {entry.Name().decode(): entry.Buffer() for entry in entries}
    assert "CONVERSION_METADATA" in buffers  # the converter's own entry is kept
    return model.Buffers(buffers[PROVENANCE_NAME]).DataAsNumpy().tobytes().decode()


@pytest.mark.parametrize("fmt", ["h5", "keras", "savedmodel", "tflite-float32", "tflite-float16"])
def test_provenance_is_stored_natively_and_the_model_is_unchanged(
    fmt: str,
    tiny_model: keras.Model,
    tiny_tflite: dict[str, bytes],
    tiny_images: np.ndarray,
    tmp_path: Path,
) -> None:
    path, stored_format = _write_in_format(fmt, tiny_model, tiny_tflite, tmp_path)
    before = model_outputs(load_artifact(path), tiny_images)
    assert read_provenance(path) is None
    provenance = dataclasses.replace(SAMPLE_PROVENANCE, output_format=stored_format)
    write_provenance(path, stored_format, provenance)

    assert json.loads(_native_record(path, stored_format)) == json.loads(provenance.to_json())
    assert read_provenance(path) == provenance
    reloaded = load_artifact(path)  # Keras' own loader for .h5 and .keras files
    np.testing.assert_array_equal(model_outputs(reloaded, tiny_images), before)
    if stored_format == "tflite":
        original = tiny_tflite[fmt.removeprefix("tflite-")]
        assert operator_names(path.read_bytes()) == operator_names(original)
        assert weight_dtype(path.read_bytes()) == weight_dtype(original)
    assert inspected(path) == json.loads(provenance.to_json())


@pytest.mark.large
def test_inspect_reads_the_record_without_torch(tiny_model: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "tiny.h5"
    save_model(tiny_model, path, "h5")
    write_provenance(path, "h5", SAMPLE_PROVENANCE)
    completed = subprocess.run(
        [sys.executable, "-c", INSPECT_WITHOUT_TORCH, path], capture_output=True, text=True
    )
    assert completed.stderr.splitlines()[-1] == "exit 0 False", completed.stderr
    assert Provenance.from_json(completed.stdout, path) == SAMPLE_PROVENANCE

    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:6] == [
        "converter  volo-convert 0.1.0, 2026-01-02T03:04:05+00:00",
        "source     tiny.pth.tar",
        f"sha256     {'ab' * 32}",
        "model      VOLO tiny at 64px, 10 classes, full head, h5",
        "input      images (float32)",
        "verified   max abs diff 1.5e-06 (atol 0.0001), max rel diff 2e-07, top-1 agreement "
        "100%, 2 images (seed 0), reference on cpu, model in Keras (tensorflow backend), 1.2s",
    ]


def test_schema_1_to_3_records_still_read_as_float32_images_models() -> None:
    """Files written before the input contract and the compute dtype were recorded took
    normalised images and computed in float32; those before class names record none."""
    document = json.loads(SAMPLE_PROVENANCE.to_json())
    assert document["schema"] == 4 and document["compute_dtype"] == "float32"
    assert document["labels"] is None and document["label_descriptions"] is None
    for key in ("labels", "label_descriptions"):
        del document[key]
    assert Provenance.from_json(json.dumps({**document, "schema": 3}), "3.h5") == SAMPLE_PROVENANCE
    del document["compute_dtype"]
    assert Provenance.from_json(json.dumps({**document, "schema": 2}), "2.h5") == SAMPLE_PROVENANCE
    for key in ("input", "tflite_dtype"):
        del document[key]
    for key in ("mean_abs_diff", "min_top1"):
        del document["verification"][key]
    old = Provenance.from_json(json.dumps({**document, "schema": 1}), "old.h5")
    assert old == SAMPLE_PROVENANCE
    with pytest.raises(ConversionError) as raised:
        Provenance.from_json(json.dumps({**document, "schema": 5}), "new.h5")
    assert str(raised.value) == (
        "new.h5: its provenance record has schema 5, this volo-convert reads 1, 2, 3 and 4"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("environment", None),
        ("input", None),
        ("input", {"kind": None, "dtype": "float32"}),
        ("head", None),
        ("head", "aux"),
        ("image_size", "224"),
        ("verification", {"max_abs_diff": None}),
        ("verification", []),
    ],
)
def test_a_record_holding_null_or_a_stranger_value_is_damaged(
    field: str, value: object, tmp_path: Path
) -> None:
    """JSON may hold null or any type where the record needs a value of its own: such a
    record is refused as damaged (exit 2) when read, not met later as a bug (exit 3)."""
    document = json.loads(SAMPLE_PROVENANCE.to_json())
    if field == "verification" and isinstance(value, dict):
        value = {**document["verification"], **value}
    document[field] = value
    path = tmp_path / "d1.h5"
    with h5py.File(path, "w") as file:
        file.attrs["volo_convert_provenance"] = json.dumps(document)
    before = snapshot(tmp_path)
    result = run("inspect", path)
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"Error: {path}: its provenance record is damaged"
    assert snapshot(tmp_path) == before


def test_inspect_refuses_files_without_a_record(tiny_model: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "plain.keras"
    tiny_model.save(path)
    content = path.read_bytes()
    result = run("inspect", path)
    assert result.exit_code == 2
    assert result.output == f"Error: {path}: holds no volo-convert provenance record\n"
    damaged = tmp_path / "damaged.h5"
    save_model(tiny_model, damaged, "h5")
    with h5py.File(damaged, "r+") as file:
        file.attrs[PROVENANCE_NAME] = '{"schema": 1, "variant": "d1"'
    result = run("inspect", damaged)
    assert result.exit_code == 2
    assert result.output == f"Error: {damaged}: its provenance record is damaged\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.h5", "plain.keras"]
    assert path.read_bytes() == content


@pytest.mark.parametrize("damage", ["empty", "cut in half", "no identifier", "not a flatbuffer"])
def test_inspect_names_a_damaged_tflite_file(
    damage: str, tiny_tflite: dict[str, bytes], tmp_path: Path
) -> None:
    """The record is read from the flatbuffer's tables without TensorFlow: however the
    file is damaged, one line names it, exit 2, and nothing is written."""
    recorded = tmp_path / "recorded.tflite"
    recorded.write_bytes(tiny_tflite["float32"])
    write_provenance(recorded, "tflite", SAMPLE_PROVENANCE)
    content = recorded.read_bytes()
    damaged = {
        "empty": b"",
        "cut in half": content[: len(content) // 2],
        "no identifier": content[:4] + b"XXXX" + content[8:],
        "not a flatbuffer": content[:4] + b"TFL3" + b"\xff" * 64,
    }[damage]
    path = tmp_path / "damaged.tflite"
    path.write_bytes(damaged)
    before = snapshot(tmp_path)
    result = run("inspect", path)
    assert result.exit_code == 2
    assert re.fullmatch(
        rf"Error: {re.escape(str(path))}: not a readable TFLite file \(.+\)", error_line(result)
    )
    assert snapshot(tmp_path) == before


def test_a_file_of_another_model_is_told_apart_from_a_bad_port(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A SavedModel has no stages to read: the graph rebuilt from the checkpoint stands in,
    and when that passes every stage, the difference is the file's own."""
    folder = tmp_path / "d1_savedmodel"
    assert run(tiny_checkpoint, "-o", folder, "--no-verify").exit_code == 0
    other = write_checkpoint(tmp_path / "other.pth", TINY_CONFIG, SMALL_IMAGE_SIZE, seed=6)
    result = run("verify", folder, other, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert REBUILT_PASSES in result.output.splitlines()
    assert error_line(result).startswith("Error: parity failed: max abs diff ")
    assert error_line(result).endswith(
        "; the Keras graph rebuilt from the checkpoint passes every stage"
    )


def _foreign_model(case: str) -> keras.Model:
    """A small Keras model that is no image classifier, as another tool might export."""
    images = keras.Input((32, 30 if case == "non-square" else 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    if case == "two inputs":
        extra = keras.Input((4,))
        joined = keras.layers.Concatenate()([pooled, extra])
        return keras.Model([images, extra], keras.layers.Dense(10)(joined))
    if case == "map output":
        return keras.Model(images, keras.layers.Conv2D(4, 3)(images))
    return keras.Model(images, keras.layers.Dense(10)(pooled))


@pytest.mark.parametrize(
    ("case", "fmt", "message"),
    [
        ("two inputs", "tflite", "expected one input and one output, found 2 and 1"),
        ("non-square", "tflite", "takes inputs of shape (B, 32, 30, 3), not B, S, S, 3 images"),
        ("non-square", "savedmodel", "takes inputs of shape (B, 32, 30, 3), not B, S, S, 3 images"),
        ("map output", "tflite", "returns outputs of shape (B, 30, 30, 4), not B, K"),
    ],
)
def test_a_foreign_file_that_is_no_image_classifier_is_refused(
    case: str, fmt: str, message: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import tensorflow as tf

    model = _foreign_model(case)
    path = tmp_path / ("foreign.tflite" if fmt == "tflite" else "foreign")
    if fmt == "tflite":
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    else:
        model.export(path, verbose=False)
    before = snapshot(tmp_path)
    result = run("verify", path, tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"Error: {path}: {message}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_verify_refuses_a_damaged_input_record(
    fmt: str, tiny_model: keras.Model, tiny_tflite: dict[str, bytes], tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The input kind a file records is read, never trusted: a damaged one is exit 2."""
    if fmt == "tflite":
        path = tmp_path / "tiny.tflite"
        document = b'"input": "images"'
        assert tiny_tflite["float32"].count(document) == 1
        path.write_bytes(tiny_tflite["float32"].replace(document, b'"input": "camera"'))
        message = f"{path}: records an unknown input kind 'camera'"
    else:
        path = tmp_path / "tiny"
        path.mkdir()
        save_model(tiny_model, path, fmt)
        record = path / "assets" / "volo_convert.json"
        record.write_text('{"input": ')
        message = f"{record}: is damaged (Expecting value: line 1 column 11 (char 10))"
    before = snapshot(tmp_path)
    result = run("verify", path, tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"Error: {message}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("document", ["{}", "[1, 2]", '"images"', '{"compute_dtype": "float32"}'])
def test_a_savedmodel_record_without_its_input_entry_is_damaged(
    document: str, tiny_model: keras.Model, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    path = tmp_path / "tiny"
    path.mkdir()
    save_model(tiny_model, path, "savedmodel")
    record = path / "assets" / "volo_convert.json"
    record.write_text(document)
    before = snapshot(tmp_path)
    result = run("verify", path, tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"Error: {record}: is damaged (no 'input' entry)"
    assert snapshot(tmp_path) == before


def test_every_cli_output_records_its_source(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "d1.keras"
    result = run(tiny_checkpoint, "-o", output, "--device", "cpu", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    record = inspected(output)
    assert record["source_file"] == tiny_checkpoint.name
    assert record["source_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert record["source_sha256"] == report["checkpoint_sha256"]
    assert (record["variant"], record["image_size"], record["head"]) == ("tiny", 32, "full")
    assert (record["num_classes"], record["output_format"]) == (10, "keras")
    verification = record["verification"]
    assert verification["max_abs_diff"] == report["parity"]["max_abs_diff"]
    assert verification["atol"] == report["parity"]["atol"] == 1e-4
    assert (verification["images"], verification["seed"], verification["device"]) == (2, 0, "cpu")
    assert verification["runtime"] == "Keras (tensorflow backend)"
    assert record["environment"]["keras"] == report["environment"]["keras"]
    assert record["converter_version"] == report["environment"]["volo_convert"]

    unverified = tmp_path / "d1_unverified.h5"
    assert run(tiny_checkpoint, "-o", unverified, "--no-verify").exit_code == 0
    assert inspected(unverified)["verification"] is None
    assert "verified   no (--no-verify)" in run("inspect", unverified).output


# Serves the SavedModel with TensorFlow alone, at batch 1 and 3, by its signature's names.
SERVING_SCRIPT = """
import sys
sys.modules["volo_convert"] = None
import numpy as np, tensorflow as tf
folder, images_file, out_file = sys.argv[1:]
images = np.load(images_file)
serve = tf.saved_model.load(folder).signatures["serving_default"]
names = list(serve.structured_input_signature[1]) + list(serve.structured_outputs)
shape = serve.structured_input_signature[1]["images"].shape.as_list()
one = serve(images=tf.constant(images[:1]))["logits"].numpy()
three = serve(images=tf.constant(images[:3]))["logits"].numpy()
np.savez(out_file, one=one, three=three, names=np.array(names), shape=np.array(shape, float))
"""


@pytest.mark.large
def test_savedmodel_serves_named_images_to_logits_at_any_batch(
    tiny_model: keras.Model, tmp_path: Path, tiny_state_dict: dict
) -> None:
    folder = tmp_path / "serving"
    folder.mkdir()
    save_model(tiny_model, folder, "savedmodel")
    reference = run_reference(TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", batch_size=3)
    np.save(tmp_path / "images.npy", reference.images)
    subprocess.run(
        [sys.executable, "-I", "-c", SERVING_SCRIPT, folder, tmp_path / "images.npy",
         tmp_path / "out.npz"],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    served = np.load(tmp_path / "out.npz")
    assert list(served["names"]) == ["images", "logits"]
    assert np.isnan(served["shape"][0]) and list(served["shape"][1:]) == [TINY_SIZE, TINY_SIZE, 3]
    assert served["one"].shape == (1, TINY_CONFIG.num_classes)
    assert served["three"].shape == (3, TINY_CONFIG.num_classes)
    assert np.abs(served["three"] - reference.outputs).max() <= FLOAT32_ATOL
    assert np.abs(served["one"] - reference.outputs[:1]).max() <= FLOAT32_ATOL


@pytest.mark.parametrize("fmt", ["h5", "keras", "savedmodel", "tflite"])
def test_pixels_input_round_trips_in_every_format(
    fmt: str, tiny_state_dict: dict, tmp_path: Path
) -> None:
    """uint8 camera pixels into the reloaded file; the reference gets them normalised."""
    model = build_volo(TINY_CONFIG, TINY_SIZE, input_kind="pixels")
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    path = tmp_path / ("pixels" if fmt == "savedmodel" else f"pixels.{fmt}")
    if fmt == "savedmodel":
        path.mkdir()
    save_model(model, path, fmt)
    reference = run_reference(TINY_CONFIG, TINY_SIZE, tiny_state_dict, device="cpu", seed=5)
    loaded = load_artifact(path, fmt)
    assert input_contract(loaded).kind == "pixels"
    assert reference.pixels.dtype == np.uint8
    logits = np.asarray(keras.ops.convert_to_numpy(loaded.predict_on_batch(reference.pixels)))
    assert np.abs(logits - reference.outputs).max() <= FLOAT32_ATOL
    parity = check_parity(loaded, reference, FLOAT32_ATOL)  # feeds the pixels itself
    assert parity.passed, parity


def test_tflite_falls_back_to_tensorflows_interpreter(
    tiny_tflite: dict[str, bytes], tmp_path: Path, tiny_run: ReferenceRun,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_tflite["float32"])
    assert runtime_name("tflite").startswith("LiteRT (ai-edge-litert ")
    assert check_parity(TFLiteRunner(path), tiny_run, FLOAT32_ATOL).passed
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as if not installed
    assert runtime_name("tflite") == "TensorFlow's TFLite interpreter (tf.lite.Interpreter)"
    assert check_parity(TFLiteRunner(path), tiny_run, FLOAT32_ATOL).passed


def test_verify_reads_the_head_from_the_record_not_the_width(
    d1_checkpoint: Path, tmp_path: Path
) -> None:
    """`full` and `cls` have the same width; a TFLite or SavedModel file's record names it."""
    output = tmp_path / "d1_cls.tflite"
    result = run(d1_checkpoint, "-o", output, "--head", "cls", "--no-verify")
    assert result.exit_code == 0, result.output
    result = run(
        "verify", output, d1_checkpoint, "--device", "cpu", "--report", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["head"] == "cls"
    before = snapshot(tmp_path)
    result = run("verify", output, d1_checkpoint, "--head", "full")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: the model ends in the cls head, but --head full was given"
    )
    assert snapshot(tmp_path) == before
