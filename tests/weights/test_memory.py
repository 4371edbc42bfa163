"""Dropping a mapped checkpoint's pages loses nothing and never touches other memory, and a
conversion holds less than one copy of the weights at its worst moment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volo_convert.weights.checkpoint import load_state_dict
from volo_convert.weights.memory import MappedCheckpoint

pytestmark = pytest.mark.large  # page release and peak memory on real widths


def test_released_pages_read_back_the_same_values(d1_checkpoint: Path) -> None:
    state_dict = load_state_dict(d1_checkpoint).state_dict
    mapped = MappedCheckpoint(d1_checkpoint)
    assert mapped.ranges, "torch.load(mmap=True) should map the checkpoint file"
    tensor = state_dict["network.2.0.mlp.fc1.weight"]
    before = tensor.clone()
    for released in state_dict.values():
        mapped.release(released)
    assert torch.equal(tensor, before)


def test_memory_outside_the_file_is_left_alone(d1_checkpoint: Path) -> None:
    state_dict = load_state_dict(d1_checkpoint).state_dict  # keeps the file mapped
    anonymous = torch.ones(1 << 20)  # 4 MB, many whole pages
    mapped = MappedCheckpoint(d1_checkpoint)
    assert mapped.ranges and state_dict
    mapped.release(anonymous)
    assert bool((anonymous == 1).all())


# Converts in a fresh process and prints how far resident memory rose above what the
# imports left: VmHWM (the peak) minus VmRSS before the conversion.
GROWTH_PROGRAM = """
import sys
from volo_convert.options import ConvertOptions
from volo_convert.pipeline import convert

def status_bytes(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

before = status_bytes("VmRSS:")
convert(sys.argv[1], sys.argv[2], ConvertOptions(verify=False))
print(status_bytes("VmHWM:") - before)
"""
# Writing the .h5 straight from the mapped checkpoint holds one tensor at a time; the rest
# is the graph's own objects (about 20 MB for d1). Holding the weights in Keras, as
# `model.save` needs, rose by 1.5 copies.
MAX_GROWTH_COPIES = 0.5


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_conversion_holds_less_than_one_copy_of_the_weights(
    d1_checkpoint: Path, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", GROWTH_PROGRAM, d1_checkpoint, tmp_path / "d1.h5"]
    converted = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    growth = int(converted.stdout.split()[-1])
    assert growth < MAX_GROWTH_COPIES * d1_checkpoint.stat().st_size
