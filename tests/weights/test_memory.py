"""Dropping a mapped checkpoint's pages loses nothing and never touches other memory."""

from __future__ import annotations

from pathlib import Path

import torch

from volo_convert.weights.checkpoint import load_state_dict
from volo_convert.weights.memory import MappedCheckpoint


def test_released_pages_read_back_the_same_values(d1_checkpoint: Path) -> None:
    state_dict = load_state_dict(d1_checkpoint).state_dict
    mapped = MappedCheckpoint(d1_checkpoint)
    assert mapped.ranges, "torch.load(mmap=True) should map the checkpoint file"
    tensor = state_dict["network.2.0.mlp.fc1.weight"]
    before = tensor.clone()
    mapped.release_all(state_dict.values())
    assert torch.equal(tensor, before)


def test_memory_outside_the_file_is_left_alone(d1_checkpoint: Path) -> None:
    state_dict = load_state_dict(d1_checkpoint).state_dict  # keeps the file mapped
    anonymous = torch.ones(1 << 20)  # 4 MB, many whole pages
    mapped = MappedCheckpoint(d1_checkpoint)
    assert mapped.ranges and state_dict
    mapped.release(anonymous)
    assert bool((anonymous == 1).all())
