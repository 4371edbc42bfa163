"""VOLO hyper-parameters: the variant table and detection from checkpoint tensor shapes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from volo_convert.errors import ConversionError
from volo_convert.options import IMAGE_SIZE_MULTIPLE

PATCH_SIZE = 8
STEM_STRIDE = 2  # the stem's first conv; the patch projection does the remaining 4
NORM_EPS = 1e-5  # LayerNorm and BatchNorm, as in torch
# torch's BatchNorm momentum: the weight of each training batch in the running statistics.
BATCHNORM_MOMENTUM = 0.1
POS_EMBED_STRIDE = IMAGE_SIZE_MULTIPLE  # patch 8, then the 2x2 downsample
OUTLOOK_KERNEL = 3
NUM_CLASS_BLOCKS = 2
DEFAULT_NUM_CLASSES = 1000
# The published preprocessing: RGB scaled to [0, 1], then normalised with ImageNet's mean/std.
PIXEL_MAX = 255.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The name of the last stage for each of HEADS: logits, or the class-token features.
HEAD_OUTPUTS = {"full": "logits", "cls": "logits", "features": "features"}
NUM_STACKS = 4
TRANSFORMER_STACKS = tuple(range(1, NUM_STACKS))  # stack 0 is the outlookers
# The stages the network runs through, in order, up to the head's output (HEAD_OUTPUTS):
# the per-stage diagnosis compares these, the training check groups its weights by them.
STAGES = (
    "stem",
    "stack0",
    "downsample",
    *(f"stack{stack}" for stack in TRANSFORMER_STACKS),
    *(f"classifier{index}" for index in range(NUM_CLASS_BLOCKS)),
    "norm",
)


@dataclasses.dataclass(frozen=True)
class VoloConfig:
    """Architecture hyper-parameters of one VOLO model (image size is kept apart)."""

    name: str
    layers: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    mlp_ratio: int
    stem_hidden_dim: int
    num_classes: int = DEFAULT_NUM_CLASSES

    def with_num_classes(self, num_classes: int) -> VoloConfig:
        """Returns a copy with another classifier size (fine-tuned checkpoints)."""
        return dataclasses.replace(self, num_classes=num_classes)


VARIANTS: dict[str, VoloConfig] = {
    "d1": VoloConfig("d1", (4, 4, 8, 2), (192, 384, 384, 384), (6, 12, 12, 12), 3, 64),
    "d2": VoloConfig("d2", (6, 4, 10, 4), (256, 512, 512, 512), (8, 16, 16, 16), 3, 64),
    "d3": VoloConfig("d3", (8, 8, 16, 4), (256, 512, 512, 512), (8, 16, 16, 16), 3, 64),
    "d4": VoloConfig("d4", (8, 8, 16, 4), (384, 768, 768, 768), (12, 16, 16, 16), 3, 64),
    "d5": VoloConfig("d5", (12, 12, 20, 4), (384, 768, 768, 768), (12, 16, 16, 16), 4, 128),
}


def stage_names(head: str) -> tuple[str, ...]:
    """Every stage in network order, ending in the output of `head` (one of HEADS)."""
    return (*STAGES, HEAD_OUTPUTS[head])


def block_drop_path_rate(
    config: VoloConfig, stage: int, block: int, drop_path_rate: float
) -> float:
    """Stochastic depth of block `block` of stage `stage` (0-3), as upstream VOLO sets it.

    Only the transformer stages (1-3) have drop path, but the rate grows with the block's
    index counted over every stage, outlookers included; the outlookers (stage 0) and the
    class-attention blocks have none.
    """
    if stage == 0:
        return 0.0
    return drop_path_rate * (block + sum(config.layers[:stage])) / (sum(config.layers) - 1)


# The eleven release files: (variant, image size) by file name.
RELEASE_CHECKPOINTS: dict[str, tuple[str, int]] = {
    "d1_224_84.2.pth.tar": ("d1", 224),
    "d1_384_85.2.pth.tar": ("d1", 384),
    "d2_224_85.2.pth.tar": ("d2", 224),
    "d2_384_86.0.pth.tar": ("d2", 384),
    "d3_224_85.4.pth.tar": ("d3", 224),
    "d3_448_86.3.pth.tar": ("d3", 448),
    "d4_224_85.7.pth.tar": ("d4", 224),
    "d4_448_86.79.pth.tar": ("d4", 448),
    "d5_224_86.10.pth.tar": ("d5", 224),
    "d5_448_87.0.pth.tar": ("d5", 448),
    "d5_512_87.07.pth.tar": ("d5", 512),
}

# Tensors that every VOLO checkpoint holds (their absence means "not VOLO"), with the
# number of dimensions detection relies on.
_SIGNATURE_RANKS = {
    "patch_embed.conv.0.weight": 4,
    "patch_embed.proj.weight": 4,
    "pos_embed": 4,
    "cls_token": 3,
    "network.0.0.attn.attn.weight": 2,
    "head.weight": 2,
}
_SIGNATURE_KEYS = tuple(_SIGNATURE_RANKS)
_MLP_KEY = "network.0.0.mlp.fc1.weight"

# The eval transform's crop_pct of each release (variant, image size): the shorter side is
# resized to floor(size / crop_pct), then the centre size x size is cropped.
RELEASE_CROP_PCT: dict[tuple[str, int], float] = {
    ("d1", 224): 0.96,
    ("d1", 384): 1.0,
    ("d2", 224): 0.96,
    ("d2", 384): 1.0,
    ("d3", 224): 0.96,
    ("d3", 448): 1.0,
    ("d4", 224): 0.96,
    ("d4", 448): 1.15,
    ("d5", 224): 0.96,
    ("d5", 448): 1.15,
    ("d5", 512): 1.15,
}
DEFAULT_CROP_PCT = 0.96  # a variant without release files (test configurations): timm's 224 value
# timm's eval transform: how the resize keeps the aspect ratio (crop_mode), and the resampling.
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
DEFAULT_CROP_MODE = "center"
DEFAULT_INTERPOLATION = "bicubic"
# The crop_pct a config may name: timm's run from 0.875 to 1.15; far outside, the resize
# before the crop would be a sliver or a photo many times its size.
CROP_PCT_RANGE = (0.25, 4.0)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """How timm's eval transform prepares a photo for one model.

    The image is resized to floor(image_size / crop_pct) with `interpolation`, then cut to
    image_size x image_size as `crop_mode` says: `center` resizes the shorter side and
    crops the centre, `squash` resizes both sides and crops, `border` resizes the longer
    side and pads with the mean colour. A hub folder's config.json can name each.
    """

    crop_pct: float
    interpolation: str = DEFAULT_INTERPOLATION
    crop_mode: str = DEFAULT_CROP_MODE


_NETWORK_BLOCK = re.compile(r"^network\.(\d+)\.(\d+)\.")


def crop_pct(variant: str, image_size: int) -> float:
    """The eval crop_pct for `variant` at `image_size`.

    A release size gets its published value; another size gets that of the variant's
    release nearest in size (the smaller on a tie), so d4 at 384 crops like d4_448 and
    d1 at 256 like d1_224. A variant without release files gets DEFAULT_CROP_PCT.
    """
    sizes = sorted(size for name, size in RELEASE_CROP_PCT if name == variant)
    if not sizes:
        return DEFAULT_CROP_PCT
    nearest = min(sizes, key=lambda size: abs(size - image_size))
    return RELEASE_CROP_PCT[(variant, nearest)]


def eval_transform(variant: str, image_size: int) -> EvalTransform:
    """The release eval transform for `variant` at `image_size` (bicubic, centre crop)."""
    return EvalTransform(crop_pct(variant, image_size))


def get_variant(name: str) -> VoloConfig:
    """Looks a variant up by name (`d1` or `volo_d1`)."""
    key = name.lower().removeprefix("volo_")
    if key not in VARIANTS:
        raise ConversionError(f"unknown variant {name!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], network_index: int) -> int:
    """Counts the blocks of `network.{network_index}` from the tensor names."""
    blocks = {
        int(match.group(2))
        for key in shapes
        if (match := _NETWORK_BLOCK.match(key)) and int(match.group(1)) == network_index
    }
    return max(blocks) + 1 if blocks else 0


def detect_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[VoloConfig, int]:
    """Finds the variant and image size of a checkpoint from its tensor shapes.

    Args:
        shapes: torch tensor name -> shape, for the whole checkpoint.

    Returns:
        The matching `VoloConfig` (with the checkpoint's class count) and the image size.
    """
    missing = [key for key in _SIGNATURE_KEYS if key not in shapes]
    if len(missing) == len(_SIGNATURE_KEYS):
        found = ", ".join(list(shapes)[:3]) + (", ..." if len(shapes) > 3 else "")
        raise ConversionError(
            f"not a VOLO checkpoint: expected tensors such as {', '.join(_SIGNATURE_KEYS[:3])}, "
            f"found {found}"
        )
    if missing:
        raise ConversionError(f"VOLO checkpoint with tensors missing: {', '.join(missing)}")
    pos_embed_shape = shapes["pos_embed"]
    if len(pos_embed_shape) != 4 or pos_embed_shape[1] != pos_embed_shape[2]:
        raise ConversionError(
            f"pos_embed has shape {tuple(pos_embed_shape)}, expected (1, S/16, S/16, C)"
        )
    ranks = {**_SIGNATURE_RANKS, _MLP_KEY: 2} if _MLP_KEY in shapes else _SIGNATURE_RANKS
    for key, rank in ranks.items():
        if len(shapes[key]) != rank:
            raise ConversionError(
                f"{key} has shape {tuple(shapes[key])}, expected {rank} dimensions"
            )
    layers = tuple(_count_blocks(shapes, index) for index in (0, 2, 3, 4))
    embed_dims = (shapes["patch_embed.proj.weight"][0],) + (pos_embed_shape[-1],) * 3
    stem_hidden_dim = shapes["patch_embed.conv.0.weight"][0]
    mlp_hidden = shapes.get(_MLP_KEY, (0,))[0]
    mlp_ratio = mlp_hidden // embed_dims[0] if embed_dims[0] else 0
    found = (layers, embed_dims, mlp_ratio, stem_hidden_dim)
    for config in VARIANTS.values():
        if (config.layers, config.embed_dims, config.mlp_ratio, config.stem_hidden_dim) == found:
            num_classes = shapes["head.weight"][0]
            return config.with_num_classes(num_classes), pos_embed_shape[1] * POS_EMBED_STRIDE
    raise ConversionError(
        f"VOLO checkpoint of unknown layout (layers {layers}, embed dims {embed_dims}, "
        f"mlp ratio {mlp_ratio}, stem dim {stem_hidden_dim}): it matches none of "
        f"{', '.join(VARIANTS)}"
    )
