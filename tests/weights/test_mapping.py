"""The YAML mapping tables and the coverage check."""

from __future__ import annotations

import re

import keras
import pytest
from helpers import TINY_CONFIG

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.errors import ConversionError
from volo_convert.weights.mapping import (
    MappingRow,
    MappingTable,
    expand_tables,
    load_tables,
    weight_mappings,
)
from volo_convert.weights.porting import check_checkpoint, check_coverage, port_weights


def test_tables_are_shipped_and_cover_every_scope() -> None:
    tables = load_tables()
    assert {table.source for table in tables} == {
        "class_attention.yaml",
        "embedding.yaml",
        "head.yaml",
        "outlooker.yaml",
        "stem.yaml",
        "transformer.yaml",
    }
    assert {table.scope for table in tables} == {
        "model",
        "stem_conv",
        "outlooker_block",
        "transformer_block",
        "class_block",
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expansion_counts(variant: str) -> None:
    config = VARIANTS[variant]
    mappings = weight_mappings(config)
    expected = 15 + 5 + 13 * config.layers[0] + 11 * sum(config.layers[1:]) + 12 * 2 + 7
    assert len(mappings) == expected
    assert len({mapping.torch_key for mapping in mappings}) == expected
    assert len({mapping.keras_path for mapping in mappings}) == expected


def test_stack_index_is_shifted_past_the_downsample() -> None:
    by_keras = {m.keras_path: m.torch_key for m in weight_mappings(VARIANTS["d1"])}
    assert by_keras["stack0_block3_attn_v/kernel"] == "network.0.3.attn.v.weight"
    assert by_keras["stack1_block0_attn_qkv/kernel"] == "network.2.0.attn.qkv.weight"
    assert by_keras["stack3_block1_mlp_dense_2/bias"] == "network.4.1.mlp.fc2.bias"
    assert by_keras["downsample/kernel"] == "network.1.proj.weight"
    assert by_keras["stem_bn3/moving_variance"] == "patch_embed.conv.7.running_var"


def test_no_tensor_name_is_spelled_in_python() -> None:
    """Renaming lives in the YAML tables; only detection's shape probes name tensors."""
    from pathlib import Path

    import volo_convert

    pattern = re.compile(r"['\"](?:network|post_network|patch_embed)\.\d")
    sources = Path(volo_convert.__file__).parent.rglob("*.py")
    for source in (path for path in sources if path.name != "variants.py"):
        assert not pattern.search(source.read_text()), source.name


def test_undefined_placeholder_is_reported() -> None:
    table = MappingTable(
        "broken.yaml",
        "class_block",
        (MappingRow("x.{block}", "y"),),
    )
    with pytest.raises(ConversionError, match=r"broken.yaml: placeholder 'block' is not defined"):
        expand_tables([table], TINY_CONFIG)


def test_coverage_catches_missing_tensor(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, 64)
    state_dict = dict(tiny_state_dict)
    del state_dict["network.2.0.attn.qkv.weight"]
    with pytest.raises(
        ConversionError,
        match=r"tensors missing from the checkpoint: network\.2\.0\.attn\.qkv\.weight",
    ):
        port_weights(model, state_dict, weight_mappings(TINY_CONFIG))


def test_coverage_catches_extra_tensor(tiny_state_dict: dict) -> None:
    model = build_volo(TINY_CONFIG, 64)
    state_dict = dict(tiny_state_dict)
    state_dict["head_dist.weight"] = state_dict["head.weight"]
    with pytest.raises(
        ConversionError, match=r"checkpoint tensors no mapping uses: head_dist\.weight"
    ):
        port_weights(model, state_dict, weight_mappings(TINY_CONFIG))


def test_coverage_catches_unfilled_and_twice_filled_weights() -> None:
    mappings = weight_mappings(TINY_CONFIG)
    keras_paths = [m.keras_path for m in mappings] + ["extra_layer/kernel"]
    torch_keys = [m.torch_key for m in mappings]
    with pytest.raises(
        ConversionError, match=r"Keras weights no mapping fills: extra_layer/kernel"
    ):
        check_coverage(torch_keys, keras_paths, mappings)
    with pytest.raises(ConversionError, match=r"Keras weights filled more than once: head/bias"):
        duplicate = [m for m in mappings if m.keras_path == "head/bias"]
        check_coverage(torch_keys, keras_paths[:-1], [*mappings, *duplicate])


def test_num_batches_tracked_is_ignored(tiny_state_dict: dict) -> None:
    assert "patch_embed.conv.1.num_batches_tracked" in tiny_state_dict
    model = build_volo(TINY_CONFIG, 64)
    port_weights(model, tiny_state_dict, weight_mappings(TINY_CONFIG))
    ported = sum(
        tensor.numel()
        for key, tensor in tiny_state_dict.items()
        if not key.endswith("num_batches_tracked")
    )
    assert ported == model.count_params()


def test_shape_mismatch_names_both_sides(tiny_state_dict: dict) -> None:
    import torch

    model = build_volo(TINY_CONFIG, 64)
    state_dict = dict(tiny_state_dict)
    state_dict["head.bias"] = torch.zeros(11)
    with pytest.raises(
        ConversionError, match=r"head\.bias has shape \(11,\).*head/bias expects \(10,\)"
    ):
        port_weights(model, state_dict, weight_mappings(TINY_CONFIG))
    keras.backend.clear_session()


def test_checkpoint_check_needs_no_model(tiny_state_dict: dict) -> None:
    from volo_convert.architecture.torch_reference import parameter_shapes

    expected = parameter_shapes(TINY_CONFIG, 64)
    shapes = {key: tuple(tensor.shape) for key, tensor in tiny_state_dict.items()}
    check_checkpoint(shapes, weight_mappings(TINY_CONFIG, "features"), expected)

    shapes["head.bias"] = (11,)  # the features head leaves the class head out
    with pytest.raises(ConversionError) as raised:
        check_checkpoint(shapes, weight_mappings(TINY_CONFIG, "features"), expected)
    assert str(raised.value) == "head.bias has shape (11,), expected (10,)"
    with pytest.raises(ConversionError) as raised:
        check_checkpoint(shapes, weight_mappings(TINY_CONFIG), expected)
    assert str(raised.value) == (
        "head.bias has shape (11,), which after identity is (11,), but head/bias expects (10,)"
    )
    del shapes["head.bias"]
    with pytest.raises(ConversionError, match=r"^tensors missing from the checkpoint: head\.bias$"):
        check_checkpoint(shapes, weight_mappings(TINY_CONFIG), expected)
