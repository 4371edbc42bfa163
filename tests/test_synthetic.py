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


def _norm_inputs(config, state_dict: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and what the first transformer block's norm1 meets, on 2 images at 64px."""
    model = Volo(config, 64)
    model.load_state_dict(state_dict)
    model.eval()
    seen = []
    model.network[2][0].norm1.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    images = torch.from_numpy(sample_images(2, 64)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        logits = model(images)
    return logits, seen[0]


def test_weight_styles_for_the_quantization_study() -> None:
    config = VARIANTS["d1"]
    upstream = make_state_dict(config, 64, seed=0, style="upstream-init")
    assert torch.equal(upstream["network.2.0.norm1.weight"], torch.ones(384))
    assert not upstream["network.2.0.attn.proj.bias"].any()
    assert float(upstream["head.weight"].std()) == pytest.approx(0.02, rel=0.05)

    realistic = make_state_dict(config, 64, seed=0)
    trained = make_state_dict(config, 64, seed=0, style="trained-like")
    kernel = trained["network.2.0.mlp.fc1.weight"]
    kurtosis = ((kernel - kernel.mean()) ** 4).mean() / kernel.var() ** 2
    assert kurtosis > 5  # Student's t; a normal's is 3
    realistic_std = float(realistic["network.2.0.mlp.fc1.weight"].std())
    assert float(kernel.std()) == pytest.approx(realistic_std, rel=0.1)

    for state_dict, outliers in ((realistic, False), (upstream, False), (trained, True)):
        logits, norm_input = _norm_inputs(config, state_dict)
        assert torch.isfinite(logits).all() and logits.std() > 0.1
        channel_peaks = norm_input.abs().amax(dim=(0, 1))  # C
        assert (channel_peaks.max() / channel_peaks.median() > 8) == outliers
