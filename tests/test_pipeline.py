"""The pipeline's order: a checkpoint that cannot fit fails while it is read, before building."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import volo_convert
from volo_convert.errors import ConversionError


@pytest.fixture(scope="module")
def release_state_dict(tiny_checkpoint_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_checkpoint_file, weights_only=True)


CHANGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing-tensor": (
        lambda state_dict: state_dict.pop("network.2.0.attn.qkv.weight"),
        "tensors missing from the checkpoint: network.2.0.attn.qkv.weight",
    ),
    "extra-tensor": (
        lambda state_dict: state_dict.update({"head_dist.weight": torch.zeros(10, 32)}),
        "checkpoint tensors no mapping uses: head_dist.weight",
    ),
    "wrong-shape": (
        lambda state_dict: state_dict.update({"network.0.1.attn.v.weight": torch.ones(16, 14)}),
        "network.0.1.attn.v.weight has shape (16, 14), which after dense_kernel is (14, 16), "
        "but stack0_block1_attn_v/kernel expects (16, 16)",
    ),
    "wrong-shape-in-the-aux-head": (  # checked although head="cls" leaves the aux head out
        lambda state_dict: state_dict.update({"aux_head.bias": torch.zeros(9)}),
        "aux_head.bias has shape (9,), which after identity is (9,), but aux_head/bias "
        "expects (10,)",
    ),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_a_checkpoint_that_cannot_fit_fails_before_building(
    case: str, release_state_dict: dict, tmp_path: Path, tiny_variant: None
) -> None:
    change, message = CHANGES[case]
    state_dict = dict(release_state_dict)
    change(state_dict)
    checkpoint = tmp_path / "d1.pth.tar"
    torch.save(state_dict, checkpoint)
    stages: list[str] = []
    with pytest.raises(ConversionError) as raised:
        volo_convert.convert(
            checkpoint, tmp_path / "d1.h5", head="cls", device="cpu", on_stage=stages.append
        )
    assert str(raised.value) == f"{checkpoint}: {message}"
    assert stages == ["loading"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d1.pth.tar"]
