"""Synthetic VOLO checkpoints in the release format, with realistic, asymmetric weights.

Default initialisation (zero biases, unit norms, near-uniform attention) hides wrong
transposes and permutations, so every tensor here is drawn away from those values and
the attention projections are scaled up until the softmaxes are peaked. Two further
styles (options.WEIGHT_STYLES) serve the quantization study: VOLO's own initialisation
with peaked attention, and realistic weights given what trained transformers have and
random ones lack: heavy-tailed kernels and a few residual channels that run far larger
than the rest, so every LayerNorm meets outliers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import RELEASE_CHECKPOINTS, VARIANTS, VoloConfig
from volo_convert.errors import ConversionError, first_line
from volo_convert.options import WEIGHT_STYLES, check_choice
from volo_convert.paths import (
    check_not_a_stream,
    check_output_path,
    move_into_place,
    staged_output,
)

# Gains on 1/sqrt(fan_in): large on attention logits (peaked softmax), small on the
# residual branches' last layers (the residual stream stays in a float32-friendly range).
ATTENTION_GAIN = 2.0
OUTLOOK_ATTENTION_GAIN = 10.0  # its logits are also scaled by head_dim**-0.5
RESIDUAL_OUT_GAIN = 0.5
HEAD_GAIN = 3.0
BATCHES_TRACKED = 31250
UPSTREAM_STD = 0.02  # VOLO's trunc_normal_ on every Linear, the pos_embed and the cls_token
UPSTREAM_TRUNCATION = 2.0  # trunc_normal_ cuts at +-2 (absolute; two hundred stds)
HEAVY_TAIL_DF = 3  # Student's t degrees of freedom of trained-like kernels
OUTLIER_CHANNELS = 4  # residual channels per width that run large in trained-like weights
OUTLIER_GAIN = 8.0
# What writes into the residual stream, whose rows (last axis for the embeddings) carry the
# outlier channels: the patch embedding, the downsamples, each block's projections out.
RESIDUAL_WRITERS = re.compile(
    r"^(patch_embed\.proj|network\.\d+\.proj|.*attn\.proj|.*mlp\.fc2)\.(weight|bias)$"
)


def _gain(key: str) -> float:
    if key.endswith("attn.attn.weight"):
        return OUTLOOK_ATTENTION_GAIN
    if key.endswith(("attn.qkv.weight", "attn.q.weight", "attn.kv.weight")):
        return ATTENTION_GAIN
    if key.endswith(("attn.proj.weight", "mlp.fc2.weight")):
        return RESIDUAL_OUT_GAIN
    if key.startswith(("head.", "aux_head.")):
        return HEAD_GAIN
    if key.startswith("patch_embed.conv."):
        return math.sqrt(2.0)  # ReLU follows
    return 1.0


def _synthetic_tensor(key: str, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A realistic value for one tensor of the state dict."""
    shape = template.shape

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    if key.endswith("num_batches_tracked"):
        return torch.tensor(BATCHES_TRACKED, dtype=torch.long)
    if key.endswith("running_mean"):
        return normal(0.3)
    if key.endswith("running_var"):
        return uniform(0.4, 2.5)
    if key in ("pos_embed", "cls_token"):
        return normal(0.5)
    if template.dim() == 1 and key.endswith("weight"):  # LayerNorm / BatchNorm scale
        return uniform(0.6, 1.4) * torch.sign(uniform(-0.1, 1.0))
    if key.endswith("bias"):
        return normal(0.5 if key.startswith(("head.", "aux_head.")) else 0.1)
    fan_in = math.prod(shape[1:])
    return normal(_gain(key) / math.sqrt(fan_in))


def _upstream_state_dict(
    template: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The values VOLO's own initialisation gives, its attention scaled until peaked.

    Linear kernels, the pos_embed and the cls_token are trunc_normal_(std 0.02), Linear
    biases zero, norms one and zero; convolutions keep torch's default (uniform within
    1/sqrt(fan_in), the bias too) and BatchNorm its fresh statistics.
    """
    values = {}
    for key, tensor in template.items():
        shape = tensor.shape
        weight = template.get(key.removesuffix("bias") + "weight")
        if key.endswith("num_batches_tracked"):
            values[key] = torch.tensor(0, dtype=torch.long)
        elif weight is not None and weight.dim() == 4:  # a convolution's weight or bias
            bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
            values[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif key.endswith("running_var") or (key.endswith("weight") and tensor.dim() == 1):
            values[key] = torch.ones(shape)
        elif key.endswith(("running_mean", "bias")):
            values[key] = torch.zeros(shape)
        else:
            peaked = key.endswith(
                ("attn.attn.weight", "attn.qkv.weight", "attn.q.weight", "attn.kv.weight")
            )
            std = _gain(key) / math.sqrt(shape[-1]) if peaked else UPSTREAM_STD
            drawn = torch.randn(shape, generator=generator) * std
            values[key] = drawn.clamp(-UPSTREAM_TRUNCATION, UPSTREAM_TRUNCATION)
    return values


def _heavy_tailed(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Student's t (HEAVY_TAIL_DF) values scaled to unit variance."""
    normal = torch.randn(shape, generator=generator)
    chi_square = (torch.randn((HEAVY_TAIL_DF, *shape), generator=generator) ** 2).sum(0)
    return (
        normal
        / torch.sqrt(chi_square / HEAVY_TAIL_DF)
        * math.sqrt((HEAVY_TAIL_DF - 2) / HEAVY_TAIL_DF)
    )


def _trained_like(
    state_dict: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Realistic weights given heavy-tailed kernels and outlier residual channels.

    Each kernel keeps its std but draws from Student's t. OUTLIER_CHANNELS channels of each
    residual width are written OUTLIER_GAIN times larger by everything that writes into the
    residual stream (and start so in the pos_embed and cls_token), so every LayerNorm of the
    stage meets the same few large channels, as in trained transformers.
    """
    outliers: dict[int, torch.Tensor] = {}
    shaped = {}
    for key, tensor in state_dict.items():
        if tensor.dim() >= 2 and key not in ("pos_embed", "cls_token"):
            tensor = _heavy_tailed(tensor.shape, generator) * tensor.std()
        axis = tensor.dim() - 1 if key in ("pos_embed", "cls_token") else 0
        if axis or RESIDUAL_WRITERS.match(key):
            width = tensor.shape[axis]
            if width not in outliers:
                outliers[width] = torch.randperm(width, generator=generator)[:OUTLIER_CHANNELS]
            gains = torch.ones(width)
            gains[outliers[width]] = OUTLIER_GAIN
            broadcast = [width if position == axis else 1 for position in range(tensor.dim())]
            tensor = tensor * gains.reshape(broadcast)
        shaped[key] = tensor
    return shaped


def make_state_dict(
    config: VoloConfig, image_size: int, seed: int = 0, style: str = WEIGHT_STYLES[0]
) -> dict[str, torch.Tensor]:
    """Returns a release-format state dict (bare, with BN counters) for `config`, its
    values drawn in `style` (options.WEIGHT_STYLES)."""
    check_choice("weight style", style, WEIGHT_STYLES)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        template = Volo(config, image_size).state_dict()
    if style == "upstream-init":
        return _upstream_state_dict(template, generator)
    state_dict = {key: _synthetic_tensor(key, value, generator) for key, value in template.items()}
    return _trained_like(state_dict, generator) if style == "trained-like" else state_dict


def write_checkpoint(
    path: str | Path,
    config: VoloConfig,
    image_size: int,
    seed: int = 0,
    style: str = WEIGHT_STYLES[0],
) -> Path:
    """Writes a synthetic release-format `.pth.tar` (a bare state dict) and returns its path.

    It replaces a file at `path` (the callers decide that it may) through the output
    policy: staged, then moved into place.
    """
    path = check_output_path(path, overwrite=True)
    with staged_output(path) as temp_path:
        try:
            torch.save(make_state_dict(config, image_size, seed, style), temp_path)
        except (OSError, RuntimeError) as error:  # torch words a full disk as a RuntimeError
            raise ConversionError(f"{path}: could not write ({first_line(error)})") from None
        move_into_place(temp_path, path)
    return path


def check_release_name(name: str) -> None:
    """Raises a ConversionError unless `name` is one of the eleven release file names."""
    if name not in RELEASE_CHECKPOINTS:
        raise ConversionError(
            f"unknown release checkpoint {name!r}, expected one of {', '.join(RELEASE_CHECKPOINTS)}"
        )


def write_release_checkpoints(
    folder: str | Path,
    names: list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    on_file: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Writes synthetic checkpoints under the release file names, for offline batch runs.

    Args:
        folder: where the files go (created).
        names: release file names (keys of RELEASE_CHECKPOINTS); all eleven when None.
        seed: the first file's seed; each further file gets the next one.
        overwrite: rewrite files that exist; otherwise they are kept as they are.
        on_file: called with each path before it is written.

    Returns:
        The paths of the requested files.
    """
    check_not_a_stream(folder, "output")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(f"{folder}: cannot create the folder ({error.strerror})") from None
    names = list(RELEASE_CHECKPOINTS) if names is None else names
    paths = []
    for name in names:
        check_release_name(name)
    for index, name in enumerate(names):
        path = folder / name
        if overwrite or not path.exists():
            if on_file is not None:
                on_file(path)
            variant, image_size = RELEASE_CHECKPOINTS[name]
            write_checkpoint(path, VARIANTS[variant], image_size, seed=seed + index)
        paths.append(path)
    return paths


def corrupt_checkpoint(path: str | Path) -> None:
    """Cuts a file to half its length, as an interrupted download would leave it."""
    path = Path(path)
    with path.open("r+b") as stream:
        stream.truncate(path.stat().st_size // 2)
