"""The commands for many files: `batch` converts and verifies them, `synthesize` writes
the release checkpoints to try it on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from volo_convert.architecture.variants import RELEASE_CHECKPOINTS
from volo_convert.cli.parameters import (
    CONTEXT_SETTINGS,
    CONVERT_HEAD,
    JUNIT,
    TRUST_CHECKPOINT,
    check_junit_path,
    handles_errors,
    output_options,
    start_keras,
    verification_options,
)
from volo_convert.cli.progress import StageDisplay
from volo_convert.errors import ConversionError, one_line
from volo_convert.options import (
    DEFAULT_SEED,
    EXIT_PARITY_FAILED,
    FORMATS,
    MAX_SEED,
    BatchOptions,
    ConvertOptions,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the models and report.json / report.md (created if missing).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default=FORMATS[0],
    show_default=True,
    help="Format of every output (savedmodel: a folder per checkpoint).",
)
@output_options
@CONVERT_HEAD
@verification_options
@TRUST_CHECKPOINT
@JUNIT
@click.option(
    "--force", is_flag=True, help="Convert again the files an earlier run already finished."
)
@handles_errors
def batch(
    checkpoints: tuple[Path, ...], out_dir: Path, force: bool, junit: Path | None, **fields: Any
) -> None:
    """Convert and verify many checkpoints; a folder means its checkpoint files and
    hub folders (subfolders holding config.json), and a hub folder itself.

    Each output is named after its input and what sets it apart, so several formats of
    one checkpoint can share a folder: d1_224_84.2.pth.tar -> d1_224_84.2.h5,
    d1_224_84.2.keras, d1_224_84.2_savedmodel/, d1_224_84.2.tflite,
    d1_224_84.2_int8.tflite (a non-float32 --tflite-dtype), d1_224_84.2_b8.tflite
    (--tflite-batch 8), d1_224_84.2_bfloat16.keras, d1_224_84.2_features.h5 (--head),
    d1_224_84.2_pixels.tflite (--input). Each file runs in its own process; a bad one is
    reported and the others go on. The summary table, one row per output, is printed and
    written to OUT_DIR/report.json and report.md after every file (rows of other outputs
    an earlier run left there are kept). A re-run skips an output already converted and
    verified from the same content (SHA-256) with the same options, unless --force.
    Exits 0 only if every checkpoint passed.

    \b
    Example:
      volo-convert synthesize checkpoints/
      volo-convert batch checkpoints/ -o models/
      volo-convert batch checkpoints/ -o models/ --junit parity.xml
      volo-convert batch checkpoints/ -o models/ --format tflite --tflite-dtype int8 \\
          --calibration-images photos/
      volo-convert batch checkpoints/ -o models/ --format savedmodel
      volo-convert batch d1_224_84.2.pth.tar d5_512_87.07.pth.tar -o models/ --format keras
    """
    start_keras()
    from volo_convert.batch.report import REPORT_MD, render_text
    from volo_convert.batch.runner import batch_outputs, find_checkpoints, run_batch
    from volo_convert.junit import entry_case, write_junit

    options = BatchOptions(ConvertOptions(overwrite=True, **fields), force=force)
    found = find_checkpoints(checkpoints)
    outputs = batch_outputs(found, out_dir, options.convert)
    check_junit_path(junit, found, options.convert.overwrite, others=outputs)
    with StageDisplay() as display:

        def show_stage(checkpoint: Path, stage: str) -> None:
            if display.label != f"{checkpoint.name}: ":
                display.finish()
                display.label = f"{checkpoint.name}: "
                display.counter = f"file {found.index(checkpoint) + 1} of {len(found)}"
            display(stage)

        def show_entry(entry: Any) -> None:
            display.finish()
            display.write(f"{entry.file}: {entry.status}")

        report = run_batch(
            found,
            out_dir,
            options,
            on_stage=show_stage,
            on_entry=show_entry,
            on_warning=display.warn,
        )
    click.echo(render_text(report), nl=False)
    if junit is not None:
        write_junit(junit, "batch", [entry_case(entry) for entry in report.entries])
        click.echo(one_line(f"JUnit report written to {junit}"))
    if not report.passed:
        failed = sum(not entry.ok for entry in report.entries)
        click.echo(
            f"Error: {failed} of {len(found)} checkpoints failed; see {out_dir / REPORT_MD}",
            err=True,
        )
        sys.exit(EXIT_PARITY_FAILED)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--only",
    "names",
    multiple=True,
    help="Write only this release file name (repeatable); all eleven by default.",
)
@click.option(
    "--corrupt",
    multiple=True,
    help="Cut this file to half its length afterwards (repeatable), to see a failure.",
)
@click.option(
    "--seed",
    # each further file takes the next seed, and every one must be a valid torch seed
    type=click.IntRange(min=0, max=MAX_SEED - len(RELEASE_CHECKPOINTS) + 1),
    default=DEFAULT_SEED,
    show_default=True,
    help="Weight seed of the first file; each further file takes the next one.",
)
@click.option("--overwrite", is_flag=True, help="Rewrite files that exist.")
@handles_errors
def synthesize(
    out_dir: Path, names: tuple[str, ...], corrupt: tuple[str, ...], seed: int, overwrite: bool
) -> None:
    """Write synthetic checkpoints under the eleven release names, for offline runs.

    Weights are random but realistic, in the release format (a bare state dict), so
    the whole batch can run without downloads. Files that exist are kept unless
    --overwrite. All eleven take about 6.5 GB.

    \b
    Example:
      volo-convert synthesize checkpoints/ --corrupt d3_224_85.4.pth.tar
      volo-convert synthesize checkpoints/ --only d1_224_84.2.pth.tar
    """
    from volo_convert.synthetic import (
        check_release_name,
        corrupt_checkpoint,
        write_release_checkpoints,
    )

    written = names or tuple(RELEASE_CHECKPOINTS)
    for name in corrupt:
        check_release_name(name)
        if name not in written:
            raise ConversionError(
                f"--corrupt {name}: not among the files written; add --only {name}"
            )
    paths = write_release_checkpoints(
        out_dir,
        list(names) if names else None,
        seed=seed,
        overwrite=overwrite,
        on_file=lambda path: click.echo(f"writing {path}", err=True),
    )
    for name in corrupt:
        corrupt_checkpoint(out_dir / name)
        click.echo(f"corrupted {out_dir / name} on purpose", err=True)
    click.echo(f"{len(paths)} checkpoints in {out_dir}")
