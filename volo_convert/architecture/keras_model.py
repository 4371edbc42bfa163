"""Keras 3 VOLO: a flat functional graph whose layer names the mapping tables target.

Names follow `stem_*`, `stack{stage}_block{index}_*`, `downsample`, `pos_embed`,
`cls_token`, `classifier{index}_*`, `norm`, `head`, `aux_head`; the output layer is
`logits` (heads `full` and `cls`) or `features` (head `features`).

Every layer gets its dtype policy explicitly, so the global policy of the caller's process
neither changes the model nor is changed by it. Under compute dtype bfloat16 the layers that
compute (convolutions, the Dense layers inside the blocks, the attention cores, the
activations) take Keras' `mixed_bfloat16` policy: float32 variables, bfloat16 compute. The
residual stream (its adds, the LayerNorms, the position embedding, the layers that only
move tokens) and the heads stay float32, so the logits are float32; the saved config
carries each layer's policy, so a reloaded file computes as the converted one did.

Training-time layers exist only where their rate is above 0, as upstream's `nn.Identity`
stand-ins: `stack{stage}_block{index}_drop_path_{1,2}` on the transformer blocks' residual
branches and `pos_drop` after the position embedding. The stem's BatchNorm layers use batch
statistics in training and update their moving statistics with torch's momentum.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import keras
from keras import layers

from volo_convert.architecture.keras_layers import (
    ClassAttention,
    ClassToken,
    DropPath,
    MultiHeadSelfAttention,
    OutlookAggregation,
    PixelNormalization,
    PositionEmbedding,
    TokenDense,
    TokenLabelingLogits,
    TokenSlice,
)
from volo_convert.architecture.variants import (
    BATCHNORM_MOMENTUM,
    HEAD_OUTPUTS,
    NORM_EPS,
    NUM_CLASS_BLOCKS,
    OUTLOOK_KERNEL,
    PATCH_SIZE,
    STEM_STRIDE,
    TRANSFORMER_STACKS,
    VoloConfig,
    block_drop_path_rate,
    stage_names,
)
from volo_convert.compat import deferred_variables_kept
from volo_convert.errors import ConversionError
from volo_convert.options import (
    COMPUTE_DTYPES,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_DROP_PATH_RATE,
    DEFAULT_DROP_RATE,
    DEFAULT_HEAD,
    DEFAULT_INPUT,
    HEADS,
    INPUTS,
    check_choice,
    check_image_size,
    check_rate,
)

# Porting fills every kernel, so they start as zeros: drawing random values for d5's 300M
# weights would take about 4 s of a 10 s build, and as long again on every reload.
KERNEL_INITIALIZER = "zeros"
_dense = functools.partial(TokenDense, kernel_initializer=KERNEL_INITIALIZER)
_conv2d = functools.partial(layers.Conv2D, kernel_initializer=KERNEL_INITIALIZER)

# Keras' dtype policy for each of COMPUTE_DTYPES: mixed_bfloat16 keeps float32 variables.
COMPUTE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# The policy of the residual stream and the heads under any compute dtype. They hold under
# 2% of d1's multiply-adds, and bfloat16's 8 significant bits there would add up over the
# blocks and round the logits.
EXACT_POLICY = "float32"


def _layer_norm(name: str) -> layers.LayerNormalization:
    return layers.LayerNormalization(epsilon=NORM_EPS, dtype=EXACT_POLICY, name=name)


def _add(name: str) -> layers.Add:
    """A residual add, kept float32 so that the stream it carries is."""
    return layers.Add(dtype=EXACT_POLICY, name=name)


def _mlp(x: Any, dim: int, mlp_ratio: int, prefix: str, policy: str) -> Any:
    """Dense with exact GELU -> Dense, named `{prefix}_mlp_*`, computing under `policy`.

    The GELU is the first Dense layer's activation, so TensorFlow fuses it into the matmul.
    """
    x = _dense(
        dim * mlp_ratio,
        activation=keras.activations.gelu,
        dtype=policy,
        name=f"{prefix}_mlp_dense_1",
    )(x)
    return _dense(dim, dtype=policy, name=f"{prefix}_mlp_dense_2")(x)


def _stem(images: Any, hidden_dim: int, embed_dim: int, policy: str) -> Any:
    """Conv7x7/2 -> 2x conv3x3, each with BN and ReLU, then the 4x4/4 patch projection."""
    x = images
    for index, (kernel_size, stride) in enumerate(((7, STEM_STRIDE), (3, 1), (3, 1)), start=1):
        x = layers.ZeroPadding2D(kernel_size // 2, dtype=policy, name=f"stem_pad{index}")(x)
        x = _conv2d(
            hidden_dim,
            kernel_size,
            strides=stride,
            use_bias=False,
            dtype=policy,
            name=f"stem_conv{index}",
        )(x)
        x = layers.BatchNormalization(  # Keras normalises in float32 under mixed policies
            momentum=1.0 - BATCHNORM_MOMENTUM,
            epsilon=NORM_EPS,
            dtype=policy,
            name=f"stem_bn{index}",
        )(x)
        x = layers.ReLU(dtype=policy, name=f"stem_relu{index}")(x)
    patch_stride = PATCH_SIZE // STEM_STRIDE
    return _conv2d(embed_dim, patch_stride, strides=patch_stride, dtype=policy, name="stem_proj")(x)


def _outlooker(x: Any, dim: int, num_heads: int, mlp_ratio: int, prefix: str, policy: str) -> Any:
    """Outlooker block on B, H, W, C."""
    normed = _layer_norm(f"{prefix}_norm1")(x)
    values = _dense(dim, use_bias=False, dtype=policy, name=f"{prefix}_attn_v")(normed)
    pooled = layers.AveragePooling2D(2, strides=2, dtype=policy, name=f"{prefix}_attn_pool")(normed)
    attn_logits = _dense(OUTLOOK_KERNEL**4 * num_heads, dtype=policy, name=f"{prefix}_attn_attn")(
        pooled
    )  # B, H/2, W/2, heads*k^4
    attn = OutlookAggregation(num_heads, dtype=policy, name=f"{prefix}_attn_outlook")(
        [values, attn_logits]
    )
    attn = _dense(dim, dtype=policy, name=f"{prefix}_attn_proj")(attn)
    x = _add(f"{prefix}_add_1")([x, attn])
    mlp = _mlp(_layer_norm(f"{prefix}_norm2")(x), dim, mlp_ratio, prefix, policy)
    return _add(f"{prefix}_add_2")([x, mlp])


def _drop_path(branch: Any, rate: float, name: str, policy: str) -> Any:
    """`branch` through a DropPath layer, or as it is when `rate` is 0."""
    return DropPath(rate, dtype=policy, name=name)(branch) if rate > 0 else branch


def _transformer(
    x: Any, dim: int, num_heads: int, mlp_ratio: int, prefix: str, drop_path: float, policy: str
) -> Any:
    """Transformer block on B, H, W, C; both residual branches get drop path `drop_path`."""
    qkv = _dense(3 * dim, use_bias=False, dtype=policy, name=f"{prefix}_attn_qkv")(
        _layer_norm(f"{prefix}_norm1")(x)
    )
    attn = MultiHeadSelfAttention(num_heads, dtype=policy, name=f"{prefix}_attn_mhsa")(qkv)
    attn = _dense(dim, dtype=policy, name=f"{prefix}_attn_proj")(attn)
    attn = _drop_path(attn, drop_path, f"{prefix}_drop_path_1", policy)
    x = _add(f"{prefix}_add_1")([x, attn])
    mlp = _mlp(_layer_norm(f"{prefix}_norm2")(x), dim, mlp_ratio, prefix, policy)
    mlp = _drop_path(mlp, drop_path, f"{prefix}_drop_path_2", policy)
    return _add(f"{prefix}_add_2")([x, mlp])


def _class_block(
    tokens: Any, dim: int, num_heads: int, mlp_ratio: int, prefix: str, policy: str
) -> Any:
    """Class-attention block on B, 1+N, C: only the class token (index 0) is updated."""
    normed = _layer_norm(f"{prefix}_norm1")(tokens)
    kv = _dense(2 * dim, use_bias=False, dtype=policy, name=f"{prefix}_attn_kv")(normed)
    query = _dense(dim, use_bias=False, dtype=policy, name=f"{prefix}_attn_q")(
        TokenSlice(0, 1, dtype=EXACT_POLICY, name=f"{prefix}_attn_cls")(normed)
    )
    attn = ClassAttention(num_heads, dtype=policy, name=f"{prefix}_attn_class")([query, kv])
    attn = _dense(dim, dtype=policy, name=f"{prefix}_attn_proj")(attn)
    cls_token = TokenSlice(0, 1, dtype=EXACT_POLICY, name=f"{prefix}_cls")(tokens)
    cls_token = _add(f"{prefix}_add_1")([cls_token, attn])
    mlp = _mlp(_layer_norm(f"{prefix}_norm2")(cls_token), dim, mlp_ratio, prefix, policy)
    cls_token = _add(f"{prefix}_add_2")([cls_token, mlp])
    patch_tokens = TokenSlice(1, None, dtype=EXACT_POLICY, name=f"{prefix}_patches")(tokens)
    return layers.Concatenate(axis=1, dtype=EXACT_POLICY, name=f"{prefix}_merge")(
        [cls_token, patch_tokens]
    )


def _head(tokens: Any, config: VoloConfig, head: str) -> Any:
    """The model's float32 output on the normalised B, 1+N, C tokens, for one of HEADS."""
    cls_token = TokenSlice(0, 1, dtype=EXACT_POLICY, name="head_cls")(tokens)  # B, 1, C
    if head == "features":
        return layers.Reshape((config.embed_dims[-1],), dtype=EXACT_POLICY, name="features")(
            cls_token
        )  # B, C
    cls_logits = _dense(config.num_classes, dtype=EXACT_POLICY, name="head")(cls_token)  # B, 1, K
    if head == "cls":
        return layers.Reshape((config.num_classes,), dtype=EXACT_POLICY, name="logits")(
            cls_logits
        )  # B, K
    patch_logits = _dense(config.num_classes, dtype=EXACT_POLICY, name="aux_head")(
        TokenSlice(1, None, dtype=EXACT_POLICY, name="aux_head_patches")(tokens)
    )  # B, N, K
    return TokenLabelingLogits(dtype=EXACT_POLICY, name="logits")([cls_logits, patch_logits])


def model_head(model: keras.Model) -> str:
    """The head a built or reloaded Keras VOLO ends in, read from its layer names."""
    layer_names = {layer.name for layer in model.layers}
    if "aux_head" in layer_names:
        return "full"
    if "head" in layer_names:
        return "cls"
    if "features" in layer_names:
        return "features"
    raise ConversionError(
        f"{model.name}: not a Keras VOLO from volo-convert (it has no head, aux_head or "
        "features layer)"
    )


def model_compute_dtype(model: keras.Model) -> str:
    """What a built or reloaded Keras VOLO computes in: `bfloat16` if any layer does, else
    `float32` (one of COMPUTE_DTYPES)."""
    if any(layer.compute_dtype == "bfloat16" for layer in model.layers):
        return "bfloat16"
    return DEFAULT_COMPUTE_DTYPE


def model_input(model: keras.Model) -> str:
    """What a built or reloaded Keras VOLO takes: `pixels` or `images` (one of INPUTS)."""
    if any(isinstance(layer, PixelNormalization) for layer in model.layers):
        return "pixels"
    return DEFAULT_INPUT


# The Dense layers each LayerNorm's output feeds, by the norm's name suffix (through the
# outlooker's average pooling and the class token's slice, which act per channel).
_NORM_CONSUMERS = {
    "_norm1": ("_attn_v", "_attn_attn", "_attn_qkv", "_attn_kv", "_attn_q"),
    "_norm2": ("_mlp_dense_1",),
}


def norm_consumers(model: keras.Model) -> dict[str, tuple[str, ...]]:
    """LayerNorm name -> the Dense layers that take its output, for a built or reloaded VOLO.

    The final `norm` is included only when its output feeds nothing but the heads (not for
    head `features`, whose output it is).
    """
    layer_names = {layer.name for layer in model.layers}
    consumers = {}
    for name in sorted(layer_names):
        for suffix, dense_suffixes in _NORM_CONSUMERS.items():
            if name.endswith(suffix):
                prefix = name.removesuffix(suffix)
                consumers[name] = tuple(
                    prefix + dense for dense in dense_suffixes if prefix + dense in layer_names
                )
    if model_head(model) != "features":
        consumers["norm"] = tuple(name for name in ("head", "aux_head") if name in layer_names)
    return consumers


def stage_output_layers(config: VoloConfig, head: str = DEFAULT_HEAD) -> dict[str, str]:
    """Stage name (`stage_names(head)`, in order) -> the Keras layer whose output ends it."""
    layer_names = {
        "stem": "stem_proj",
        "downsample": "pos_embed",
        "norm": "norm",
        HEAD_OUTPUTS[head]: HEAD_OUTPUTS[head],
    }
    for stack, num_blocks in enumerate(config.layers):
        layer_names[f"stack{stack}"] = f"stack{stack}_block{num_blocks - 1}_add_2"
    for index in range(NUM_CLASS_BLOCKS):
        layer_names[f"classifier{index}"] = f"classifier{index}_merge"
    return {stage: layer_names[stage] for stage in stage_names(head)}


def build_volo(
    config: VoloConfig,
    image_size: int,
    head: str = DEFAULT_HEAD,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    drop_rate: float = DEFAULT_DROP_RATE,
    input_kind: str = DEFAULT_INPUT,
    compute_dtype: str = DEFAULT_COMPUTE_DTYPE,
) -> keras.Model:
    """Builds the Keras VOLO classifier.

    Args:
        config: the architecture (a `VARIANTS` entry, or a tiny test configuration).
        image_size: input side S, a multiple of 16.
        head: `full` (published logits), `cls` (class head only) or `features`.
        drop_path_rate: stochastic depth of the last transformer block; the others get
            less (`block_drop_path_rate`). Training only.
        drop_rate: dropout after the position embedding. Training only.
        input_kind: `images` (ImageNet-normalised) or `pixels` (RGB 0..255, normalised
            inside).
        compute_dtype: `float32`, or `bfloat16` for float32 weights computing in bfloat16
            (`mixed_bfloat16`) outside the residual stream and the heads.

    Returns:
        A model mapping B, S, S, 3 float32 images (or pixels) to B, num_classes float32
        logits, or to B, C normalised class-token features for head `features`.
    """
    check_image_size(image_size, ValueError)
    check_choice("head", head, HEADS, ValueError)
    check_rate("drop path rate", drop_path_rate, ValueError)
    check_rate("drop rate", drop_rate, ValueError)
    check_choice("input", input_kind, INPUTS, ValueError)
    check_choice("compute dtype", compute_dtype, COMPUTE_DTYPES, ValueError)
    policy = COMPUTE_POLICIES[compute_dtype]
    dims, heads, mlp_ratio = config.embed_dims, config.num_heads, config.mlp_ratio
    inputs = keras.Input((image_size, image_size, 3), name=input_kind)  # B, S, S, 3
    images = (
        PixelNormalization(dtype=EXACT_POLICY, name="pixel_normalization")(inputs)
        if input_kind == "pixels"
        else inputs
    )
    x = _stem(images, config.stem_hidden_dim, dims[0], policy)  # B, S/8, S/8, C1
    for block in range(config.layers[0]):
        x = _outlooker(x, dims[0], heads[0], mlp_ratio, f"stack0_block{block}", policy)
    x = _conv2d(dims[1], 2, strides=2, dtype=policy, name="downsample")(x)  # B, S/16, S/16, C2
    x = PositionEmbedding(dtype=EXACT_POLICY, name="pos_embed")(x)
    if drop_rate > 0:
        x = layers.Dropout(drop_rate, dtype=EXACT_POLICY, name="pos_drop")(x)
    for stage in TRANSFORMER_STACKS:
        for block in range(config.layers[stage]):
            rate = block_drop_path_rate(config, stage, block, drop_path_rate)
            prefix = f"stack{stage}_block{block}"
            x = _transformer(x, dims[stage], heads[stage], mlp_ratio, prefix, rate, policy)
    tokens = ClassToken(dtype=EXACT_POLICY, name="cls_token")(x)  # B, 1+N, C
    for index in range(NUM_CLASS_BLOCKS):
        prefix = f"classifier{index}"
        tokens = _class_block(tokens, dims[-1], heads[-1], mlp_ratio, prefix, policy)
    tokens = _layer_norm("norm")(tokens)
    outputs = _head(tokens, config, head)
    return keras.Model(inputs, outputs, name=f"volo_{config.name}_{image_size}")


@contextlib.contextmanager
def skeleton_scope() -> Iterator[None]:
    """Models built inside are skeletons: variables with names, shapes and config only.

    For writing a file straight from the checkpoint's tensors, with no weight in memory
    and no assign. The variables' deferred initialisation is forgotten on the way out, so
    no later `keras.StatelessScope` fills them; a skeleton cannot run.
    """
    with deferred_variables_kept(), keras.StatelessScope(initialize_variables=False):
        yield


@contextlib.contextmanager
def drop_rates_at_zero(model: keras.Model) -> Iterator[keras.Model]:
    """Holds every drop path and dropout rate of `model` at 0 inside the block.

    Training is then deterministic, so it can be compared with PyTorch's; the rates are
    put back afterwards.
    """
    drop_layers = [layer for layer in model.layers if isinstance(layer, DropPath | layers.Dropout)]
    rates = [layer.rate for layer in drop_layers]
    for layer in drop_layers:
        layer.rate = 0.0
    try:
        yield model
    finally:
        for layer, rate in zip(drop_layers, rates, strict=True):
            layer.rate = rate


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` computing under `policy` (say `mixed_bfloat16`), same weights.

    A saved model keeps each layer's dtype policy, so setting a global policy before
    loading it changes nothing; this rebuilds every layer under `policy`.
    """
    copy = keras.models.clone_model(
        model,
        clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), "dtype": policy}
        ),
    )
    weights = {variable.path: variable for variable in model.weights}
    for variable in copy.weights:
        variable.assign(weights[variable.path])
    return copy
