"""Custom Keras layers against torch's own ops, and their serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volo_convert.architecture.keras_layers import (
    ClassAttention,
    DropPath,
    MultiHeadSelfAttention,
    OutlookAggregation,
    TokenDense,
    TokenLabelingLogits,
    TokenSlice,
)


def torch_outlook(values: np.ndarray, logits: np.ndarray, num_heads: int) -> np.ndarray:
    """Outlook attention's core exactly as upstream: unfold, softmax, matmul, fold."""
    v = torch.from_numpy(values).permute(0, 3, 1, 2)  # B, C, H, W
    batch, channels, height, width = v.shape
    windows = (height // 2) * (width // 2)
    head_dim = channels // num_heads
    v = F.unfold(v, 3, padding=1, stride=2).reshape(batch, num_heads, head_dim, 9, windows)
    v = v.permute(0, 1, 4, 3, 2)
    attn = torch.from_numpy(logits).reshape(batch, windows, num_heads, 9, 9).permute(0, 2, 1, 3, 4)
    attn = (attn * head_dim**-0.5).softmax(dim=-1)
    x = (attn @ v).permute(0, 1, 4, 3, 2).reshape(batch, channels * 9, windows)
    x = F.fold(x, output_size=(height, width), kernel_size=3, padding=1, stride=2)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(("size", "channels", "num_heads"), [(4, 8, 2), (8, 12, 3), (14, 16, 4)])
def test_outlook_aggregation_matches_torch_unfold_fold(
    size: int, channels: int, num_heads: int
) -> None:
    rng = np.random.default_rng(size)
    values = rng.normal(size=(2, size, size, channels)).astype(np.float32)
    logits = (3 * rng.normal(size=(2, size // 2, size // 2, num_heads * 81))).astype(np.float32)
    expected = torch_outlook(values, logits, num_heads)
    actual = keras.ops.convert_to_numpy(OutlookAggregation(num_heads)([values, logits]))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_outlook_fold_sums_overlaps_at_borders() -> None:
    """One-hot attention picking the centre tap: the fold must be the identity on v."""
    values = np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2)
    logits = np.full((2, 2, 2, 81), -1e9, dtype=np.float32)
    logits[..., 4::9] = 0.0  # every output tap attends to its own position only
    folded = keras.ops.convert_to_numpy(OutlookAggregation(1)([values, logits]))
    np.testing.assert_allclose(folded, torch_outlook(values, logits, 1), atol=1e-4, rtol=0)


def test_self_attention_matches_torch() -> None:
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(2, 3, 3, 3 * 8)).astype(np.float32)
    q, k, v = torch.from_numpy(qkv).reshape(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    expected = ((q @ k.transpose(-2, -1)) * 4**-0.5).softmax(-1) @ v
    expected = expected.transpose(1, 2).reshape(2, 3, 3, 8).numpy()
    actual = keras.ops.convert_to_numpy(MultiHeadSelfAttention(2)(qkv))
    np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_class_attention_matches_torch() -> None:
    rng = np.random.default_rng(1)
    query = rng.normal(size=(2, 1, 8)).astype(np.float32)
    kv = rng.normal(size=(2, 5, 16)).astype(np.float32)
    k, v = torch.from_numpy(kv).reshape(2, 5, 2, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.from_numpy(query).reshape(2, 2, 1, 4)
    expected = ((q * 4**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    expected = expected.transpose(1, 2).reshape(2, 1, 8).numpy()
    actual = keras.ops.convert_to_numpy(ClassAttention(2)([query, kv]))
    np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 3, 4, 6)])
def test_token_dense_matches_torch_linear_with_gelu(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(6, 7)).astype(np.float32)  # asymmetric: a transpose would show
    bias = rng.normal(size=(7,)).astype(np.float32)
    layer = TokenDense(7, activation=keras.activations.gelu)
    layer.build(shape)
    layer.set_weights([kernel, bias])
    linear = F.linear(torch.from_numpy(tokens), torch.from_numpy(kernel.T), torch.from_numpy(bias))
    expected = F.gelu(linear).numpy()
    actual = keras.ops.convert_to_numpy(layer(tokens))
    assert actual.shape == (*shape[:-1], 7)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_token_labeling_logits_adds_half_the_patch_max() -> None:
    cls_logits = np.array([[[1.0, 2.0]]], dtype=np.float32)
    patch_logits = np.array([[[0.0, 4.0], [6.0, -2.0], [1.0, 1.0]]], dtype=np.float32)
    actual = keras.ops.convert_to_numpy(TokenLabelingLogits()([cls_logits, patch_logits]))
    np.testing.assert_allclose(actual, [[4.0, 4.0]])


@pytest.mark.parametrize(
    "layer",
    [
        OutlookAggregation(3),
        MultiHeadSelfAttention(4),
        ClassAttention(2),
        TokenSlice(1, None),
        TokenDense(5, activation=keras.activations.gelu),
        DropPath(0.2, seed=7),
    ],
)
def test_layers_round_trip_through_config(layer: keras.layers.Layer) -> None:
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
