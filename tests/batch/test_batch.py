"""Batch conversion through the CLI: the report, resume, --force and a bad file among good ones.

Every conversion runs in a spawned process (about 10 s of imports each), so the tests
share one batch run and convert as few files as they can; they are `large`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest
from helpers import SMALL_IMAGE_SIZE, error_line, run, snapshot

from volo_convert.architecture.variants import VARIANTS
from volo_convert.batch.report import BatchEntry, BatchReport, render_markdown, render_text
from volo_convert.batch.runner import find_checkpoints, output_name, output_stem
from volo_convert.errors import ConversionError
from volo_convert.options import ConvertOptions
from volo_convert.synthetic import corrupt_checkpoint, write_checkpoint, write_release_checkpoints

GOOD = "d1_32_good.pth.tar"
CORRUPT = "d1_32_corrupt.pth"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_report(out_dir: Path) -> dict[str, dict]:
    """File name -> report row."""
    document = json.loads((out_dir / "report.json").read_text())
    return {row["file"]: row for row in document["checkpoints"]}


@pytest.fixture(scope="module")
def first_batch(d1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One good and one truncated checkpoint in a folder, batch-converted once."""
    folder = tmp_path_factory.mktemp("batch_in")
    shutil.copy(d1_checkpoint, folder / GOOD)
    shutil.copy(d1_checkpoint, folder / CORRUPT)
    corrupt_checkpoint(folder / CORRUPT)
    out_dir = tmp_path_factory.mktemp("batch_out") / "keras"
    junit = out_dir.parent / "parity.xml"
    result = run("batch", folder, "-o", out_dir, "--device", "cpu", "--junit", junit)
    return folder, out_dir, result


@pytest.mark.large
def test_bad_file_is_reported_and_the_others_are_converted(first_batch: tuple) -> None:
    _, out_dir, result = first_batch
    assert result.exit_code == 1, result.output
    assert "Error: 1 of 2 checkpoints failed" in result.output
    assert "Traceback" not in result.output
    rows = read_report(out_dir)
    assert rows[GOOD]["status"] == "passed"
    assert rows[CORRUPT]["status"] == "error"
    assert rows[CORRUPT]["reason"].endswith(f"{CORRUPT}: the checkpoint is truncated or corrupt")
    assert "\n" not in rows[CORRUPT]["reason"]
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "d1_32_good.h5",
        "report.json",
        "report.md",
    ]


@pytest.mark.large
def test_junit_has_one_case_per_checkpoint(first_batch: tuple) -> None:
    _, out_dir, result = first_batch
    junit = out_dir.parent / "parity.xml"
    assert f"JUnit report written to {junit}" in result.output
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert sorted(cases) == [CORRUPT, GOOD]
    figures = cases[GOOD].find("properties/property[@name='figures']").get("value")
    assert figures.startswith("max abs diff ") and figures.endswith("top-1 agreement 100%")
    assert cases[CORRUPT].find("error").get("message") == (
        f"loading: {read_report(out_dir)[CORRUPT]['reason']}"
    )


@pytest.mark.large
def test_a_log_shows_each_file_and_stage_with_its_duration(first_batch: tuple) -> None:
    _, _, result = first_batch
    lines = result.output.splitlines()
    stages = [line.split() for line in lines if line.startswith(f"{CORRUPT}: ")]
    # A fresh run hashes each checkpoint once, in the worker, as it loads it.
    assert [words[1] for words in stages] == ["starting", "loading", "exiting", "error"]
    assert all(re.fullmatch(r"\d+\.\ds", words[2]) for words in stages[:-1])
    good = [line.split()[1] for line in lines if line.startswith(f"{GOOD}: ")]
    assert good[-3:] == ["recording", "exiting", "passed"]


@pytest.mark.large
def test_report_holds_every_figure(first_batch: tuple) -> None:
    folder, out_dir, result = first_batch
    document = json.loads((out_dir / "report.json").read_text())
    good = read_report(out_dir)[GOOD]
    assert good["output"] == "d1_32_good.h5"
    assert (good["variant"], good["image_size"], good["parameters"]) == ("d1", 32, 26_558_696)
    assert 0 < good["max_abs_diff"] <= 2e-5 and 0 < good["max_rel_diff"] < good["max_abs_diff"]
    assert good["top1_agreement"] == 1.0
    assert good["convert_seconds"] > 0 and good["verify_seconds"] > 0
    assert good["peak_rss_bytes"] > 100 * 2**20
    assert good["sha256"] == sha256_of(folder / GOOD)
    assert document["summary"]["checkpoints"] == 2 and document["summary"]["failed"] == 1
    assert document["summary"]["worst_max_abs_diff"] == good["max_abs_diff"]
    assert document["environment"]["torch"]
    markdown = (out_dir / "report.md").read_text()
    assert "| file | output | variant | size | parameters | max abs diff |" in markdown
    assert "| d1_32_good.pth.tar | d1_32_good.h5 | d1 | 32 | 26,558,696 |" in markdown
    assert "| passed |" in markdown and "| error |" in markdown
    assert "d1_32_good.pth.tar" in result.output and "2 checkpoints: 1 converted" in result.output


@pytest.mark.large
def test_rerun_skips_finished_files_and_retries_failed_ones(first_batch: tuple) -> None:
    folder, out_dir, _ = first_batch
    converted = out_dir / "d1_32_good.h5"
    written = converted.stat().st_mtime_ns
    result = run("batch", folder, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 1, result.output
    rows = read_report(out_dir)
    assert rows[GOOD]["status"] == "skipped"
    assert rows[GOOD]["max_abs_diff"] is not None  # the earlier figures are kept
    assert rows[CORRUPT]["status"] == "error"
    assert converted.stat().st_mtime_ns == written
    assert "1 skipped (already done)" in result.output


@pytest.mark.large
def test_force_or_changed_content_converts_again(first_batch: tuple, tmp_path: Path) -> None:
    folder, out_dir, _ = first_batch
    good_only = tmp_path / GOOD
    shutil.copy(folder / GOOD, good_only)
    result = run("batch", good_only, "-o", out_dir, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert read_report(out_dir)[GOOD]["status"] == "passed"

    write_checkpoint(good_only, VARIANTS["d1"], SMALL_IMAGE_SIZE, seed=8)
    result = run("batch", good_only, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    row = read_report(out_dir)[GOOD]
    assert row["status"] == "passed"
    assert row["sha256"] == sha256_of(good_only) != sha256_of(folder / GOOD)


def test_find_checkpoints_expands_folders_and_refuses_clashes(tmp_path: Path) -> None:
    for name in ("a.pth.tar", "b.safetensors", "c.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [path.name for path in find_checkpoints([tmp_path])] == [
        "a.pth.tar",
        "b.safetensors",
        "c.pth",
    ]
    (tmp_path / "a.pth").write_bytes(b"x")
    with pytest.raises(ConversionError, match="same output: a"):
        find_checkpoints([tmp_path])
    with pytest.raises(ConversionError, match="no such file or folder"):
        find_checkpoints([tmp_path / "missing.pth"])
    assert output_stem(Path("d1_224_84.2.pth.tar")) == "d1_224_84.2"


def test_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run("batch", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert f"Error: {tmp_path}: no checkpoints in this folder" in result.output


def test_tables_render_failures_with_their_reason() -> None:
    report = BatchReport(
        entries=[
            BatchEntry(file="x.pth", output="x.h5", sha256=None, status="error", reason="bad | zip")
        ]
    )
    assert "| x.pth | x.h5 | - | - | - | - | - | - | - | - | - | error | bad \\| zip |" in (
        render_markdown(report)
    )
    assert render_text(report).splitlines()[1].endswith("error   bad | zip")
    report.entries[0].reason = "x" * 500
    assert render_text(report).splitlines()[1].endswith("x" * 157 + "...")
    assert "x" * 500 in render_markdown(report)


def test_a_control_character_in_a_name_or_reason_keeps_each_row_on_one_line() -> None:
    report = BatchReport(
        entries=[
            BatchEntry(
                file="new\nline.pth", output="x.h5", sha256=None, status="error", reason="a\nb"
            )
        ]
    )
    assert render_markdown(report).splitlines()[-1] == (
        "| new\\nline.pth | x.h5 | - | - | - | - | - | - | - | - | - | error | a\\nb |"
    )
    text_lines = render_text(report).splitlines()
    assert len(text_lines) == 3  # header, the row, the summary
    assert text_lines[1].startswith("new\\nline.pth") and text_lines[1].endswith("error   a\\nb")


@pytest.mark.large
def test_synthesize_writes_release_names_and_corrupts_on_request(tmp_path: Path) -> None:
    name = "d1_224_84.2.pth.tar"
    result = run("synthesize", tmp_path, "--only", name, "--corrupt", name)
    assert result.exit_code == 0, result.output
    assert f"corrupted {tmp_path / name} on purpose" in result.output
    assert 40e6 < (tmp_path / name).stat().st_size < 60e6  # half of d1_224's 107 MB
    assert write_release_checkpoints(tmp_path, [name]) == [tmp_path / name]  # kept as it is
    result = run("synthesize", tmp_path, "--only", "d9_224.pth.tar")
    assert result.exit_code == 2
    assert "unknown release checkpoint 'd9_224.pth.tar'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--only", "d1_224_84.2.pth.tar", "--corrupt", "d5_512_87.07.pth.tar"],
            "Error: --corrupt d5_512_87.07.pth.tar: not among the files written; add --only "
            "d5_512_87.07.pth.tar",
        ),
        (
            ["--seed", "-3"],
            "Error: Invalid value for '--seed': -3 is not in the range 0<=x<=18446744073709551605.",
        ),
    ],
)
def test_synthesize_refuses_before_writing(args: list[str], message: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "synthetic"
    result = run("synthesize", out_dir, *args)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == message
    assert not out_dir.exists()


@pytest.mark.large
def test_non_regular_member_is_reported_and_the_others_go_on(
    first_batch: tuple, tmp_path: Path
) -> None:
    folder, out_dir, _ = first_batch
    members = tmp_path / "members"
    members.mkdir()
    shutil.copy(folder / GOOD, members / GOOD)
    os.mkfifo(members / "pipe.pth")
    result = run("batch", members, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 1, result.output
    rows = read_report(out_dir)
    assert rows[GOOD]["status"] in ("passed", "skipped")  # the others go on
    assert rows["pipe.pth"]["status"] == "error"
    assert rows["pipe.pth"]["reason"] == (
        f"{members / 'pipe.pth'}: is a FIFO (named pipe), expected a checkpoint file; "
        "refusing to read it"
    )


@pytest.mark.large
def test_output_changed_since_the_report_is_converted_again(first_batch: tuple) -> None:
    folder, out_dir, _ = first_batch
    converted = out_dir / "d1_32_good.h5"
    written = converted.read_bytes()
    assert read_report(out_dir)[GOOD]["output_files"] == {
        converted.name: f"{len(written)}:{hashlib.sha256(written).hexdigest()}"
    }
    converted.write_bytes(written[:1024])  # truncated after a passing run
    result = run("batch", folder / GOOD, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert read_report(out_dir)[GOOD]["status"] == "passed"
    assert converted.stat().st_size == len(written)


@pytest.mark.large
def test_damaged_report_row_means_not_done(first_batch: tuple) -> None:
    folder, out_dir, _ = first_batch
    report = out_dir / "report.json"
    document = json.loads(report.read_text())
    document["checkpoints"][0]["max_abs_diff"] = "tiny"
    report.write_text(json.dumps(document))
    result = run("batch", folder / GOOD, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert (
        f"Warning: {report}: row 1 is unreadable (field 'max_abs_diff' holds 'tiny'); its file "
        "counts as not done"
    ) in result.output.splitlines()
    assert read_report(out_dir)[GOOD]["status"] == "passed"

    report.write_text("{not json")
    result = run("batch", folder / GOOD, "-o", out_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert any(
        line.startswith(f"Warning: {report} is unreadable (") for line in result.output.splitlines()
    )


def rows_by_output(out_dir: Path) -> dict[str, dict]:
    """Output name -> report row."""
    document = json.loads((out_dir / "report.json").read_text())
    return {row["output"]: row for row in document["checkpoints"]}


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"output_format": "h5"}, "d1_224_84.2.h5"),
        ({"output_format": "keras", "compute_dtype": "bfloat16"}, "d1_224_84.2_bfloat16.keras"),
        ({"output_format": "savedmodel"}, "d1_224_84.2_savedmodel"),
        ({"output_format": "tflite"}, "d1_224_84.2.tflite"),
        ({"output_format": "tflite", "tflite_dtype": "int8"}, "d1_224_84.2_int8.tflite"),
        ({"output_format": "tflite", "tflite_batch": "dynamic"}, "d1_224_84.2_bdynamic.tflite"),
        (
            {"output_format": "tflite", "tflite_dtype": "float16", "tflite_batch": 8},
            "d1_224_84.2_float16_b8.tflite",
        ),
        (
            {"output_format": "h5", "head": "features", "input": "pixels"},
            "d1_224_84.2_features_pixels.h5",
        ),
    ],
)
def test_each_output_is_named_by_what_sets_it_apart(options: dict, name: str) -> None:
    assert output_name(Path("d1_224_84.2.pth.tar"), ConvertOptions(**options)) == name


@pytest.mark.large
def test_tflite_and_savedmodel_share_a_folder_and_resume_per_output(
    d1_checkpoint: Path, tmp_path: Path
) -> None:
    shutil.copy(d1_checkpoint, tmp_path / GOOD)
    out_dir = tmp_path / "models"
    result = run("batch", tmp_path / GOOD, "-o", out_dir, "--device", "cpu", "--format", "tflite")
    assert result.exit_code == 0, result.output
    tflite = out_dir / "d1_32_good.tflite"
    written = tflite.stat().st_mtime_ns
    args = ("batch", tmp_path / GOOD, "-o", out_dir, "--device", "cpu", "--format", "savedmodel")
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "d1_32_good.tflite",
        "d1_32_good_savedmodel",
        "report.json",
        "report.md",
    ]
    rows = rows_by_output(out_dir)
    assert (rows["d1_32_good_savedmodel"]["status"], rows["d1_32_good.tflite"]["status"]) == (
        "passed",
        "passed",
    )
    for output, row in rows.items():
        assert row["file"] == GOOD and row["sha256"] == sha256_of(tmp_path / GOOD)
        assert 0 < row["max_abs_diff"] <= 1e-4, output
    assert rows["d1_32_good.tflite"]["settings"]["format"] == "tflite"
    assert (
        "| d1_32_good.pth.tar | d1_32_good.tflite | d1 | 32 |"
        in (out_dir / "report.md").read_text()
    )

    result = run("batch", tmp_path / GOOD, "-o", out_dir, "--device", "cpu", "--format", "tflite")
    assert result.exit_code == 0, result.output
    assert "1 checkpoints: 0 converted, 1 skipped (already done)" in result.output
    assert tflite.stat().st_mtime_ns == written
    rows = rows_by_output(out_dir)
    assert rows["d1_32_good.tflite"]["status"] == "skipped"
    assert rows["d1_32_good_savedmodel"]["status"] == "passed"  # the other output's row is kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--format", "keras", "--tflite-dtype", "int8"],
            "Error: --tflite-dtype int8 applies to .tflite outputs only",
        ),
        (
            ["--format", "tflite", "--compute-dtype", "bfloat16"],
            "Error: --compute-dtype bfloat16 applies to Keras files and SavedModels, not "
            ".tflite; use --tflite-dtype for a smaller TFLite file",
        ),
        (
            ["--format", "tflite", "--calibration-images", "photos"],
            "Error: --calibration-images applies to --tflite-dtype int8 only",
        ),
    ],
)
def test_a_combination_convert_refuses_is_refused_before_any_work(
    args: list[str], message: str, d1_checkpoint: Path
) -> None:
    folder = d1_checkpoint.parent
    before = snapshot(folder)
    result = run("batch", folder, "-o", folder / "models", *args)
    assert result.exit_code == 2, result.output
    assert error_line(result) == message
    assert snapshot(folder) == before
