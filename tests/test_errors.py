"""Every accepted checkpoint form and every bad input (README: "Inputs and errors").

Error cases check the exit code, the one-line message and that nothing was left in the
output folder; accepted forms are converted and verified.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
import torch
from conftest import error_line, run
from safetensors.torch import save_file

from volo_convert import pipeline
from volo_convert.errors import ConversionError, about, first_line
from volo_convert.weights.checkpoint import load_state_dict

README = Path(__file__).resolve().parent.parent / "README.md"


class TrainingArguments:
    """A custom class inside a checkpoint: unpickling it needs this module's code."""

    def __init__(self) -> None:
        self.lr = 1e-3


@pytest.fixture(scope="module")
def release_state_dict(d1_checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(d1_checkpoint, weights_only=True)


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
        "{input}: is a folder, expected a checkpoint file",
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
            folder / "d1.pth.tar", with_change(sd, lambda c: c.pop("network.2.1.attn.qkv.weight"))
        ),
        [],
        "{input}: tensors missing from the checkpoint: network.2.1.attn.qkv.weight",
    ),
    "extra-tensor": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"head_dist.weight": torch.ones(1000, 384)})),
        ),
        [],
        "{input}: checkpoint tensors no mapping uses: head_dist.weight",
    ),
    "wrong-shape": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(
                sd, lambda c: c.update({"network.0.1.attn.v.weight": torch.ones(192, 190)})
            ),
        ),
        [],
        "{input}: network.0.1.attn.v.weight has shape (192, 190), which after dense_kernel is "
        "(190, 192), but stack0_block1_attn_v/kernel expects (192, 192)",
    ),
    "nan-weights": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(sd, lambda c: c.update({"norm.bias": torch.full((384,), float("nan"))})),
        ),
        [],
        "{input}: weights hold NaN or Inf values in norm.bias",
    ),
    "inf-weights": (
        lambda folder, sd: _save(
            folder / "d1.pth.tar",
            with_change(
                sd, lambda c: c.update({"cls_token": torch.full((1, 1, 384), float("inf"))})
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
}


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path, keep_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep_bytes])
    return path


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
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
    args = [arg.format(out=out_dir) for arg in extra_args]
    if "-o" not in args:
        args += ["-o", str(out_dir / "d1.h5")]
    result = run(checkpoint, *args)
    assert result.exit_code == 2, result.output
    assert error_line(result) == "Error: " + message.format(input=checkpoint, out=out_dir)
    assert sorted(path.name for path in out_dir.iterdir()) == ["keep.h5"]
    assert (out_dir / "keep.h5").read_bytes() == b"user data"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run(tmp_path / "nope.pth.tar", "-o", tmp_path / "x.h5", "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, ConversionError)
    assert str(result.exception) == f"{tmp_path / 'nope.pth.tar'}: no such file"


def test_readme_lists_every_case() -> None:
    readme = README.read_text()
    table = readme[readme.index("## Inputs and errors") :]
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
    "fine-tuned-classes": (
        lambda folder, sd: _save(
            folder / "finetuned.pth",
            with_change(
                sd,
                lambda c: c.update(
                    {
                        "head.weight": c["head.weight"][:37].clone(),
                        "head.bias": c["head.bias"][:37].clone(),
                        "aux_head.weight": c["aux_head.weight"][:37].clone(),
                        "aux_head.bias": c["aux_head.bias"][:37].clone(),
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


def _saved_safetensors(path: Path, state_dict: dict) -> Path:
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(path))
    return path


CLI_VERIFIED_FORMS = ("ema", "safetensors", "float16", "bfloat16", "fine-tuned-classes")


@pytest.mark.parametrize("form", sorted(ACCEPTED_FORMS))
def test_accepted_form_loads_the_release_tensors(
    form: str, release_state_dict: dict, tmp_path: Path
) -> None:
    write_input, extra_args = ACCEPTED_FORMS[form]
    checkpoint = write_input(tmp_path, release_state_dict)
    loaded = load_state_dict(
        checkpoint, ema="--ema" in extra_args, trust_checkpoint="--trust-checkpoint" in extra_args
    )
    assert set(loaded) == set(release_state_dict)
    assert all(tensor.dtype in (torch.float32, torch.int64) for tensor in loaded.values())
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
    assert figures["parity"]["max_abs_diff"] <= 2e-5
    assert figures["num_classes"] == (37 if form == "fine-tuned-classes" else 1000)


def test_interrupted_save_leaves_no_partial_output(
    d1_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
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
    result = run(d1_checkpoint, "-o", output, "--no-verify")
    assert len(written) == 21  # the save really was cut off part-way
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"Error: {output}: could not write the h5 file (No space left on device)"
    )
    assert list(out_dir.iterdir()) == []


def test_keyboard_interrupt_during_save_leaves_nothing(
    d1_checkpoint: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted_save(model: object, path: Path, fmt: str, tflite_dtype: str) -> None:
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_model", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(d1_checkpoint, out_dir / "d1.h5")
    assert list(out_dir.iterdir()) == []


def test_failed_parity_with_overwrite_keeps_the_old_file(
    d1_checkpoint: Path, out_dir: Path
) -> None:
    output = out_dir / "d1.h5"
    output.write_bytes(b"the user's previous model")
    result = run(d1_checkpoint, "-o", output, "--overwrite", "--atol", "1e-12", "--device", "cpu")
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
