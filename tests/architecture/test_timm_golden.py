"""Both of our models against timm's VOLO: an implementation of upstream not written here.

tests/data/timm_golden holds small VOLO checkpoints with timm's tensor names and timm's
outputs on seeded images, recorded by `python scripts/record_timm_golden.py` (timm 1.0.x;
the manifest names the versions). Each checkpoint is converted the way a user converts a hub
file, through `volo_convert.convert`; the converted Keras file and the PyTorch reference the
tool verifies against must then both reproduce timm's numbers to float32 noise.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import volo_convert
from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import HEAD_OUTPUTS, VARIANTS, VoloConfig
from volo_convert.checks.reference import build_reference, reference_stage_outputs
from volo_convert.options import DEFAULT_HEAD, HEADS, ConvertOptions
from volo_convert.weights.loading import load_checkpoint

GOLDEN_FOLDER = Path(__file__).resolve().parents[1] / "data" / "timm_golden"
MANIFEST = json.loads((GOLDEN_FOLDER / "manifest.json").read_text())
GOLDEN_NAMES = sorted(MANIFEST["configs"])
# timm's output that each head reproduces.
GOLDEN_OUTPUT = {"full": "logits", "cls": "cls_logits", "features": "features"}
# Float32 noise: the largest difference allowed, relative to the largest value compared.
# Measured: at most 1.2e-6 relative (1.4e-5 absolute on logits up to 12); misreadings such as
# a wrong aux weight or a missing aux head move the logits by 0.25-0.8 relative.
GOLDEN_RTOL = 5e-6


def golden_config(name: str) -> VoloConfig:
    """The configuration timm's model was built with, as a VoloConfig."""
    model = MANIFEST["configs"][name]["model"]
    return VoloConfig(
        name=f"timm_{name}",
        layers=tuple(model["layers"]),
        embed_dims=tuple(model["embed_dims"]),
        num_heads=tuple(model["num_heads"]),
        mlp_ratio=model["mlp_ratio"],
        stem_hidden_dim=model["stem_hidden_dim"],
        num_classes=model["num_classes"],
    )


def golden_arrays(name: str) -> dict[str, np.ndarray]:
    """timm's images (B, S, S, 3 for our models) and its float32 outputs on them."""
    arrays = load_file(GOLDEN_FOLDER / MANIFEST["configs"][name]["golden"])
    images = arrays.pop("images").astype(np.float32).transpose(0, 2, 3, 1)  # B, S, S, 3
    return {"images": np.ascontiguousarray(images), **arrays}


def weights_path(name: str) -> Path:
    """The recorded checkpoint: timm's tensor names, as a hub `model.safetensors` holds them."""
    return GOLDEN_FOLDER / MANIFEST["configs"][name]["weights"]


def assert_matches(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Asserts `actual` is `expected` to float32 noise, GOLDEN_RTOL of its largest value."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    bound = GOLDEN_RTOL * float(np.abs(expected).max())
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} from timm exceeds {bound:.3g}"


@contextlib.contextmanager
def registered(name: str) -> Iterator[VoloConfig]:
    """The recorded configuration, registered as a variant while the context lasts.

    Detection finds a variant from the tensors' shapes; the head counts are not in them, so
    the configuration is registered the way the release variants are.
    """
    config = golden_config(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(VARIANTS, config.name, config)
        yield config


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """(configuration, head) -> its checkpoint converted to `.keras` by `volo_convert.convert`,
    converted once for the module."""
    folder = tmp_path_factory.mktemp("timm_golden")

    @functools.cache
    def convert(name: str, head: str) -> Path:
        output = folder / f"{name}_{head}.keras"
        with registered(name):
            result = volo_convert.convert(weights_path(name), output, head=head, device="cpu")
        assert result.passed, str(result)
        return output

    return convert


def reference(name: str, head: str = DEFAULT_HEAD) -> Volo:
    """The reference the tool verifies against, built from the checkpoint as the tool reads it."""
    with registered(name) as config:
        checkpoint = load_checkpoint(weights_path(name), ConvertOptions(device="cpu"))
    assert checkpoint.config == config
    assert checkpoint.image_size == MANIFEST["configs"][name]["image_size"]
    return build_reference(
        checkpoint.config, checkpoint.image_size, checkpoint.state_dict, torch.device("cpu"), head
    )


def test_golden_files_are_the_recorded_ones() -> None:
    for name in GOLDEN_NAMES:
        spec = MANIFEST["configs"][name]
        for file_key in ("weights", "golden"):
            data = (GOLDEN_FOLDER / spec[file_key]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == spec[f"{file_key}_sha256"], spec[file_key]
    assert MANIFEST["versions"]["timm"].startswith("1.0.")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_converted_keras_model_matches_timm(
    name: str, head: str, converted: Callable[[str, str], Path]
) -> None:
    model = keras.models.load_model(converted(name, head), compile=False)
    golden = golden_arrays(name)
    outputs = keras.ops.convert_to_numpy(model.predict_on_batch(golden["images"]))
    assert_matches(outputs, golden[GOLDEN_OUTPUT[head]], f"Keras {head} head")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_torch_reference_matches_timm(name: str, head: str) -> None:
    golden = golden_arrays(name)
    stages = reference_stage_outputs(reference(name, head), golden["images"], torch.device("cpu"))
    assert_matches(stages["norm"], golden["tokens"], "tokens after the final norm")
    outputs = stages[HEAD_OUTPUTS[head]]
    assert_matches(outputs, golden[GOLDEN_OUTPUT[head]], f"reference {head} head")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_training_mode_matches_timm(name: str, converted: Callable[[str, str], Path]) -> None:
    """In training mode the stem's BatchNorm normalises with the batch's statistics."""
    golden = golden_arrays(name)
    model = keras.models.load_model(converted(name, DEFAULT_HEAD), compile=False)
    keras_logits = keras.ops.convert_to_numpy(model(golden["images"], training=True))
    assert_matches(keras_logits, golden["train_logits"], "Keras training-mode logits")

    images = torch.from_numpy(golden["images"]).permute(0, 3, 1, 2)  # B, 3, S, S
    with torch.no_grad():
        torch_logits = reference(name).train()(images)
    assert_matches(torch_logits.numpy(), golden["train_logits"], "reference training-mode logits")


def test_golden_outputs_tell_misreadings_apart() -> None:
    """The aux term, and the stem's BatchNorm on batch rather than running statistics, each
    move timm's logits far beyond the tolerance: a model that misreads either fails."""
    for name in GOLDEN_NAMES:
        golden = golden_arrays(name)
        for other in ("cls_logits", "train_logits"):
            with pytest.raises(AssertionError, match="exceeds"):
                assert_matches(golden[other], golden["logits"], other)
