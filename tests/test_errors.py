"""Every accepted checkpoint form and every bad input (docs/ERRORS.md: "Inputs and errors").

Error cases check the exit code, the one-line message and that nothing was left in the
output folder; accepted forms are converted and verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
import torch
from helpers import REPO, error_line, error_table, run, snapshot
from safetensors.torch import save_file

from volo_convert import pipeline
from volo_convert.errors import ConversionError, about, first_line
from volo_convert.pipeline import conversion
from volo_convert.weights.checkpoint import load_state_dict


class TrainingArguments:
    """A custom class inside a checkpoint: unpickling it needs this module's code."""

    def __init__(self) -> None:
        self.lr = 1e-3


class RunsACommand:
    """What a malicious checkpoint holds: unpickling it would call os.system."""

    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


# Every case runs on the tiny layout, which the CLI detects as it detects d1: what is
# checked here (reading, refusing, the output policy) does not depend on the widths.
pytestmark = pytest.mark.usefixtures("tiny_variant")


@pytest.fixture(scope="module")
def release_state_dict(tiny_checkpoint_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_checkpoint_file, weights_only=True)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def with_change(state_dict: dict, change: Callable[[dict], None]) -> dict:
    changed = dict(state_dict)
    change(changed)
    return changed


# case id -> (writes the input into a folder and returns its path, extra CLI args, message)
ERROR_CASES: dict[str, tuple[Callable[[Path, dict], Path], list[str], str]] = {
    "missing-path": (lambda folder, sd: folder / "nope.pth.tar", [], "{input}: no such file"),
    "folder": (
        lambda folder, sd: folder,
        [],
        "{input}: is a folder that holds no model.safetensors or pytorch_model.bin; expected "
        "a checkpoint file or a hub folder (config.json beside the weights)",
    ),
    "empty-file": (
        lambda folder, sd: (folder / "empty.pth.tar").touch() or folder / "empty.pth.tar",
        [],
        "{input}: the file is empty",
    ),
    "random-bytes": (
        lambda folder, sd: _write_bytes(folder / "random.pth", bytes(range(255, 0, -1)) * 40),
        [],
        "{input}: not a PyTorch or safetensors checkpoint, it looks like binary data of an "
        "unknown format",
    ),
    "truncated": (
        lambda folder, sd: _truncated(_save(folder / "d1.pth.tar", sd), keep_bytes=5000),
        [],
        "{input}: the checkpoint is truncated or corrupt",
    ),
    "json-file": (
        lambda folder, sd: _write_bytes(folder / "config.json", b'{"model": "volo_d1"}'),
        [],
        "{input}: not a PyTorch or safetensors checkpoint, it looks like a JSON file",
    ),
    "text-file": (
        lambda folder, sd: _write_bytes(folder / "notes.pth.tar", b"my checkpoint notes\n"),
        [],
        "{input}: not a PyTorch or safetensors checkpoint, it looks like a text file",
    ),
    "code-pickle": (
        lambda folder, sd: _save(
            folder / "trainer.pth", {"state_dict": sd, "args": TrainingArguments()}
        ),
        [],
        "{input}: refusing to unpickle, the file needs test_errors.TrainingArguments, which could "
        "run code when loaded; if you trust its source, pass --trust-checkpoint",
    ),
    "other-architecture": (
        lambda folder, sd: _save(
            folder / "resnet50.pth",
            {"conv1.weight": torch.ones(4, 3, 7, 7), "fc.weight": torch.ones(2, 4)},
        ),
        [],
        "{input}: not a VOLO checkpoint: expected tensors such as patch_embed.conv.0.weight, "
        "patch_embed.proj.weight, pos_embed, found conv1.weight, fc.weight",
    ),
    "missing-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar", with_change(sd, lambda c: c.pop("network.2.0.attn.qkv.weight"))
        ),
        [],
        "{input}: tensors missing from the checkpoint: network.2.0.attn.qkv.weight",
    ),
    "extra-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"head_dist.weight": torch.ones(10, 32)})),
        ),
        [],
        "{input}: checkpoint tensors no mapping uses: head_dist.weight",
    ),
    "wrong-shape": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"network.0.1.attn.v.weight": torch.ones(16, 14)})),
        ),
        [],
        "{input}: network.0.1.attn.v.weight has shape (16, 14), which after dense_kernel is "
        "(14, 16), but stack0_block1_attn_v/kernel expects (16, 16)",
    ),
    "nan-weights": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"norm.bias": torch.full((32,), float("nan"))})),
        ),
        [],
        "{input}: weights hold NaN or Inf values in norm.bias",
    ),
    "inf-weights": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(
                sd, lambda c: c.update({"cls_token": torch.full((1, 1, 32), float("inf"))})
            ),
        ),
        [],
        "{input}: weights hold NaN or Inf values in cls_token",
    ),
    "ema-missing": (
        lambda folder, sd: _save(folder / "d1.pth.tar", {"state_dict": sd}),
        ["--ema"],
        "{input}: --ema was given but the file holds no 'state_dict_ema'",
    ),
    "ema-none": (
        lambda folder, sd: _save(folder / "d1.pth.tar", {"state_dict": sd, "state_dict_ema": None}),
        ["--ema"],
        "{input}: --ema was given but the file's 'state_dict_ema' holds None, not a state dict",
    ),
    "state-dict-none": (
        lambda folder, sd: _save(folder / "d1.pth.tar", {"epoch": 3, "state_dict": None}),
        [],
        "{input}: the file's 'state_dict' holds None, not a state dict",
    ),
    "unknown-extension": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/d1.onnx"],
        "{out}/d1.onnx: unknown output extension '.onnx', expected one of .h5, .keras, "
        ".tflite, or none for a SavedModel folder",
    ),
    "output-folder-missing": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/no/such/d1.h5"],
        "{out}/no/such/d1.h5: the output folder {out}/no/such does not exist",
    ),
    "output-folder-unwritable": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "/proc/d1.h5"],
        "/proc/d1.h5: the output folder /proc is not writable (No such file or directory)",
    ),
    "output-exists": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/keep.h5"],
        "{out}/keep.h5: already exists; pass --overwrite to replace it",
    ),
    "image-size-not-16": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--image-size", "100"],
        "image size must be a positive multiple of 16, got 100",
    ),
    "cuda-without-gpu": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--device", "cuda"],
        "--device cuda was asked for, but PyTorch sees no CUDA GPU here",
    ),
    "report-is-input": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--report", "{input}", "--overwrite"],
        "{input}: is the input {input}; refusing to replace it",
    ),
    "report-exists": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--report", "{out}/keep.h5"],
        "{out}/keep.h5: already exists; pass --overwrite to replace it",
    ),
    "report-is-output": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/d1.h5", "--report", "{out}/d1.h5"],
        "{out}/d1.h5: is also the model output; name another file",
    ),
    "report-inside-savedmodel": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/sm", "--report", "{out}/sm/saved_model.pb"],
        "{out}/sm/saved_model.pb: lies inside the model output {out}/sm; name a path outside it",
    ),
    "report-folder-missing": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--report", "{out}/no/such/r.json"],
        "{out}/no/such/r.json: the output folder {out}/no/such does not exist",
    ),
    "output-is-input": (
        lambda folder, sd: _save(folder / "ckpt.h5", sd),
        ["-o", "{input}", "--overwrite"],
        "{input}: is the input {input}; refusing to replace it",
    ),
    "output-hard-link": (
        lambda folder, sd: _linked(_save(folder / "d1.pth.tar", sd), folder / "d1.h5", hard=True),
        ["-o", "{in}/d1.h5", "--overwrite"],
        "{in}/d1.h5: is the input {input}; refusing to replace it",
    ),
    "output-through-dotdot": (
        lambda folder, sd: _save(folder / "ckpt.h5", sd),
        ["-o", "{out}/../in/ckpt.h5", "--overwrite"],
        "{out}/../in/ckpt.h5: is the input {input}; refusing to replace it",
    ),
    "output-symlink": (
        lambda folder, sd: _linked(_save(folder / "d1.pth.tar", sd), folder / "d1.h5"),
        ["-o", "{in}/d1.h5", "--overwrite"],
        "{in}/d1.h5: is a symbolic link (to {input}); volo-convert writes only to real "
        "paths, so name the target itself",
    ),
    "savedmodel-symlink": (
        lambda folder, sd: _with_savedmodel_link(_save(folder / "d1.pth.tar", sd)),
        ["-o", "{in}/link_savedmodel", "--overwrite"],
        "{in}/link_savedmodel: is a symbolic link (to {in}/real_savedmodel); volo-convert "
        "writes only to real paths, so name the target itself",
    ),
    "output-fifo": (
        lambda folder, sd: _with_fifo(_save(folder / "d1.pth.tar", sd), folder / "pipe.h5"),
        ["-o", "{in}/pipe.h5", "--overwrite"],
        "{in}/pipe.h5: is a FIFO (named pipe), not a regular file; not replacing it",
    ),
    "output-name-too-long": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["-o", "{out}/" + "x" * 300 + ".h5"],
        "{out}/" + "x" * 300 + ".h5: the name is 303 bytes, more than the 255 this file "
        "system allows",
    ),
    "format-mismatch": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--format", "h5", "-o", "{out}/model.tflite"],
        "{out}/model.tflite: --format h5 does not match the extension .tflite, which names a "
        "tflite file",
    ),
    "checkpoint-fifo": (
        lambda folder, sd: _with_fifo(folder, folder / "d1.pth.tar"),
        [],
        "{input}: is a FIFO (named pipe), expected a checkpoint file; refusing to read it",
    ),
    "checkpoint-device": (
        lambda folder, sd: Path("/dev/zero"),
        [],
        "{input}: is a character device, expected a checkpoint file; refusing to read it",
    ),
    "not-a-state-dict": (
        lambda folder, sd: _save(folder / "d1.pth.tar", [sd]),
        [],
        "{input}: expected a state dict (tensor name -> tensor), got list",
    ),
    "non-tensor-entry": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar", with_change(sd, lambda c: c.update({"note": "hello"}))
        ),
        [],
        "{input}: expected a state dict of named tensors, found entry 'note' of type str",
    ),
    "non-string-key": (
        lambda folder, sd: _save(folder / "d1.pth.tar", dict(enumerate(sd.values()))),
        [],
        "{input}: expected a state dict of named tensors, found a key of type int (0)",
    ),
    "zip-method-unsupported": (
        lambda folder, sd: _rezipped(_save(folder / "d1.pth.tar", sd), zipfile.ZIP_BZIP2),
        [],
        "{input}: record 'd1.pth/data.pkl' is compressed with zip method 12, which torch "
        "cannot read; torch.save stores its records uncompressed",
    ),
    "duplicate-names": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"module.head.weight": c["head.weight"]})),
        ),
        [],
        "{input}: two tensors name the same weight: 'head.weight' and 'module.head.weight'",
    ),
    "complex-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"norm.weight": c["norm.weight"].cfloat()})),
        ),
        [],
        "{input}: norm.weight is complex (torch.complex64)",
    ),
    "sparse-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"head.weight": c["head.weight"].to_sparse()})),
        ),
        [],
        "{input}: head.weight is not dense (layout torch.sparse_coo)",
    ),
    "meta-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"norm.bias": torch.empty(32, device="meta")})),
        ),
        [],
        "{input}: norm.bias holds no data (a meta tensor)",
    ),
    "quantized-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(
                sd,
                lambda c: c.update(
                    {"head.bias": torch.quantize_per_tensor(c["head.bias"], 0.1, 0, torch.qint8)}
                ),
            ),
        ),
        [],
        "{input}: head.bias is quantized (torch.qint8)",
    ),
    "integer-weights": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"head.weight": c["head.weight"].long()})),
        ),
        [],
        "{input}: head.weight has dtype torch.int64, expected floating-point weights",
    ),
    "scalar-for-matrix": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"head.weight": torch.tensor(1.0)})),
        ),
        [],
        "{input}: head.weight has shape (), expected 2 dimensions",
    ),
    "scalar-for-kernel": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"patch_embed.conv.3.weight": torch.tensor(1.0)})),
        ),
        [],
        "{input}: patch_embed.conv.3.weight has shape (), which conv_kernel cannot take, but "
        "stem_conv2/kernel expects (3, 3, 8, 8)",
    ),
    "code-pickle-system": (
        lambda folder, sd: _save(folder / "evil.pth", {"state_dict": sd, "x": RunsACommand()}),
        [],
        "{input}: refusing to unpickle, the file needs posix.system, which could run code when "
        "loaded; if you trust its source, pass --trust-checkpoint",
    ),
    "newline-in-name": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"evil\nError: forged": torch.ones(1)})),
        ),
        [],
        "{input}: checkpoint tensors no mapping uses: evil\\nError: forged",
    ),
    "seed-out-of-range": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--seed", str(2**64)],
        "Invalid value for '--seed': 18446744073709551616 is not in the range "
        "0<=x<=18446744073709551615.",
    ),
    "verify-images-out-of-range": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--verify-images", "1000000000"],
        "Invalid value for '--verify-images' / '--batch-size': 1000000000 is not in the range "
        "1<=x<=4096.",
    ),
    "image-size-too-large": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--image-size", str(2**40)],
        "image size must be at most 4096, got 1099511627776",
    ),
    "pos-embed-too-large": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(
                sd,
                lambda c: c.update(
                    {"pos_embed": torch.zeros(1, 257, 257, c["pos_embed"].shape[-1])}
                ),
            ),
        ),
        [],
        "{input}: image size must be at most 4096, got 4112",
    ),
    "atol-nan": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--atol", "nan"],
        "atol must be a positive, finite number, got nan",
    ),
    "bfloat16-tflite": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--compute-dtype", "bfloat16", "-o", "{out}/d1.tflite"],
        "--compute-dtype bfloat16 applies to Keras files and SavedModels, not .tflite; "
        "use --tflite-dtype for a smaller TFLite file",
    ),
    "tflite-batch-not-tflite": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--tflite-batch", "8", "-o", "{out}/d1.keras"],
        "--tflite-batch 8 applies to .tflite outputs only; other formats take any batch",
    ),
    "tflite-batch-dynamic-not-tflite": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--tflite-batch", "dynamic", "-o", "{out}/d1_savedmodel"],
        "--tflite-batch dynamic applies to .tflite outputs only; other formats take any batch",
    ),
    "tflite-batch-zero": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--tflite-batch", "0", "-o", "{out}/d1.tflite"],
        "--tflite-batch must be a whole number from 1 to 256, or dynamic, got '0'",
    ),
    "tflite-batch-too-large": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--tflite-batch", "257", "-o", "{out}/d1.tflite"],
        "--tflite-batch must be a whole number from 1 to 256, or dynamic, got '257'",
    ),
    "tflite-batch-not-a-number": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--tflite-batch", "2.5", "-o", "{out}/d1.tflite"],
        "--tflite-batch must be a whole number from 1 to 256, or dynamic, got '2.5'",
    ),
    "bfloat16-features": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--compute-dtype", "bfloat16", "--head", "features"],
        "a bfloat16 file is judged by top-1 agreement, which the features head has not; "
        "use --compute-dtype float32 for features",
    ),
    "min-top1-features": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--head", "features", "--min-top1", "0.5"],
        "--min-top1 bars top-1 agreement, which the features head has not; features are "
        "judged by --atol",
    ),
    "bfloat16-explain": (
        lambda folder, sd: _save(folder / "d1.pth.tar", sd),
        ["--compute-dtype", "bfloat16", "--explain"],
        "--explain holds every tensor to a float32 tolerance, which bfloat16 compute cannot "
        "meet; drop --explain, or use --compute-dtype float32",
    ),
}


def _linked(target: Path, link: Path, hard: bool = False) -> Path:
    """Makes `link` a hard or symbolic link to `target`; returns `target`."""
    if hard:
        os.link(target, link)
    else:
        link.symlink_to(target)
    return target


def _with_fifo(result: Path, fifo: Path) -> Path:
    os.mkfifo(fifo)
    return fifo if result == fifo.parent else result


def _with_savedmodel_link(checkpoint: Path) -> Path:
    real = checkpoint.parent / "real_savedmodel"
    real.mkdir()
    (real / "saved_model.pb").write_bytes(b"an older SavedModel")
    (checkpoint.parent / "link_savedmodel").symlink_to(real)
    return checkpoint


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path, keep_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep_bytes])
    return path


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _save_legacy(path: Path, obj: object) -> Path:
    """torch.save's pre-1.6 format: pickles in a row, no zip container (cannot be mapped)."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _rezipped(path: Path, compression: int) -> Path:
    """The zip container rewritten with every record compressed, as a zip tool might."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in records:
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gets_one_line_and_exit_2(
    case: str, release_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    if case == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    write_input, extra_args, message = ERROR_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    checkpoint = write_input(inputs, release_state_dict)
    (out_dir / "keep.h5").write_bytes(b"user data")
    before = snapshot(inputs, out_dir)
    places = {"input": checkpoint, "in": inputs, "out": out_dir}
    args = [arg.format(**places) for arg in extra_args]
    if "-o" not in args:
        args += ["-o", str(out_dir / "d1.h5")]
    result = run(checkpoint, *args)
    assert result.exit_code == 2, result.output
    assert error_line(result) == "Error: " + message.format(**places)
    assert snapshot(inputs, out_dir) == before


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run(tmp_path / "nope.pth.tar", "-o", tmp_path / "x.h5", "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, ConversionError)
    assert str(result.exception) == f"{tmp_path / 'nope.pth.tar'}: no such file"


def test_readme_lists_every_case() -> None:
    table = error_table()
    for case in [*ERROR_CASES, *ACCEPTED_FORMS]:
        assert f"`{case}`" in table, case


# Accepted forms: case id -> (writes the file, extra CLI args)
ACCEPTED_FORMS: dict[str, tuple[Callable[[Path, dict], Path], list[str]]] = {
    "release-pth-tar": (lambda folder, sd: _save(folder / "d1_32.pth.tar", sd), []),
    "training-dict": (
        lambda folder, sd: _save(
            folder / "checkpoint.pth.tar",
            {
                "epoch": 299,
                "state_dict": {f"module.{key}": tensor for key, tensor in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "args": __import__("argparse").Namespace(model="volo_d1", lr=1e-3),
            },
        ),
        [],
    ),
    "ema": (
        lambda folder, sd: _save(
            folder / "ema.pth.tar",
            {"state_dict": sd, "state_dict_ema": {key: tensor * 0.5 for key, tensor in sd.items()}},
        ),
        ["--ema"],
    ),
    "model-key": (lambda folder, sd: _save(folder / "model.pth", {"model": sd}), []),
    "safetensors": (
        lambda folder, sd: _saved_safetensors(folder / "model.safetensors", sd),
        [],
    ),
    "bin-state-dict": (lambda folder, sd: _save(folder / "pytorch_model.bin", sd), []),
    "legacy-pickle": (
        lambda folder, sd: _save_legacy(folder / "d1_legacy.pth", sd),
        [],
    ),
    "deflated-zip": (
        lambda folder, sd: _rezipped(_save(folder / "d1.pth.tar", sd), zipfile.ZIP_DEFLATED),
        [],
    ),
    "float16": (
        lambda folder, sd: _save(
            folder / "half.pth", {k: _cast(v, torch.float16) for k, v in sd.items()}
        ),
        [],
    ),
    "bfloat16": (
        lambda folder, sd: _save(
            folder / "bf16.pth", {k: _cast(v, torch.bfloat16) for k, v in sd.items()}
        ),
        [],
    ),
    "float64": (
        lambda folder, sd: _save(
            folder / "double.pth", {k: _cast(v, torch.float64) for k, v in sd.items()}
        ),
        [],
    ),
    "parameters": (
        lambda folder, sd: _save(
            folder / "keep_vars.pth",
            {k: torch.nn.Parameter(v) if v.is_floating_point() else v for k, v in sd.items()},
        ),
        [],
    ),
    "views": (
        lambda folder, sd: _save(folder / "views.pth", _views_of_one_storage(sd)),
        [],
    ),
    "fine-tuned-classes": (
        lambda folder, sd: _save(
            folder / "finetuned.pth",
            with_change(
                sd,
                lambda c: c.update(
                    {
                        "head.weight": c["head.weight"][:7].clone(),
                        "head.bias": c["head.bias"][:7].clone(),
                        "aux_head.weight": c["aux_head.weight"][:7].clone(),
                        "aux_head.bias": c["aux_head.bias"][:7].clone(),
                    }
                ),
            ),
        ),
        [],
    ),
    "trusted-pickle": (
        lambda folder, sd: _save(
            folder / "trainer.pth", {"state_dict": sd, "args": TrainingArguments()}
        ),
        ["--trust-checkpoint"],
    ),
}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _views_of_one_storage(state_dict: dict) -> dict:
    """The floating tensors as views into one shared storage, the 2-D ones column-major
    (a transposed view of their transpose): same values, other offsets and strides."""
    floats = {
        key: tensor.t().contiguous() if tensor.dim() == 2 else tensor
        for key, tensor in state_dict.items()
        if tensor.is_floating_point()
    }
    flat = torch.cat([stored.reshape(-1) for stored in floats.values()])
    views, offset = dict(state_dict), 0
    for key, stored in floats.items():
        view = flat[offset : offset + stored.numel()].view(stored.shape)
        views[key] = view.t() if view.dim() == 2 else view
        offset += stored.numel()
    return views


def _saved_safetensors(path: Path, state_dict: dict) -> Path:
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(path))
    return path


CLI_VERIFIED_FORMS = (
    "ema",
    "safetensors",
    "float16",
    "bfloat16",
    "fine-tuned-classes",
    "parameters",
    "views",
    "deflated-zip",
    "legacy-pickle",
)


@pytest.mark.parametrize("form", sorted(ACCEPTED_FORMS))
def test_accepted_form_loads_the_release_tensors(
    form: str, release_state_dict: dict, tmp_path: Path
) -> None:
    write_input, extra_args = ACCEPTED_FORMS[form]
    checkpoint = write_input(tmp_path, release_state_dict)
    loaded, sha256 = load_state_dict(
        checkpoint, ema="--ema" in extra_args, trust_checkpoint="--trust-checkpoint" in extra_args
    )
    assert sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert set(loaded) == set(release_state_dict)
    assert all(tensor.dtype in (torch.float32, torch.int64) for tensor in loaded.values())
    assert not any(tensor.requires_grad for tensor in loaded.values())
    expected = release_state_dict["network.0.0.attn.v.weight"]
    if form == "ema":
        expected = expected * 0.5
    if form in ("float16", "bfloat16"):
        expected = expected.to(getattr(torch, form)).float()
    assert torch.equal(loaded["network.0.0.attn.v.weight"], expected)


@pytest.mark.parametrize("form", CLI_VERIFIED_FORMS)
def test_accepted_form_converts_and_verifies(
    form: str, release_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    write_input, extra_args = ACCEPTED_FORMS[form]
    checkpoint = write_input(tmp_path, release_state_dict)
    report = tmp_path / "report.json"
    result = run(
        checkpoint, "-o", out_dir / "d1.keras", "--device", "cpu", "--report", report, *extra_args
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["status"] == "passed"
    assert figures["parity"]["max_abs_diff"] <= 5e-5  # float32 noise, at half the default atol
    assert figures["num_classes"] == (7 if form == "fine-tuned-classes" else 10)


def test_interrupted_save_leaves_no_partial_output(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the disk fills up after 20 weight datasets of the .h5 file."""
    real_create_dataset = h5py.Group.create_dataset
    written = []

    def failing_create_dataset(group: h5py.Group, *args: object, **kwargs: object) -> object:
        written.append(args[0] if args else kwargs.get("name"))
        if len(written) > 20:
            raise OSError(28, "No space left on device")
        return real_create_dataset(group, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create_dataset)
    output = out_dir / "d1.h5"
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert len(written) == 21  # the save really was cut off part-way
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"Error: {output}: could not write the h5 file (No space left on device)"
    )
    assert list(out_dir.iterdir()) == []


def test_keyboard_interrupt_during_save_leaves_nothing(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted_save(model: object, path: Path, *formats: object) -> None:
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "save_model", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_checkpoint, out_dir / "d1.h5")
    assert list(out_dir.iterdir()) == []


def test_failed_parity_with_overwrite_keeps_the_old_file(
    tiny_checkpoint: Path, out_dir: Path
) -> None:
    output = out_dir / "d1.h5"
    output.write_bytes(b"the user's previous model")
    result = run(tiny_checkpoint, "-o", output, "--overwrite", "--atol", "1e-12", "--device", "cpu")
    assert result.exit_code == 1
    assert re.search(r"parity failed: max abs diff \S+ exceeds atol 1e-12", error_line(result))
    assert output.read_bytes() == b"the user's previous model"
    assert [path.name for path in out_dir.iterdir()] == ["d1.h5"]


def test_first_line_and_path_prefix_keep_messages_to_one_line(tmp_path: Path) -> None:
    assert first_line(OSError("disk full\nsecond line")) == "disk full"
    assert first_line(KeyError()) == "KeyError"
    with pytest.raises(ConversionError) as raised, about(tmp_path / "d1.pth"):
        raise ConversionError("not a VOLO checkpoint")
    assert str(raised.value) == f"{tmp_path / 'd1.pth'}: not a VOLO checkpoint"


def _flip_byte_inside_largest_record(checkpoint: Path) -> str:
    """Damages one byte of tensor data, as a bad download would; returns the record name."""
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with checkpoint.open("r+b") as stream:
        stream.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", stream.read(4))
        data_start = record.header_offset + 30 + name_length + extra_length
        stream.seek(data_start + record.compress_size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    return record.filename


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_record_whose_crc_fails_is_named(
    compression: int, release_state_dict: dict, tmp_path: Path, out_dir: Path
) -> None:
    """Deflated records are checked on their inflated content, as zip's CRC-32 is."""
    checkpoint = _rezipped(_save(tmp_path / "d1.pth.tar", release_state_dict), compression)
    record = _flip_byte_inside_largest_record(checkpoint)
    result = run(checkpoint, "-o", out_dir / "d1.h5")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {checkpoint}: the checkpoint is corrupt: record {record!r} does not match the "
        "CRC-32 stored for it (a damaged or incomplete download?)"
    )
    assert list(out_dir.iterdir()) == []


def test_longest_legal_output_name_is_written(tiny_checkpoint: Path, out_dir: Path) -> None:
    """The staged file's name is short, so any name the file system takes works."""
    output = out_dir / ("x" * 252 + ".h5")
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert result.exit_code == 0, result.output
    assert [path.name for path in out_dir.iterdir()] == [output.name]


def test_empty_keras_zip_is_not_a_model(tiny_checkpoint: Path, out_dir: Path) -> None:
    model = out_dir / "empty.keras"
    zipfile.ZipFile(model, "w").close()
    before = snapshot(out_dir)
    result = run("verify", model, tiny_checkpoint)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: {model}: not a loadable Keras model (")
    assert snapshot(out_dir) == before


def test_keras_file_that_is_not_a_zip_is_named_so(tiny_checkpoint: Path, out_dir: Path) -> None:
    model = out_dir / "random.keras"
    model.write_bytes(bytes(range(256)) * 20)
    before = snapshot(out_dir)
    result = run("verify", model, tiny_checkpoint)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {model}: not a loadable Keras model (a .keras file is a zip archive, and this "
        "one is not)"
    )
    assert snapshot(out_dir) == before


@pytest.mark.large  # Keras picks its backend once per process
def test_unknown_keras_backend_is_a_usage_error(tiny_checkpoint_file: Path, out_dir: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "theano", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "volo_convert", tiny_checkpoint_file, "-o", out_dir / "d1.h5"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.splitlines()[-1] == (
        "Error: Keras cannot start: Unable to import backend : theano (check KERAS_BACKEND)"
    )
    assert list(out_dir.iterdir()) == []


def test_batch_output_folder_that_cannot_be_made(tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"not a folder")
    result = run("batch", tiny_checkpoint, "-o", blocker / "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {blocker / 'out'}: cannot create the output folder (Not a directory)"
    )
    assert blocker.read_bytes() == b"not a folder"


def test_full_disk_while_writing_a_savedmodel(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    def disk_full(module: object, path: str, signatures: object) -> None:
        Path(path, "saved_model.pb").write_bytes(b"half")
        raise tf.errors.ResourceExhaustedError(None, None, f"{path}/variables: No space left")

    monkeypatch.setattr(tf.saved_model, "save", disk_full)
    output = out_dir / "d1_savedmodel"
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: could not write the SavedModel folder ({output}/variables: "
        "No space left)"
    )
    assert list(out_dir.iterdir()) == []


def test_hdf5_disk_full_message_is_one_line_naming_the_output(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hdf5_failure(group: h5py.Group, *args: object, **kwargs: object) -> None:
        raise OSError(
            f"Unable to synchronously create dataset (file write failed: filename = "
            f"'{group.file.filename}', errno = 28)\nsecond line of HDF5's error stack"
        )

    monkeypatch.setattr(h5py.Group, "create_dataset", hdf5_failure)
    output = out_dir / "d1.h5"
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: could not write the h5 file (No space left on device)"
    )
    assert list(out_dir.iterdir()) == []


def test_failed_tflite_conversion_names_the_output(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    class RefusingConverter:
        target_spec = types.SimpleNamespace()

        def convert(self) -> bytes:
            raise RuntimeError("could not legalize op 'tf.Erf'\nwith more detail")

    monkeypatch.setattr(
        tf.lite.TFLiteConverter, "from_saved_model", lambda folder: RefusingConverter()
    )
    output = out_dir / "d1.tflite"
    result = run(tiny_checkpoint, "-o", output, "--no-verify")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {output}: TFLite conversion with builtin ops only failed: RuntimeError "
        "could not legalize op 'tf.Erf'"
    )
    assert list(out_dir.iterdir()) == []


def test_a_bug_exits_3_not_1(
    tiny_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an unexpected state")

    monkeypatch.setattr(conversion, "build_volo", broken)
    result = run(tiny_checkpoint, "-o", out_dir / "d1.h5")
    assert result.exit_code == 3
    assert error_line(result) == (
        "Error: internal error: RuntimeError: an unexpected state (rerun with --debug for the "
        "traceback, and please report it)"
    )
    assert list(out_dir.iterdir()) == []


def test_verification_batch_beyond_the_machine_memory_is_refused(
    tiny_checkpoint: Path, out_dir: Path
) -> None:
    result = run(tiny_checkpoint, "-o", out_dir / "d1.h5", "--image-size", "4096")
    assert result.exit_code == 2
    assert re.fullmatch(
        r"Error: verifying 2 images at 4096px needs about [\d,.]+ GB, but this machine has "
        r"[\d,.]+ GB available; use fewer --verify-images or a smaller --image-size",
        error_line(result),
    )
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "direction"),
    [
        (["{checkpoint}", "-o", "-"], "output"),
        (["{checkpoint}", "-o", "d1.h5", "--report", "-"], "output"),
        (["-", "-o", "d1.h5"], "input"),
        (["{checkpoint}", "-o", "d1.h5", "--images", "-"], "input"),
        (
            [
                "{checkpoint}",
                "-o",
                "q.tflite",
                "--tflite-dtype",
                "int8",
                "--calibration-images",
                "-",
            ],
            "input",
        ),
        (["verify", "{model}", "{checkpoint}", "--junit", "-"], "output"),
        (["verify", "{model}", "{checkpoint}", "--report", "-"], "output"),
        (["verify", "-", "{checkpoint}"], "input"),
        (["verify", "{model}", "-"], "input"),
        (["inspect", "-"], "input"),
        (["batch", "{checkpoint}", "-o", "-"], "output"),
        (["batch", "-", "-o", "out"], "input"),
        (["synthesize", "-", "--only", "d1_224_84.2.pth.tar"], "output"),
        (["demo", "--workdir", "-"], "output"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_a_dash_for_a_standard_stream_is_refused_by_name(
    arguments: list[str],
    direction: str,
    d1_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`-` is standard input or output in many tools; here no path means it: every path
    goes through the input or the output policy (paths.py), which refuses it by name."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "d1.keras"
    model.write_bytes(b"a model")
    monkeypatch.chdir(work)
    before = snapshot(work)
    places = {"checkpoint": d1_checkpoint, "model": model}
    result = run(*(argument.format(**places) for argument in arguments))
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: -: volo-convert does not use standard {direction}; name a file or folder "
        "(an absolute path for one called -)"
    )
    assert snapshot(work) == before
