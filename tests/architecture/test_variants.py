"""Detection of variant, image size and class count from tensor shapes."""

from __future__ import annotations

import pytest
import torch

from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import (
    RELEASE_CHECKPOINTS,
    VARIANTS,
    detect_config,
    get_variant,
)
from volo_convert.errors import ConversionError
from volo_convert.options import check_image_size


def release_shapes(variant: str, image_size: int, num_classes: int = 1000) -> dict:
    """Tensor shapes of a release checkpoint, without allocating its weights."""
    with torch.device("meta"):
        model = Volo(VARIANTS[variant].with_num_classes(num_classes), image_size)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


@pytest.mark.parametrize(("file_name", "expected"), sorted(RELEASE_CHECKPOINTS.items()))
def test_detects_every_release_checkpoint(file_name: str, expected: tuple[str, int]) -> None:
    variant, image_size = expected
    config, detected_size = detect_config(release_shapes(variant, image_size))
    assert (config.name, detected_size, config.num_classes) == (variant, image_size, 1000)
    assert config == VARIANTS[variant]


def test_detects_fine_tuned_class_count() -> None:
    config, _ = detect_config(release_shapes("d2", 224, num_classes=37))
    assert (config.name, config.num_classes) == ("d2", 37)


def test_release_shapes_match_spec_for_d1() -> None:
    shapes = release_shapes("d1", 224)
    assert shapes["network.0.0.attn.attn.weight"] == (486, 192)
    assert shapes["network.1.proj.weight"] == (384, 192, 2, 2)
    assert shapes["pos_embed"] == (1, 14, 14, 384)
    assert shapes["post_network.0.attn.kv.weight"] == (768, 384)
    assert shapes["aux_head.weight"] == (1000, 384)


def test_refuses_other_architectures() -> None:
    resnet_like = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 2048)}
    with pytest.raises(ConversionError, match=r"not a VOLO checkpoint: expected tensors such as"):
        detect_config(resnet_like)


def test_refuses_unknown_layout() -> None:
    shapes = release_shapes("d1", 224)
    del shapes["network.4.1.mlp.fc1.weight"]
    shapes = {key: shape for key, shape in shapes.items() if not key.startswith("network.4.1.")}
    with pytest.raises(ConversionError, match=r"unknown layout \(layers \(4, 4, 8, 1\)"):
        detect_config(shapes)


def test_get_variant_accepts_timm_names_and_refuses_others() -> None:
    assert get_variant("volo_d3") is VARIANTS["d3"]
    with pytest.raises(ConversionError, match=r"unknown variant 'd9': expected one of d1, d2"):
        get_variant("d9")


@pytest.mark.parametrize("image_size", [0, 100, 230, -16])
def test_image_size_must_be_multiple_of_16(image_size: int) -> None:
    with pytest.raises(ConversionError, match=f"multiple of 16, got {image_size}"):
        check_image_size(image_size)
