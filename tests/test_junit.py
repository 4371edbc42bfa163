"""JUnit XML for CI test reports: one test case per checkpoint, figures, the failing stage."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch
from helpers import TINY_CONFIG, error_line, run, snapshot

from volo_convert.architecture.keras_model import build_volo
from volo_convert.batch.report import BatchEntry
from volo_convert.checks.parity import ParityResult, compare_logits
from volo_convert.junit import entry_case, image_cases, render_junit
from volo_convert.options import Status
from volo_convert.results import ConversionResult


def test_a_verify_that_cannot_start_is_an_error_naming_its_stage(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model_file = tmp_path / "tiny.h5"
    build_volo(TINY_CONFIG, 32).save(model_file)
    state_dict = torch.load(tiny_checkpoint, weights_only=True)
    del state_dict["network.2.0.attn.qkv.weight"]
    checkpoint = tmp_path / "d1.pth.tar"
    torch.save(state_dict, checkpoint)
    junit = tmp_path / "parity.xml"

    result = run("verify", model_file, checkpoint, "--junit", junit)
    assert result.exit_code == 2
    message = f"{checkpoint}: tensors missing from the checkpoint: network.2.0.attn.qkv.weight"
    assert error_line(result) == f"Error: {message}"
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "1")
    (case,) = suite.iter("testcase")
    assert case.get("name") == f"d1.pth.tar -> {model_file}"
    error = case.find("error")
    assert (error.get("message"), error.get("type")) == (f"loading: {message}", "ConversionError")
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == ["d1.pth.tar", "parity.xml", "tiny.h5"]


def test_junit_may_not_be_another_output_of_the_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Each would replace the other: the JSON report, or the batch's own files."""
    model_file = tmp_path / "d1.h5"
    assert run(tiny_checkpoint, "-o", model_file, "--no-verify").exit_code == 0
    out_dir = tmp_path / "keras"
    out_dir.mkdir()
    cases = [
        (
            ["verify", model_file, tiny_checkpoint, "--report", tmp_path / "r.json"],
            tmp_path / "r.json",
            "is also the report",
        ),
        (
            ["batch", tiny_checkpoint, "-o", out_dir],
            out_dir / "report.json",
            "is also the batch report",
        ),
        (
            ["batch", tiny_checkpoint, "-o", out_dir],
            out_dir / f"{tiny_checkpoint.name.removesuffix('.pth.tar')}.h5",
            f"is also the output of {tiny_checkpoint.name}",
        ),
    ]
    for args, junit, what in cases:
        before = snapshot(tmp_path)
        result = run(*args, "--junit", junit)
        assert result.exit_code == 2, result.output
        assert error_line(result) == f"Error: {junit}: {what}; name another file"
        assert snapshot(tmp_path) == before


def test_batch_rows_become_cases_with_their_figures_or_stage() -> None:
    entries = [
        BatchEntry("a.pth", "a.h5", "0" * 64, Status.PASSED, max_abs_diff=8e-6,
                   top1_agreement=1.0, convert_seconds=3.0, verify_seconds=9.5),
        BatchEntry("b.pth", "b.h5", "1" * 64, Status.SKIPPED, max_abs_diff=9e-6,
                   top1_agreement=1.0),
        BatchEntry("c.pth", "c.h5", "2" * 64, Status.FAILED, max_abs_diff=13.0,
                   reason="parity failed: max abs diff 13 exceeds atol 0.0001; first stage out "
                   "of tolerance: stack1", stage="diagnosing"),
        BatchEntry("d.pth", "d.h5", None, Status.ERROR, stage="loading",
                   reason="d.pth: the checkpoint is truncated or corrupt"),
    ]  # fmt: skip
    root = ElementTree.fromstring(render_junit("batch", [entry_case(e) for e in entries]))
    suite = root.find("testsuite")
    assert suite.get("name") == "volo-convert batch"
    counts = [suite.get(name) for name in ("tests", "failures", "errors", "skipped")]
    assert counts == ["4", "1", "1", "1"]
    assert float(suite.get("time")) == 12.5
    passed, skipped, failed, error = suite.iter("testcase")
    assert [case.get("name") for case in (passed, skipped, failed, error)] == [
        "a.pth",
        "b.pth",
        "c.pth",
        "d.pth",
    ]
    figures = passed.find("properties/property").get("value")
    assert figures == "max abs diff 8e-06, top-1 agreement 100%"
    assert skipped.find("skipped").get("message") == (
        "done by an earlier run from the same SHA-256 (max abs diff 9e-06, top-1 agreement 100%)"
    )
    assert failed.find("failure").get("message") == (
        "verifying: parity failed: max abs diff 13 exceeds atol 0.0001; first stage out of "
        "tolerance: stack1"
    )
    assert error.find("error").get("message") == (
        "loading: d.pth: the checkpoint is truncated or corrupt"
    )


def _verified(parity: ParityResult) -> ConversionResult:
    return ConversionResult(
        "d1.pth.tar", "d1.tflite", "d1", 224, 3, 10, verify_seconds=2.0, parity=parity,
        runtime="LiteRT",
    )  # fmt: skip


def test_image_cases_fail_only_the_images_that_failed_the_run() -> None:
    torch_logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 3.0]], np.float32)
    model_logits = torch_logits + np.array([[0, 0, 0], [0, 0, 0.2], [0, 0, 0]], np.float32)
    names = ["photos/a.jpg", "photos/b.jpg", "photos/c.png"]
    for min_top1, failed in [(0.5, []), (0.9, ["photos/b.jpg"])]:
        parity = compare_logits(
            model_logits, torch_logits, None, "cpu", min_top1=min_top1, names=names, photos=True
        )
        cases = image_cases(_verified(parity))
        assert [case.name for case in cases] == [f"d1.pth.tar -> d1.tflite [{n}]" for n in names]
        assert [case.name[-13:-1] for case in cases if case.status == Status.FAILED] == failed
        root = ElementTree.fromstring(render_junit("verify", cases))
        assert root.find("testsuite").get("failures") == str(len(failed))
        (b_case,) = [case for case in cases if "b.jpg" in case.name]
        figures = "top-1 2, PyTorch 1 (margin 0.1), max abs diff 0.2"
        assert b_case.message == (f"verifying: {figures}" if failed else figures)
    over_atol = compare_logits(model_logits, torch_logits, 1e-4, "cpu", names=names)
    assert [case.status for case in image_cases(_verified(over_atol))] == [
        Status.PASSED, Status.FAILED, Status.PASSED
    ]  # fmt: skip
    assert image_cases(_verified(over_atol))[1].message.endswith("(atol 0.0001)")


def test_junit_per_image_needs_junit(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = run("verify", tmp_path / "d1.h5", tmp_path / "d1.pth.tar", "--junit-per-image")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: --junit-per-image adds cases to the --junit file; give --junit too"
    )
    assert snapshot(tmp_path) == before
