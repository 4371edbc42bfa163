"""Synthetic checkpoints must be realistic enough to expose wrong transposes."""

from __future__ import annotations

import pytest
import torch

from volo_convert.architecture.torch_reference import Volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.images import sample_images
from volo_convert.synthetic import make_state_dict


@pytest.mark.large
def test_weights_are_away_from_default_init() -> None:
    state_dict = make_state_dict(VARIANTS["d1"], 224, seed=0)
    norm_scale = state_dict["network.2.0.norm1.weight"]
    assert (norm_scale - 1).abs().mean() > 0.1
    assert state_dict["network.2.0.attn.proj.bias"].abs().mean() > 0.02
    assert state_dict["patch_embed.conv.1.running_mean"].abs().mean() > 0.1
    assert (state_dict["patch_embed.conv.1.running_var"] - 1).abs().mean() > 0.2
    assert state_dict["cls_token"].abs().mean() > 0.1
    assert int(state_dict["patch_embed.conv.1.num_batches_tracked"]) > 0


@pytest.mark.large
def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first = make_state_dict(VARIANTS["d1"], 32, seed=1)
    assert torch.equal(
        first["head.weight"], make_state_dict(VARIANTS["d1"], 32, seed=1)["head.weight"]
    )
    assert not torch.equal(
        first["head.weight"], make_state_dict(VARIANTS["d1"], 32, seed=2)["head.weight"]
    )


@pytest.mark.large
def test_attention_is_peaked_not_uniform() -> None:
    config = VARIANTS["d1"]
    model = Volo(config, 224)
    model.load_state_dict(make_state_dict(config, 224, seed=0))
    model.eval()
    images = torch.from_numpy(sample_images(1, 224)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        tokens = model.stage_outputs(images)["downsample"]  # B, 14, 14, C
        block = model.network[2][0]
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(1, 196, 3, 12, 32).permute(2, 0, 3, 1, 4)
        probs = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 32**-0.5).softmax(-1)
    # Uniform attention over 196 tokens would put 0.005 on the largest weight.
    assert probs.max(dim=-1).values.mean() > 0.2
