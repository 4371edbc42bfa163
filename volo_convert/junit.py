"""Parity checks as JUnit XML, the test-report format GitLab, Jenkins and GitHub display.

One test case per checkpoint: its figures in the message, and on failure the stage that
failed. A parity failure is a `failure`, a file that could not be checked an `error`, a
batch file done by an earlier run `skipped`. A verification may add one case per image
(`image_cases`).
"""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from volo_convert.batch.report import BatchEntry
from volo_convert.checks.parity import ImageParity, ParityResult
from volo_convert.options import Status
from volo_convert.paths import write_text
from volo_convert.results import ConversionResult

SUITE_PREFIX = "volo-convert"
PARITY_STAGE = "verifying"
# Status -> the JUnit element that marks it, and that element's `type`; a pass has none.
OUTCOME_ELEMENTS = {
    Status.FAILED: ("failure", "ParityFailed"),
    Status.ERROR: ("error", "ConversionError"),
    Status.SKIPPED: ("skipped", ""),
}


@dataclasses.dataclass(frozen=True)
class TestCase:
    """One checkpoint's check, as a CI system shows it.

    `message` is one line: the figures, or why and where it failed. `details` is the
    longer text (the printed summary) shown beside it.
    """

    name: str
    status: Status
    seconds: float
    message: str
    details: str = ""


def _figures(
    max_abs_diff: float | None, atol: float | None, top1: float | None, images: int | None
) -> str:
    """`max abs diff 7.87e-06 (atol 0.0001), top-1 agreement 100% (2 images)`."""
    figures = f"max abs diff {max_abs_diff:.3g}"
    if atol is not None:
        figures += f" (atol {atol:g})"
    if top1 is not None:
        figures += f", top-1 agreement {top1:.0%}"
        if images is not None:
            figures += f" ({images} images)"
    return figures


def _check_name(result: ConversionResult) -> str:
    """`d1_224_84.2.pth.tar -> d1.h5`: the checkpoint's name and the model as given."""
    return f"{Path(result.checkpoint).name} -> {result.output}"


def result_case(result: ConversionResult) -> TestCase:
    """The test case of a verification that ran to its verdict."""
    name = _check_name(result)
    seconds = (result.convert_seconds or 0.0) + (result.verify_seconds or 0.0)
    details = "\n".join([*(f"Warning: {warning}" for warning in result.warnings), str(result)])
    parity = result.parity
    if parity is None:
        return TestCase(name, Status.SKIPPED, seconds, "not verified (--no-verify)", details)
    figures = _figures(parity.max_abs_diff, parity.atol, parity.top1_agreement, parity.batch_size)
    if result.passed:
        return TestCase(name, Status.PASSED, seconds, figures, details)
    return TestCase(
        name, Status.FAILED, seconds, f"{PARITY_STAGE}: {result.failure_reason}", details
    )


def _misses_the_bar(image: ImageParity, parity: ParityResult) -> bool:
    """Whether `image` is one that failed `parity`: over atol, not finite, or, for a file
    judged by top-1 agreement, of another top class."""
    over_atol = parity.atol is not None and not image.max_abs_diff <= parity.atol
    other_class = parity.min_top1 is not None and image.agrees is False
    return over_atol or not math.isfinite(image.max_abs_diff) or other_class


def image_cases(result: ConversionResult) -> list[TestCase]:
    """One test case per verification image, named `<checkpoint's case> [<image>]`.

    An image fails only when the verification failed and it is one of the images that
    missed the bar, so the suite fails exactly when the run does: a top-1 difference that
    the file's --min-top1 allows is shown in the passing case's figures.
    """
    parity = result.parity
    if parity is None:
        return []
    cases = []
    for image in parity.per_image:
        name = f"{_check_name(result)} [{image.image}]"
        if not parity.passed and _misses_the_bar(image, parity):
            atol = f" (atol {parity.atol:g})" if parity.atol is not None else ""
            message = f"{PARITY_STAGE}: {image.figures()}{atol}"
            cases.append(TestCase(name, Status.FAILED, 0.0, message))
        else:
            cases.append(TestCase(name, Status.PASSED, 0.0, image.figures()))
    return cases


def error_case(name: str, stage: str | None, seconds: float, reason: str) -> TestCase:
    """The test case of a check that stopped with an error in `stage`."""
    return TestCase(name, Status.ERROR, seconds, f"{stage or 'starting'}: {reason}")


def entry_case(entry: BatchEntry) -> TestCase:
    """The test case of one batch row."""
    seconds = (entry.convert_seconds or 0.0) + (entry.verify_seconds or 0.0)
    figures = (
        "-"
        if entry.max_abs_diff is None
        else _figures(entry.max_abs_diff, None, entry.top1_agreement, None)
    )
    if entry.status == Status.SKIPPED:
        message = f"done by an earlier run from the same SHA-256 ({figures})"
        return TestCase(entry.file, Status.SKIPPED, 0.0, message)
    if entry.status == Status.PASSED:
        return TestCase(entry.file, Status.PASSED, seconds, figures)
    if entry.status == Status.FAILED:
        return TestCase(entry.file, Status.FAILED, seconds, f"{PARITY_STAGE}: {entry.reason}")
    return error_case(entry.file, entry.stage, seconds, entry.reason or "unknown error")


def render_junit(command: str, cases: list[TestCase]) -> str:
    """The cases as a JUnit XML document with one test suite named after `command`."""
    suite_name = f"{SUITE_PREFIX} {command}"
    totals = {
        "tests": str(len(cases)),
        "failures": str(sum(case.status == Status.FAILED for case in cases)),
        "errors": str(sum(case.status == Status.ERROR for case in cases)),
        "skipped": str(sum(case.status == Status.SKIPPED for case in cases)),
        "time": f"{sum(case.seconds for case in cases):.3f}",
    }
    root = ElementTree.Element("testsuites", {"name": SUITE_PREFIX, **totals})
    suite = ElementTree.SubElement(root, "testsuite", {"name": suite_name, **totals})
    for case in cases:
        element = ElementTree.SubElement(
            suite,
            "testcase",
            {
                "classname": suite_name.replace(" ", "."),
                "name": case.name,
                "time": f"{case.seconds:.3f}",
            },
        )
        if case.status in OUTCOME_ELEMENTS:
            tag, kind = OUTCOME_ELEMENTS[case.status]
            outcome = ElementTree.SubElement(element, tag, {"message": case.message})
            if kind:
                outcome.set("type", kind)
        else:
            properties = ElementTree.SubElement(element, "properties")
            figures = {"name": "figures", "value": case.message}
            ElementTree.SubElement(properties, "property", figures)
        if case.details:
            ElementTree.SubElement(element, "system-out").text = case.details
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: str | Path, command: str, cases: list[TestCase]) -> None:
    """Writes the cases as JUnit XML to `path`, atomically."""
    write_text(path, render_junit(command, cases))
