"""The options are checked once, when built: every choice, bound and combination."""

from __future__ import annotations

import pytest

from volo_convert.errors import ConversionError
from volo_convert.options import (
    DEFAULT_ATOL,
    FLOAT16_ATOL,
    MANY_VERIFY_IMAGES,
    BatchOptions,
    ConvertOptions,
    Status,
    default_atol,
    default_min_top1,
    default_verify_images,
    file_precision,
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 100}, "image size must be a positive multiple of 16, got 100"),
        ({"image_size": 0}, "image size must be a positive multiple of 16, got 0"),
        ({"output_format": "onnx"}, "unknown format 'onnx', expected one of h5, keras"),
        ({"tflite_dtype": "int4"}, "unknown TFLite dtype 'int4', expected one of float32"),
        ({"device": "tpu"}, "unknown device 'tpu', expected one of auto, cpu, cuda"),
        ({"head": "logits"}, "unknown head 'logits', expected one of full, cls, features"),
        ({"image_size": 2**40}, "image size must be at most 4096, got 1099511627776"),
        ({"atol": 0.0}, "atol must be a positive, finite number, got 0.0"),
        ({"atol": float("nan")}, "atol must be a positive, finite number, got nan"),
        ({"atol": float("inf")}, "atol must be a positive, finite number, got inf"),
        ({"verify_images": 0}, "--verify-images must be between 1 and 4096, got 0"),
        ({"verify_images": 10**9}, "--verify-images must be between 1 and 4096, got 1000000000"),
        ({"seed": 2**64}, "seed must be between 0 and 2**64 - 1, got 18446744073709551616"),
        ({"seed": -1}, "seed must be between 0 and 2**64 - 1, got -1"),
        (
            {"explain": True, "verify": False},
            "--explain compares with PyTorch, so it needs verification",
        ),
        (
            {"training": True, "verify": False},
            "--training compares with PyTorch, so it needs verification",
        ),
        ({"drop_path_rate": 1.0}, "drop path rate must be at least 0 and below 1, got 1.0"),
        ({"drop_rate": -0.1}, "drop rate must be at least 0 and below 1, got -0.1"),
        ({"compute_dtype": "float16"}, "unknown compute dtype 'float16', expected one of"),
        (
            {"compute_dtype": "bfloat16", "training": True},
            "--training holds every tensor to a float32 tolerance, which bfloat16 compute",
        ),
    ],
)
def test_bad_options_are_refused_when_built(fields: dict, message: str) -> None:
    with pytest.raises(ConversionError) as raised:
        ConvertOptions(**fields)
    assert str(raised.value).startswith(message)


def test_defaults_are_valid_and_name_the_conversion_head() -> None:
    options = ConvertOptions()
    assert options.output_head == "full"
    assert ConvertOptions(head="features").output_head == "features"
    assert (default_atol("float32"), default_atol("float16")) == (DEFAULT_ATOL, FLOAT16_ATOL)


def test_bfloat16_is_judged_like_a_quantized_file() -> None:
    assert default_atol("bfloat16") is None
    assert default_min_top1("bfloat16") == 0.9
    assert default_verify_images("bfloat16") == MANY_VERIFY_IMAGES
    assert file_precision("float32", "bfloat16") == "bfloat16"
    assert file_precision("int8", "float32") == "int8"
    assert ConvertOptions().output_compute_dtype == "float32"


def test_batch_writes_every_format_and_refuses_options_its_format_cannot_take() -> None:
    assert BatchOptions().convert.output_format == "h5"
    assert BatchOptions(ConvertOptions(output_format="tflite")).convert.output_format == "tflite"
    with pytest.raises(ConversionError, match="unknown batch format ''"):
        BatchOptions(ConvertOptions())
    with pytest.raises(ConversionError, match=r"--tflite-dtype int8 applies to \.tflite outputs"):
        ConvertOptions(output_format="savedmodel", tflite_dtype="int8")
    with pytest.raises(ConversionError, match="--compute-dtype bfloat16 applies to Keras"):
        ConvertOptions(output_format="tflite", compute_dtype="bfloat16")


def test_statuses_read_as_the_reports_spell_them() -> None:
    assert [str(status) for status in Status] == [
        "passed",
        "failed",
        "unverified",
        "skipped",
        "error",
    ]
