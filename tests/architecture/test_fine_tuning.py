"""The fine-tuning example of docs/FINE_TUNING.md, run as written on the three Keras
backends, and a backbone under `mixed_bfloat16`: its precision, its training, its saved file.

The backend is fixed when Keras is first imported, so each run is a fresh process with
KERAS_BACKEND set; the runs go side by side. A tiny backbone (drop path and dropout on)
and eight small images keep them short.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY_CONFIG, documented

from volo_convert.architecture.keras_layers import DropPath
from volo_convert.architecture.keras_model import build_volo, with_dtype_policy
from volo_convert.checks.images import sample_images
from volo_convert.synthetic import make_state_dict
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
CLASSES = ("cats", "dogs")
IMAGES_PER_CLASS = 4
BACKENDS = ("tensorflow", "torch", "jax")
# bfloat16 keeps 8 significant bits. On 8 seeded images it moved the outputs by 1.0% of the
# largest logit on d1 at 224px (docs/BENCHMARKS.md), 2.1% at 64px and 5.4% of the largest
# feature on this tiny model at 32px, so the bar is about twice the worst.
MIXED_BFLOAT16_RTOL = 0.1


def readme_example() -> str:
    """The fine-tuning script exactly as docs/FINE_TUNING.md shows it."""
    blocks = re.findall(r"```python\n(.*?)```", documented("FINE_TUNING.md"), flags=re.DOTALL)
    (script,) = [block for block in blocks if block.startswith('"""Fine-tune a converted VOLO')]
    return script


def tiny_backbone(path: Path) -> keras.Model:
    """A tiny features backbone, as `--head features --drop-path-rate` would write it."""
    state_dict = make_state_dict(TINY_CONFIG, IMAGE_SIZE, seed=8)
    model = build_volo(TINY_CONFIG, IMAGE_SIZE, "features", drop_path_rate=0.2, drop_rate=0.1)
    port_weights(model, state_dict, weight_mappings(TINY_CONFIG, "features"))
    model.save(path)
    return model


def computing_policies(model: keras.Model) -> set[str]:
    """The dtype policies of `model`'s layers, bar the input (float32 images come in)."""
    return {
        layer.dtype_policy.name
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    }


def write_image_folder(folder: Path) -> None:
    """Eight small PNG photos-to-be, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            (folder / name / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Runs the README example once per backend, side by side.

    Returns:
        backend -> (completed process, the fine-tuned file it wrote).
    """
    folder = tmp_path_factory.mktemp("fine_tuning")
    script = folder / "fine_tune.py"
    script.write_text(readme_example())
    tiny_backbone(folder / "backbone.keras")
    write_image_folder(folder / "images")
    started = {}
    for backend in BACKENDS:
        output = folder / f"{backend}.keras"
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            [sys.executable, script, folder / "backbone.keras", folder / "images", output],
            env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started[backend] = (process, output)
    results = {}
    for name, (process, output) in started.items():
        stdout, stderr = process.communicate()
        results[name] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            output,
        )
    return results


@pytest.mark.large
@pytest.mark.parametrize("backend", BACKENDS)
def test_readme_fine_tuning_example_runs(backend: str, fine_tuned: dict) -> None:
    completed, output = fine_tuned[backend]
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert f"Found {len(CLASSES) * IMAGES_PER_CLASS} files belonging to 2 classes." in lines
    assert "frozen backbone moved by 0.0" in lines
    assert f"saved {output}; reloaded, its logits differ by 0.0" in lines
    losses = [float(value) for value in re.findall(r"loss: ([0-9.]+)", completed.stdout)]
    assert len(losses) == 4 and all(np.isfinite(losses))

    reloaded = keras.models.load_model(output)
    backbone = reloaded.get_layer("volo_tiny_32")
    assert reloaded.output_shape == (None, len(CLASSES))
    rates = sorted(layer.rate for layer in backbone.layers if isinstance(layer, DropPath))
    assert rates == pytest.approx([0.1, 0.1, 0.15, 0.15, 0.2, 0.2])


def test_mixed_bfloat16_backbone_trains_saves_and_reloads(tmp_path: Path) -> None:
    """What the example's --mixed-bfloat16 does, on the tensorflow backend."""
    backbone = with_dtype_policy(tiny_backbone(tmp_path / "backbone.keras"), "mixed_bfloat16")
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras.Model(images, keras.layers.Dense(2, name="new_head")(backbone(images)))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    before = [keras.ops.convert_to_numpy(weight) for weight in backbone.trainable_weights]
    history = model.fit(
        sample_images(8, IMAGE_SIZE, seed=5), np.arange(8) % 2, batch_size=4, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    moved = [
        not np.array_equal(keras.ops.convert_to_numpy(weight), value)
        for weight, value in zip(backbone.trainable_weights, before, strict=True)
    ]
    assert all(moved)
    assert model.get_layer("new_head").compute_dtype == "float32"

    model.save(tmp_path / "mixed.keras")
    reloaded = keras.models.load_model(tmp_path / "mixed.keras")
    assert computing_policies(reloaded.get_layer("volo_tiny_32")) == {"mixed_bfloat16"}
    probe = sample_images(4, IMAGE_SIZE, seed=6)
    np.testing.assert_array_equal(
        np.asarray(reloaded.predict_on_batch(probe)), np.asarray(model.predict_on_batch(probe))
    )


def test_mixed_bfloat16_backbone_within_its_tolerance(tmp_path: Path) -> None:
    model = tiny_backbone(tmp_path / "backbone.keras")
    mixed = with_dtype_policy(model, "mixed_bfloat16")
    assert computing_policies(mixed) == {"mixed_bfloat16"}
    images = sample_images(8, IMAGE_SIZE, seed=2)
    expected = np.asarray(model.predict_on_batch(images))
    actual = np.asarray(mixed.predict_on_batch(images), dtype=np.float32)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert 0 < error <= MIXED_BFLOAT16_RTOL
    for weight in mixed.weights:  # the weights stay float32: only the compute is bfloat16
        assert weight.dtype == "float32"
