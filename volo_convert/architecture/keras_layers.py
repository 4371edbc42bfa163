"""Custom Keras layers of VOLO, written with `keras.ops` and `keras.random` only (backend-neutral).

Attention tensors stay at rank 5 or below: TensorFlow's CPU softmax aborts above that,
and TFLite's kernels are limited in rank. Under a mixed policy (bfloat16 compute) every
softmax runs in float32 on float32 logits (`_softmax_float32`), its weights then go back to
the compute dtype for the matmul that uses them.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from volo_convert.architecture.variants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OUTLOOK_KERNEL,
    PIXEL_MAX,
)

PACKAGE = "volo_convert"
KERNEL_AREA = OUTLOOK_KERNEL * OUTLOOK_KERNEL


def _unfold_taps(x: Any, out_h: int, out_w: int) -> list[Any]:
    """The 9 taps of a 3x3, stride-2 unfold of a zero-padded B, 2h+2, 2w+2, C map.

    Returns:
        9 tensors of shape B, h, w, C in torch's kernel order (row-major (ki, kj)).
    """
    channels = x.shape[-1]
    rows = ops.reshape(x, (-1, out_h + 1, 2, 2 * out_w + 2, channels))  # B, h+1, 2, W+2, C
    row_taps = [rows[:, :out_h, 0], rows[:, :out_h, 1], rows[:, 1:, 0]]  # each B, h, W+2, C
    taps = []
    for row_tap in row_taps:
        cols = ops.reshape(row_tap, (-1, out_h, out_w + 1, 2, channels))  # B, h, w+1, 2, C
        taps += [cols[:, :, :out_w, 0], cols[:, :, :out_w, 1], cols[:, :, 1:, 0]]
    return taps


def _softmax_float32(logits: Any, compute_dtype: str, scale: float = 1.0) -> Any:
    """softmax(`logits` x `scale`) over the last axis, in float32, cast to `compute_dtype`.

    bfloat16's 8 significant bits would round the exponents' differences; the casts are
    no-ops for a float32 layer.
    """
    logits = ops.cast(logits, "float32")
    attn = ops.softmax(logits * scale if scale != 1.0 else logits, axis=-1)
    return ops.cast(attn, compute_dtype)


def _add_next_window(last_tap: Any, first_tap: Any, axis: int) -> Any:
    """`last_tap` of window i plus `first_tap` of window i+1 along `axis` (1 or 2).

    With kernel 3, stride 2 and padding 1, output position 2i+1 is covered twice: by
    kernel position 2 of window i and kernel position 0 of window i+1; col2im sums them.
    """
    following = first_tap[:, 1:] if axis == 1 else first_tap[:, :, 1:]
    padding = [(0, 0)] * 4
    padding[axis] = (0, 1)  # the last window has no next one
    return last_tap + ops.pad(following, padding)


def _fold_taps(taps: list[Any]) -> Any:
    """col2im of 3x3, stride-2, padding-1 windows: 9 taps B, h, w, C -> B, 2h, 2w, C.

    Each output parity class gathers its taps directly: even positions 2i take kernel
    position 1 of window i, odd ones the overlap sum of `_add_next_window`. The four
    parity grids are interleaved by stacks and reshapes (rank 5 at most).
    """
    _, out_h, out_w, channels = taps[0].shape
    even_even = taps[4]  # kernel (1, 1)
    even_odd = _add_next_window(taps[5], taps[3], axis=2)  # kernel (1, 2) + next (1, 0)
    odd_even = _add_next_window(taps[7], taps[1], axis=1)  # kernel (2, 1) + next (0, 1)
    odd_odd = _add_next_window(
        _add_next_window(taps[8], taps[6], axis=2),
        _add_next_window(taps[2], taps[0], axis=2),
        axis=1,
    )
    even_rows = ops.reshape(
        ops.stack([even_even, even_odd], axis=3), (-1, out_h, 2 * out_w, channels)
    )  # B, h, W, C
    odd_rows = ops.reshape(ops.stack([odd_even, odd_odd], axis=3), (-1, out_h, 2 * out_w, channels))
    rows = ops.stack([even_rows, odd_rows], axis=2)  # B, h, 2, W, C
    return ops.reshape(rows, (-1, 2 * out_h, 2 * out_w, channels))  # B, H, W, C


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenDense(keras.layers.Dense):
    """A Dense layer over the last axis, computed as one 2-D matmul of all tokens.

    Keras' Dense runs a rank-4 input as a tensordot, whose reshape sits between the matmul
    and its bias add; flattened here, the bias add and the activation follow the matmul
    directly, and TensorFlow's oneDNN remapper fuses all three into one kernel. That matters
    most in bfloat16, where the fused exact GELU replaces TensorFlow's slow bfloat16 erfc
    (docs/BENCHMARKS.md, "Inference speed"). Weights and config are Dense's.
    """

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        tokens = ops.reshape(inputs, (-1, inputs.shape[-1]))  # B*H*W, C_in
        outputs = super().call(tokens, training=training)  # B*H*W, units
        return ops.reshape(outputs, (-1, *inputs.shape[1:-1], self.units))  # B, H, W, units


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelNormalization(keras.layers.Layer):
    """RGB pixels in 0..255 (uint8 or float) -> ImageNet-normalised float32, B, S, S, 3.

    `(x / 255 - mean) / std` as one multiply and one add per channel, so a quantized file
    folds it into its first layers.
    """

    def call(self, pixels: Any) -> Any:
        scale = [1.0 / (PIXEL_MAX * std) for std in IMAGENET_STD]
        offset = [-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
        return ops.cast(pixels, "float32") * ops.array(scale, "float32") + ops.array(
            offset, "float32"
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class OutlookAggregation(keras.layers.Layer):
    """Outlook attention's core: softmax over 3x3 windows, weighted unfold, then fold.

    Inputs are `[values, attn_logits]`: values B, H, W, C from the `v` projection, and
    logits B, H/2, W/2, heads*81 from the `attn` projection of the pooled input. The
    result is B, H, W, C, before the output projection.
    """

    def __init__(self, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def call(self, inputs: list[Any]) -> Any:
        values, attn_logits = inputs
        _, height, width, channels = values.shape
        out_h, out_w = height // 2, width // 2
        head_dim = channels // self.num_heads
        num_windows = out_h * out_w

        attn_logits = ops.reshape(
            attn_logits, (-1, num_windows * self.num_heads, KERNEL_AREA, KERNEL_AREA)
        )  # B, N*heads, k*k, k*k
        attn = _softmax_float32(attn_logits, self.compute_dtype, head_dim**-0.5)

        # The taps are stacked straight into the heads-first layout the matmul reads, and
        # read back from it, so no transpose moves the windows.
        padded = ops.pad(values, [(0, 0), (1, 1), (1, 1), (0, 0)])  # B, H+2, W+2, C
        head_taps = [
            ops.reshape(tap, (-1, num_windows, self.num_heads, head_dim))  # B, N, heads, C/heads
            for tap in _unfold_taps(padded, out_h, out_w)
        ]
        windows = ops.stack(head_taps, axis=3)  # B, N, heads, k*k, C/heads
        windows = ops.reshape(windows, (-1, num_windows * self.num_heads, KERNEL_AREA, head_dim))

        weighted = ops.matmul(attn, windows)  # B, N*heads, k*k, C/heads
        weighted = ops.reshape(weighted, (-1, num_windows, self.num_heads, KERNEL_AREA, head_dim))
        return _fold_taps(
            [
                ops.reshape(weighted[:, :, :, tap], (-1, out_h, out_w, channels))  # B, h, w, C
                for tap in range(KERNEL_AREA)
            ]
        )

    def compute_output_shape(self, input_shape: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(keras.layers.Layer):
    """Self-attention's core on a fused B, H, W, 3C qkv projection; returns B, H, W, C."""

    def __init__(self, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def call(self, qkv: Any) -> Any:
        _, height, width, fused_channels = qkv.shape
        channels = fused_channels // 3
        head_dim = channels // self.num_heads
        qkv = ops.reshape(qkv, (-1, height * width, 3, self.num_heads, head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # 3, B, heads, N, C/heads
        # The scale goes on the query, N/(C/heads) times smaller than the logits.
        query, key, value = qkv[0] * (head_dim**-0.5), qkv[1], qkv[2]
        attn_logits = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2)))  # B, heads, N, N
        attn = _softmax_float32(attn_logits, self.compute_dtype)
        x = ops.transpose(ops.matmul(attn, value), (0, 2, 1, 3))  # B, N, heads, C/heads
        return ops.reshape(x, (-1, height, width, channels))

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*input_shape[:-1], input_shape[-1] // 3)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassAttention(keras.layers.Layer):
    """Class attention's core: inputs `[query B, 1, C, kv B, N, 2C]`; returns B, 1, C."""

    def __init__(self, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def call(self, inputs: list[Any]) -> Any:
        query, kv = inputs
        _, num_tokens, fused_channels = kv.shape
        channels = fused_channels // 2
        head_dim = channels // self.num_heads
        kv = ops.reshape(kv, (-1, num_tokens, 2, self.num_heads, head_dim))
        kv = ops.transpose(kv, (2, 0, 3, 1, 4))  # 2, B, heads, N, C/heads
        key, value = kv[0], kv[1]
        query = ops.reshape(query, (-1, self.num_heads, 1, head_dim)) * (head_dim**-0.5)
        attn_logits = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2)))  # B, heads, 1, N
        attn = _softmax_float32(attn_logits, self.compute_dtype)
        x = ops.transpose(ops.matmul(attn, value), (0, 2, 1, 3))  # B, 1, heads, C/heads
        return ops.reshape(x, (-1, 1, channels))

    def compute_output_shape(self, input_shape: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return (input_shape[0][0], 1, input_shape[0][-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(keras.layers.Layer):
    """Stochastic depth on a residual branch: the identity outside training.

    In training, each sample's whole branch is dropped with probability `rate` and the
    kept ones are scaled by 1 / (1 - rate), as timm's `DropPath` does.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x: Any, training: bool | None = None) -> Any:
        if not training or self.rate == 0:
            return x
        per_sample = (None,) + (1,) * (len(x.shape) - 1)  # B, 1, ..., 1
        return keras.random.dropout(x, self.rate, noise_shape=per_sample, seed=self.seed_generator)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned 1, h, w, C position embedding (`pos_embed`) to a B, h, w, C map."""

    def build(self, input_shape: tuple[Any, ...]) -> None:
        self.pos_embed = self.add_weight(
            shape=(1, *input_shape[1:]), initializer="zeros", name="pos_embed"
        )

    def call(self, x: Any) -> Any:
        return x + self.pos_embed


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Flattens a B, h, w, C map to tokens and prepends the learned class token."""

    def build(self, input_shape: tuple[Any, ...]) -> None:
        self.cls_token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer="zeros", name="cls_token"
        )

    def call(self, x: Any) -> Any:
        _, height, width, channels = x.shape
        tokens = ops.reshape(x, (-1, height * width, channels))  # B, N, C
        cls_tokens = ops.repeat(self.cls_token, ops.shape(tokens)[0], axis=0)  # B, 1, C
        return ops.concatenate([cls_tokens, tokens], axis=1)  # B, 1+N, C

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (input_shape[0], input_shape[1] * input_shape[2] + 1, input_shape[3])


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenSlice(keras.layers.Layer):
    """Tokens `start:stop` of a B, N, C sequence (a layer, so `.h5` files reload)."""

    def __init__(self, start: int, stop: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start = start
        self.stop = stop

    def call(self, tokens: Any) -> Any:
        return tokens[:, self.start : self.stop]

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        num_tokens = len(range(input_shape[1])[self.start : self.stop])
        return (input_shape[0], num_tokens, *input_shape[2:])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenLabelingLogits(keras.layers.Layer):
    """Published eval logits: class-token logits plus half the max over patch-token logits.

    Inputs are `[cls_logits B, 1, K, patch_logits B, N, K]`; returns B, K.
    """

    def call(self, inputs: list[Any]) -> Any:
        cls_logits, patch_logits = inputs
        return cls_logits[:, 0] + 0.5 * ops.max(patch_logits, axis=1)

    def compute_output_shape(self, input_shape: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return (input_shape[0][0], input_shape[0][-1])
