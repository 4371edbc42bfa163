"""The PyTorch side of every check: one run of the reference, keeping every stage's output."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
import numpy as np
import torch

from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import (
    HEAD_OUTPUTS,
    NUM_CLASS_BLOCKS,
    OUTLOOK_KERNEL,
    PATCH_SIZE,
    POS_EMBED_STRIDE,
    STEM_STRIDE,
    VoloConfig,
)
from volo_convert.checks.images import normalize, sample_pixels, synthetic_names
from volo_convert.checks.photos import Photos
from volo_convert.errors import ConversionError
from volo_convert.options import (
    DEFAULT_HEAD,
    DEFAULT_SEED,
    DEFAULT_VERIFY_IMAGES,
    DEVICES,
    check_choice,
)
from volo_convert.weights.checkpoint import COUNTER_SUFFIX

# Images per reference forward pass: 64 verification images of d5 at 512 in one pass
# would hold about 4 GB of attention maps.
REFERENCE_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """The reference's output at every stage, in network order, on one batch of images.

    `pixels` are B, S, S, 3 uint8 RGB; `images` the same, normalised, as the reference
    took them. `device` is where the reference ran. The last stage is the model's output:
    `logits`, or `features` for head `features`. `names` name the images in reports: the
    photos' paths, or `synthetic[i]`; `photos` says which.
    """

    pixels: np.ndarray
    images: np.ndarray
    stage_outputs: dict[str, np.ndarray]
    head: str
    device: str
    names: tuple[str, ...] = ()
    photos: bool = False

    @property
    def outputs(self) -> np.ndarray:
        """The final output: B, K logits, or B, C features."""
        return self.stage_outputs[HEAD_OUTPUTS[self.head]]


FLOAT32_BYTES = 4
# Both models hold about this many of the largest intermediate tensor at once per image
# (input, output and a temporary of the op in flight, in each framework).
LIVE_INTERMEDIATES = 6


def reference_memory_bytes(config: VoloConfig, image_size: int, batch_size: int) -> int:
    """A generous estimate of the memory a verification run needs for `batch_size` images.

    Counts the stage outputs the reference run keeps plus the largest intermediate tensors
    (the stem's first convolution, an MLP's hidden layer, an outlooker's windows, a
    transformer's attention matrix, which grows with the square of the token count).
    """
    stem_side = image_size // STEM_STRIDE
    outlook_tokens = (image_size // PATCH_SIZE) ** 2
    tokens = (image_size // POS_EMBED_STRIDE) ** 2
    kernel_area = OUTLOOK_KERNEL * OUTLOOK_KERNEL
    kept = (
        2 * outlook_tokens * config.embed_dims[0]  # stem, stack0
        + 4 * tokens * config.embed_dims[1]  # downsample, stack1..3
        + (NUM_CLASS_BLOCKS + 1) * (tokens + 1) * config.embed_dims[-1]  # class blocks, norm
        + config.num_classes
    )
    largest = max(
        stem_side**2 * config.stem_hidden_dim,
        outlook_tokens * config.embed_dims[0] * max(config.mlp_ratio, kernel_area),
        config.num_heads[1] * tokens**2,
    )
    return FLOAT32_BYTES * batch_size * (kept + LIVE_INTERMEDIATES * largest)


def resolve_device(device: str) -> torch.device:
    """Maps `auto|cpu|cuda` to a torch device, refusing CUDA where there is none."""
    check_choice("device", device, DEVICES, ValueError)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


def use_exact_float32() -> None:
    """Turns off TF32 matmuls, which would loosen GPU results to about 1e-3."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


def build_reference(
    config: VoloConfig,
    image_size: int,
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    head: str = DEFAULT_HEAD,
) -> Volo:
    """The PyTorch reference in eval mode with the checkpoint's weights, on `device`.

    The weights are shared with `state_dict`, not copied; only BatchNorm's
    `num_batches_tracked` counters, unused in eval, may be absent.
    """
    with torch.device("meta"):
        reference = Volo(config, image_size, head)
    missing, unexpected = reference.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in missing if not key.endswith(COUNTER_SUFFIX)]
    if missing or unexpected:
        raise ConversionError(
            f"the checkpoint does not fit a VOLO {config.name} at {image_size}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return reference.to(device).eval()


def reference_stage_outputs(
    reference: Volo, images: np.ndarray, device: torch.device
) -> dict[str, np.ndarray]:
    """Runs the reference on B, S, S, 3 images; returns each stage's output, in order."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), REFERENCE_CHUNK):
            batch = torch.from_numpy(images[start : start + REFERENCE_CHUNK])
            outputs = reference.stage_outputs(batch.permute(0, 3, 1, 2).to(device))  # B, 3, S, S
            chunks.append(
                {stage: values.float().cpu().numpy() for stage, values in outputs.items()}
            )
    return {stage: np.concatenate([chunk[stage] for chunk in chunks]) for stage in chunks[0]}


def run_reference(
    config: VoloConfig,
    image_size: int,
    state_dict: Mapping[str, torch.Tensor],
    *,
    head: str = DEFAULT_HEAD,
    device: torch.device | str = DEVICES[0],
    photos: Photos | None = None,
    batch_size: int = DEFAULT_VERIFY_IMAGES,
    seed: int = DEFAULT_SEED,
) -> ReferenceRun:
    """Builds the reference from `state_dict` and runs it once on the images.

    Args:
        config, image_size: the architecture.
        state_dict: the checkpoint's tensors (after any pos_embed resize).
        head: the head the reference ends in.
        device: where it runs: a torch device, or `auto`, `cpu` or `cuda`.
        photos: the photos to run on; None for seeded synthetic images.
        batch_size, seed: how many synthetic images, from which seed.
    """
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    use_exact_float32()
    if photos is None:
        names, pixels = synthetic_names(batch_size), sample_pixels(batch_size, image_size, seed)
    else:
        names, pixels = photos.names, photos.pixels
    images = normalize(pixels)
    reference = build_reference(config, image_size, state_dict, torch_device, head)
    stage_outputs = reference_stage_outputs(reference, images, torch_device)
    return ReferenceRun(
        pixels, images, stage_outputs, head, torch_device.type, names, photos is not None
    )
