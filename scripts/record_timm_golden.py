"""Records golden outputs of timm's VOLO, the independent reference the tests hold ours to.

For each small configuration below it builds timm's `VOLO` class, fills it with seeded,
asymmetric weights drawn from timm's own state dict (names and shapes are timm's, not
ours), runs it on seeded images and writes, under tests/data/timm_golden/:

- `NAME.safetensors`: the weights, as timm's hub files hold them (float16 values, so the
  files stay small; timm ran on their exact float32 upcast);
- `NAME.golden.safetensors`: the images (float16 values, float32 to the model) and timm's
  float32 outputs on them;
- `manifest.json`: the configurations, seeds, versions and this command.

This script imports nothing from volo_convert: the data it records must not depend on our
reading of VOLO. It needs timm 1.0.x (`pip install timm==1.0.31`), which the project does not:

    python scripts/record_timm_golden.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import safetensors
import timm
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import save_file as save_tensors
from timm.models.volo import VOLO

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "timm_golden"
BATCH_SIZE = 3
IMAGE_SEED_OFFSET = 1000  # the images' seed is the weights' seed plus this
# Model configurations: timm's VOLO keyword arguments and the image size. `tiny` is the
# tests' TINY_CONFIG; `odd` changes every head count, the MLP ratio and the image size.
CONFIGS: dict[str, dict] = {
    "tiny": {
        "image_size": 64,
        "seed": 20,
        "model": {
            "layers": (2, 1, 1, 1),
            "embed_dims": (16, 32, 32, 32),
            "num_heads": (2, 4, 4, 4),
            "mlp_ratio": 3,
            "stem_hidden_dim": 8,
            "num_classes": 10,
        },
    },
    "odd": {
        "image_size": 48,
        "seed": 21,
        "model": {
            "layers": (1, 2, 1, 1),
            "embed_dims": (12, 24, 24, 24),
            "num_heads": (3, 6, 2, 8),
            "mlp_ratio": 2,
            "stem_hidden_dim": 6,
            "num_classes": 7,
        },
    },
}
# Gains on 1/sqrt(fan_in): attention logits large enough for peaked softmaxes, the residual
# branches' last layers small enough to keep the residual stream in range.
GAINS = {
    "attn.attn.weight": 8.0,  # outlook attention weights, also scaled by head_dim**-0.5
    "attn.qkv.weight": 1.5,
    "attn.q.weight": 1.5,
    "attn.kv.weight": 1.5,
    "attn.proj.weight": 0.6,
    "mlp.fc2.weight": 0.6,
    "head.weight": 3.0,
    "aux_head.weight": 3.0,
}
OUTLIER_CHANNELS = 2  # residual-stream channels the position embedding pushes far off zero
OUTLIER_OFFSET = 3.0


def _gain(key: str) -> float:
    for suffix, gain in GAINS.items():
        if key.endswith(suffix):
            return gain
    return math.sqrt(2.0) if key.startswith("patch_embed.conv.") else 1.0


def _weight(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A matrix or kernel with its own scale per output and per input channel.

    Rows and columns scaled apart make every transpose, permutation or swapped axis give
    other numbers, even where the shapes would let a wrong layout through.
    """

    def uniform(size: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(size, generator=generator) * (high - low) + low

    fan_in = math.prod(shape[1:])
    value = torch.randn(shape, generator=generator) * _gain(key) / math.sqrt(fan_in)
    rows = uniform((shape[0],) + (1,) * (len(shape) - 1), 0.5, 1.5)
    columns = uniform((1, shape[1]) + (1,) * (len(shape) - 2), 0.6, 1.4)
    return value * rows * columns


def _tensor(key: str, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A realistic value for one tensor of timm's state dict, away from default init."""
    shape = template.shape
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=generator) * 0.3
    if key.endswith("running_var"):
        return torch.rand(shape, generator=generator) * 2.0 + 0.4
    if key in ("pos_embed", "cls_token"):
        value = torch.randn(shape, generator=generator) * 0.5
        if key == "pos_embed":
            value[..., :OUTLIER_CHANNELS] += OUTLIER_OFFSET  # outliers entering LayerNorm
        return value
    if template.dim() == 1 and key.endswith("weight"):  # LayerNorm / BatchNorm scale
        sign = torch.where(torch.rand(shape, generator=generator) < 0.1, -1.0, 1.0)
        return (torch.rand(shape, generator=generator) * 0.8 + 0.6) * sign
    if key.endswith("bias"):
        std = 0.5 if key.startswith(("head.", "aux_head.")) else 0.1
        return torch.randn(shape, generator=generator) * std + 0.05
    return _weight(key, shape, generator)


def seeded_state_dict(model: VOLO, seed: int) -> dict[str, torch.Tensor]:
    """timm's state dict filled with seeded values, rounded to float16 (stored so)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, template in model.state_dict().items():
        value = _tensor(key, template, generator)
        state_dict[key] = value.half() if value.is_floating_point() else value
    return state_dict


def seeded_images(image_size: int, seed: int) -> torch.Tensor:
    """B, 3, S, S normalised images: per-channel offsets and contrast, like ImageNet's."""
    generator = torch.Generator().manual_seed(seed + IMAGE_SEED_OFFSET)
    noise = torch.randn((BATCH_SIZE, 3, image_size, image_size), generator=generator)
    offsets = torch.tensor([0.2, -0.1, 0.3]).reshape(1, 3, 1, 1)
    scales = torch.tensor([1.1, 0.9, 1.0]).reshape(1, 3, 1, 1)
    return (noise * scales + offsets).half().float()  # stored as float16, exactly


@torch.no_grad()
def timm_outputs(model: VOLO, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm's outputs: eval logits (aux head included), the class head alone, the class
    token features, every token after the final norm, and train-mode logits."""
    model.eval()
    tokens = model.forward_features(images)  # B, 1+N, C
    outputs = {
        "logits": model(images),
        "cls_logits": model.head(tokens[:, 0]),
        "features": model.forward_head(tokens, pre_logits=True),
        "tokens": tokens,
    }
    model.train()  # the stem's BatchNorm on batch statistics; no dropout, no drop path
    outputs["train_logits"] = model(images)
    model.eval()
    return outputs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(name: str, spec: dict, folder: Path) -> dict:
    """Writes one configuration's weights and golden outputs; returns its manifest entry."""
    torch.manual_seed(spec["seed"])
    model = VOLO(img_size=spec["image_size"], **spec["model"])
    state_dict = seeded_state_dict(model, spec["seed"])
    model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    images = seeded_images(spec["image_size"], spec["seed"])
    outputs = timm_outputs(model, images)

    weights_path = folder / f"{name}.safetensors"
    golden_path = folder / f"{name}.golden.safetensors"
    save_tensors(state_dict, str(weights_path))
    arrays = {"images": images.half(), **outputs}
    # safetensors.numpy writes a strided array's buffer as if it were contiguous (0.8.0)
    arrays = {key: value.contiguous().numpy() for key, value in arrays.items()}
    save_arrays(arrays, str(golden_path))
    for key, value in load_arrays(str(golden_path)).items():
        assert np.array_equal(value, arrays[key]), f"{golden_path}: {key} did not round-trip"
    return {
        "image_size": spec["image_size"],
        "seed": spec["seed"],
        "image_seed": spec["seed"] + IMAGE_SEED_OFFSET,
        "model": spec["model"],
        "batch_size": BATCH_SIZE,
        "weights": weights_path.name,
        "weights_sha256": _sha256(weights_path),
        "golden": golden_path.name,
        "golden_sha256": _sha256(golden_path),
        "outputs": {
            key: {"shape": list(value.shape), "max_abs": float(value.abs().max())}
            for key, value in outputs.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one summation order for every run of this script
    manifest = {
        "made_by": "pip install timm==1.0.31 && python scripts/record_timm_golden.py",
        "versions": {
            "timm": timm.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
        "configs": {name: record(name, spec, args.output) for name, spec in CONFIGS.items()},
    }
    manifest_path = args.output / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for path in sorted(args.output.iterdir()):
        print(f"{path.stat().st_size:>9,} bytes  {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
