"""The `volo-convert` command line: a thin shell over `volo_convert.convert`.

Exit codes: 0 parity passed (or not checked), 1 parity failed, 2 bad input or usage.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from volo_convert import __version__
from volo_convert.variants import HEADS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

EXIT_PARITY_FAILED = 1
EXIT_BAD_INPUT = 2
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEMO_CHECKPOINT = "d1_224_84.2.pth.tar"


class InputError(click.ClickException):
    """A user mistake: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class DefaultCommandGroup(click.Group):
    """A group that runs `convert` when the first argument names no command."""

    default_command = "convert"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turns library errors into one-line messages; `--debug` shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        from volo_convert.errors import ConversionError

        try:
            return command(*args, **kwargs)
        except ConversionError as error:
            if debug:
                raise
            raise InputError(str(error)) from None
        except (click.ClickException, click.exceptions.Exit, KeyboardInterrupt):
            raise
        except Exception as error:
            if debug:
                raise
            raise click.ClickException(
                f"internal error: {type(error).__name__}: {error} (rerun with --debug for the "
                "traceback, and please report it)"
            ) from None

    return click.option(
        "--debug", is_flag=True, help="Show the full traceback on errors (for bug reports)."
    )(wrapper)


def verification_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that checks parity."""
    options = [
        click.option(
            "--atol",
            type=click.FloatRange(min=0.0, min_open=True),
            help="Largest allowed absolute difference between the converted and PyTorch "
            "logits.  [default: 1e-4; 5e-2 for float16 TFLite]",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="Where the PyTorch reference runs (auto: a GPU when present).",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="Number of seeded test images.",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Image seed."),
        click.option(
            "--report",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write the figures as JSON to this file.",
        ),
        click.option(
            "--explain",
            is_flag=True,
            help="Compare every stage with PyTorch and name the first one out of tolerance "
            "(done anyway when parity fails).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def checkpoint_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options that say how to read a checkpoint."""
    options = [
        click.option(
            "--variant",
            type=click.Choice(["d1", "d2", "d3", "d4", "d5"]),
            help="Override the variant detected from the tensor shapes.",
        ),
        click.option(
            "--image-size",
            type=int,
            help="Input size in pixels (a multiple of 16); pos_embed is resized if it differs.",
        ),
        click.option("--ema", is_flag=True, help="Use the checkpoint's state_dict_ema."),
        click.option(
            "--trust-checkpoint",
            is_flag=True,
            help="Allow pickles that run code when loaded. Only for files you trust.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def head_option(default: str | None, help_text: str) -> Callable[..., Any]:
    """The `--head` option: which output the Keras model ends in."""
    return click.option(
        "--head",
        type=click.Choice(HEADS),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


def _print_result(result: Any) -> None:
    """Prints the figures of one conversion or verification."""
    click.echo(
        f"{result.checkpoint} -> {result.output}: VOLO {result.variant} at "
        f"{result.image_size}px, {result.num_classes} classes, {result.parameters:,} parameters, "
        f"{result.head} head"
    )
    if result.convert_seconds is not None:
        click.echo(f"converted in {result.convert_seconds:.1f}s")
    if result.parity is None:
        click.echo("not verified (--no-verify)")
        return
    parity = result.parity
    click.echo(f"max abs diff    {parity.max_abs_diff:.3g}  (atol {parity.atol:g})")
    click.echo(f"max rel diff    {parity.max_rel_diff:.3g}")
    if parity.top1_agreement is not None:
        click.echo(f"top-1 agreement {parity.top1_agreement:.0%}  ({parity.batch_size} images)")
    click.echo(
        f"verified in {result.verify_seconds:.1f}s, reference on {parity.device}, "
        f"model in {result.runtime}"
    )
    if result.diagnosis is not None:
        from volo_convert.diagnosis import format_diagnosis

        click.echo(format_diagnosis(result.diagnosis))
    click.echo("PASS" if parity.passed else "FAIL")


def _check_report_path(path: Path | None) -> None:
    """Fails before any work if the report could not be written afterwards."""
    if path is not None and not path.parent.is_dir():
        raise InputError(f"{path}: the report folder {path.parent} does not exist")


def _write_report(path: Path | None, result: Any) -> None:
    if path is None:
        return
    from volo_convert.report import write_json

    write_json(path, result.to_dict())
    click.echo(f"report written to {path}")


def _finish(result: Any, report: Path | None) -> None:
    _print_result(result)
    _write_report(report, result)
    if not result.passed:
        message = (
            f"parity failed: max abs diff {result.parity.max_abs_diff:.3g} exceeds "
            f"atol {result.parity.atol:g}"
        )
        if result.diagnosis is not None and result.diagnosis.first_failing_stage:
            message += f"; first stage out of tolerance: {result.diagnosis.first_failing_stage}"
        if result.convert_seconds is not None:
            message += f"; nothing was written at {result.output}"
        click.echo(f"Error: {message}", err=True)
        sys.exit(EXIT_PARITY_FAILED)


def _stage_printer() -> Callable[[str], None]:
    """Prints each pipeline stage to stderr as it starts."""
    return lambda stage: click.echo(f"[{stage}]", err=True)


@click.group(cls=DefaultCommandGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="volo-convert")
def cli() -> None:
    """Convert PyTorch VOLO checkpoints to Keras 3 models with the same logits.

    \b
    Example:
      volo-convert d1_224_84.2.pth.tar -o d1.h5
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --report parity.json
    """


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The file to write: .h5, .keras or .tflite, or a folder (no extension) for a SavedModel.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["h5", "keras", "savedmodel", "tflite"]),
    help="The output format, instead of the one OUTPUT's extension names.",
)
@click.option(
    "--tflite-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Weight precision of a .tflite output.",
)
@checkpoint_options
@verification_options
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@head_option(
    "full",
    "full: the published logits (class head + 0.5 x max of the aux head); cls: the class "
    "head alone; features: no head, the normalised class token (B, C) for transfer learning.",
)
@handles_errors
def convert(
    checkpoint: Path,
    output: Path,
    output_format: str | None,
    tflite_dtype: str,
    variant: str | None,
    image_size: int | None,
    ema: bool,
    trust_checkpoint: bool,
    atol: float | None,
    device: str,
    batch_size: int,
    seed: int,
    report: Path | None,
    explain: bool,
    no_verify: bool,
    overwrite: bool,
    head: str,
) -> None:
    """Convert a VOLO checkpoint to Keras, then verify it against PyTorch.

    Variant and image size are read from the tensors. The output is written under a
    temporary name, reloaded in its own runtime (Keras, TensorFlow's SavedModel loader or
    the TFLite interpreter) and moved to OUTPUT only once it is complete and verified.
    TFLite files take one image at a time and use builtin ops only.

    \b
    Example:
      volo-convert d1_224_84.2.pth.tar -o d1.h5
      volo-convert d5_512_87.07.pth.tar -o d5.keras --device cuda --report d5.json
      volo-convert d1_224_84.2.pth.tar -o d1_feat.h5 --head features --image-size 256
      volo-convert d1_224_84.2.pth.tar -o d1_savedmodel/
      volo-convert d1_224_84.2.pth.tar -o d1_fp16.tflite --tflite-dtype float16
    """
    from volo_convert.convert import ConvertOptions
    from volo_convert.convert import convert as run_convert

    options = ConvertOptions(
        variant=variant,
        image_size=image_size,
        output_format=output_format,
        tflite_dtype=tflite_dtype,
        atol=atol,
        device=device,
        verify=not no_verify,
        batch_size=batch_size,
        seed=seed,
        ema=ema,
        trust_checkpoint=trust_checkpoint,
        overwrite=overwrite,
        head=head,
        explain=explain,
    )
    _check_report_path(report)
    result = run_convert(checkpoint, output, options, on_stage=_stage_printer())
    _finish(result, report)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@checkpoint_options
@verification_options
@head_option(None, "The head MODEL must end in (default: whichever it ends in).")
@handles_errors
def verify(
    model_file: Path,
    checkpoint: Path,
    variant: str | None,
    image_size: int | None,
    ema: bool,
    trust_checkpoint: bool,
    atol: float | None,
    device: str,
    batch_size: int,
    seed: int,
    report: Path | None,
    explain: bool,
    head: str | None,
) -> None:
    """Check an existing model against its PyTorch checkpoint (for CI).

    MODEL is a .h5 or .keras file (run under the Keras backend KERAS_BACKEND names), a
    SavedModel folder or a .tflite file. Exits 0 when the logits agree within --atol, 1
    when they do not.

    \b
    Example:
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --atol 1e-4 --report parity.json
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --explain
      KERAS_BACKEND=torch volo-convert verify d1.keras d1_224_84.2.pth.tar
      volo-convert verify d1_fp16.tflite d1_224_84.2.pth.tar
    """
    from volo_convert.convert import ConvertOptions, verify_file

    options = ConvertOptions(
        variant=variant,
        image_size=image_size,
        atol=atol,
        device=device,
        batch_size=batch_size,
        seed=seed,
        ema=ema,
        trust_checkpoint=trust_checkpoint,
        head=head,
        explain=explain,
    )
    _check_report_path(report)
    result = verify_file(model_file, checkpoint, options, on_stage=_stage_printer())
    _finish(result, report)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("volo-demo"),
    show_default=True,
    help="Folder for the synthetic checkpoint and the converted model.",
)
@verification_options
@handles_errors
def demo(
    workdir: Path,
    atol: float | None,
    device: str,
    batch_size: int,
    seed: int,
    report: Path | None,
    explain: bool,
) -> None:
    """Run the whole job on a synthetic d1_224 checkpoint in the release format.

    Writes WORKDIR/d1_224_84.2.pth.tar (realistic random weights), converts it to
    WORKDIR/d1_224.h5 and verifies it.

    \b
    Example:
      volo-convert demo --workdir /tmp/volo-demo
    """
    from volo_convert.convert import ConvertOptions
    from volo_convert.convert import convert as run_convert
    from volo_convert.synthetic import write_checkpoint
    from volo_convert.variants import VARIANTS

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / DEMO_CHECKPOINT
    click.echo(f"writing synthetic checkpoint {checkpoint}", err=True)
    write_checkpoint(checkpoint, VARIANTS["d1"], 224)
    options = ConvertOptions(
        atol=atol, device=device, batch_size=batch_size, seed=seed, overwrite=True, explain=explain
    )
    result = run_convert(checkpoint, workdir / "d1_224.h5", options, on_stage=_stage_printer())
    _finish(result, report)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the Keras files and report.json / report.md (created if missing).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["h5", "keras"]),
    default="h5",
    show_default=True,
    help="Format of every output file.",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Largest allowed absolute difference between Keras and PyTorch logits.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the PyTorch reference runs (auto: a GPU when present).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Number of seeded test images per checkpoint.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Image seed.")
@click.option(
    "--force", is_flag=True, help="Convert again the files an earlier run already finished."
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow pickles that run code when loaded. Only for files you trust.",
)
@handles_errors
def batch(
    checkpoints: tuple[Path, ...],
    out_dir: Path,
    output_format: str,
    atol: float,
    device: str,
    batch_size: int,
    seed: int,
    force: bool,
    trust_checkpoint: bool,
) -> None:
    """Convert and verify many checkpoints; a folder means its checkpoint files.

    Each output is named after its input (d1_224_84.2.pth.tar -> d1_224_84.2.h5). Each
    file runs in its own process; a bad one is reported and the others go on. The
    summary table is printed and written to OUT_DIR/report.json and report.md after
    every file. A re-run skips files already converted and verified from the same
    content (SHA-256), unless --force. Exits 0 only if every checkpoint passed.

    \b
    Example:
      volo-convert synthesize checkpoints/
      volo-convert batch checkpoints/ -o keras/
      volo-convert batch d1_224_84.2.pth.tar d5_512_87.07.pth.tar -o keras/ --format keras
    """
    from tqdm import tqdm

    from volo_convert.batch import BatchOptions, find_checkpoints, run_batch
    from volo_convert.batch_report import render_text

    options = BatchOptions(
        output_format=output_format,
        atol=atol,
        device=device,
        batch_size=batch_size,
        seed=seed,
        trust_checkpoint=trust_checkpoint,
        force=force,
    )
    total = len(find_checkpoints(checkpoints))
    with tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True) as bar:

        def show_stage(checkpoint: Path, stage: str) -> None:
            bar.set_description_str(checkpoint.name, refresh=False)
            bar.set_postfix_str(stage)

        def show_entry(entry: Any) -> None:
            bar.write(f"{entry.file}: {entry.status}", file=sys.stderr)
            bar.update(1)

        report = run_batch(checkpoints, out_dir, options, on_stage=show_stage, on_entry=show_entry)
    click.echo(render_text(report), nl=False)
    if not report.passed:
        failed = sum(not entry.ok for entry in report.entries)
        click.echo(
            f"Error: {failed} of {total} checkpoints failed; see {out_dir / 'report.md'}",
            err=True,
        )
        sys.exit(EXIT_PARITY_FAILED)


@cli.command(context_settings=CONTEXT_SETTINGS)
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
@click.option("--seed", type=int, default=0, show_default=True, help="Weight seed.")
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
    from volo_convert.synthetic import corrupt_checkpoint, write_release_checkpoints
    from volo_convert.variants import RELEASE_CHECKPOINTS

    for name in (*names, *corrupt):
        if name not in RELEASE_CHECKPOINTS:
            raise InputError(
                f"unknown release checkpoint {name!r}, expected one of "
                f"{', '.join(RELEASE_CHECKPOINTS)}"
            )
    wanted = list(names) if names else None
    paths = write_release_checkpoints(
        out_dir,
        wanted,
        seed=seed,
        overwrite=overwrite,
        on_file=lambda path: click.echo(f"writing {path}", err=True),
    )
    for name in corrupt:
        corrupt_checkpoint(out_dir / name)
        click.echo(f"corrupted {out_dir / name} on purpose", err=True)
    click.echo(f"{len(paths)} checkpoints in {out_dir}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="volo-convert")
