"""The `volo-convert` commands: parse, build the options, call the library, print.

This module holds the group and the one-file commands (convert, verify, inspect, predict,
demo); `batch_commands.py` the many-file ones. Exit codes: `EXIT_CODES_HELP` (options.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from volo_convert import __version__
from volo_convert.cli.batch_commands import batch, synthesize
from volo_convert.cli.parameters import (
    CONTEXT_SETTINGS,
    CONVERT_HEAD,
    DROP_PATH_RATE,
    DROP_RATE,
    EXPLAIN,
    JUNIT,
    JUNIT_PER_IMAGE,
    MODEL_COMPUTE_DTYPE,
    MODEL_INPUT,
    OVERWRITE,
    REPORT,
    TRAINING,
    DefaultCommandGroup,
    check_junit_path,
    checkpoint_options,
    float32_verification_options,
    handles_errors,
    head_option,
    output_options,
    start_keras,
    verification_options,
)
from volo_convert.cli.progress import StageDisplay
from volo_convert.errors import ConversionError, first_line, one_line
from volo_convert.options import (
    DEFAULT_TOP_K,
    EXIT_CODES_HELP,
    EXIT_PARITY_FAILED,
    FORMATS,
    ConvertOptions,
)
from volo_convert.signals import Stopped, stop_on_signals

DEMO_CHECKPOINT = "d1_224_84.2.pth.tar"
DEMO_OUTPUT = "d1_224.h5"


def _finish(
    result: Any, report: Path | None, junit: Path | None = None, per_image: bool = False
) -> None:
    """Prints the result (the library wrote the report), writes the JUnit file (with a
    case per image if `per_image`), and exits 1 if parity failed."""
    click.echo(result.summary())
    if report is not None:
        click.echo(one_line(f"report written to {report}"))
    if junit is not None:
        from volo_convert.junit import image_cases, result_case, write_junit

        cases = [result_case(result), *(image_cases(result) if per_image else [])]
        write_junit(junit, "verify", cases)
        click.echo(one_line(f"JUnit report written to {junit}"))
    if not result.passed:
        message = result.failure_reason
        if result.convert_seconds is not None:
            message += f"; nothing was written at {result.output}"
        click.echo(f"Error: {message}", err=True)
        sys.exit(EXIT_PARITY_FAILED)


def _run_convert(
    display: StageDisplay,
    checkpoint: Path,
    output: Path,
    options: ConvertOptions,
    report: Path | None,
) -> Any:
    """The one conversion behind `convert` and `demo`: its stages and warnings shown."""
    from volo_convert.pipeline import convert as run_convert

    return run_convert(
        checkpoint, output, options, display, report_path=report, on_warning=display.warn
    )


@click.group(cls=DefaultCommandGroup, context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
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
    type=click.Choice(FORMATS),
    help="The output format, instead of the one OUTPUT's extension names.",
)
@output_options
@checkpoint_options
@verification_options
@REPORT
@EXPLAIN
@click.option(
    "--no-verify", "verify", flag_value=False, default=True, help="Skip the parity check."
)
@OVERWRITE
@CONVERT_HEAD
@DROP_PATH_RATE
@DROP_RATE
@handles_errors
def convert(checkpoint: Path, output: Path, report: Path | None, **fields: Any) -> None:
    """Convert a VOLO checkpoint to Keras, then verify it against PyTorch.

    CHECKPOINT is a checkpoint file, or a Hugging Face hub folder (config.json beside
    model.safetensors or pytorch_model.bin), whose config is checked against the tensors
    and whose preprocessing and class names are used. Variant and image size are read
    from the tensors. The output is written under a
    temporary name, reloaded in its own runtime (Keras, TensorFlow's SavedModel loader or
    the TFLite interpreter) and moved to OUTPUT only once it is complete and verified.
    TFLite files take one image per invocation (--tflite-batch sets another batch) and
    use builtin ops only.

    \b
    Example:
      volo-convert d1_224_84.2.pth.tar -o d1.h5
      volo-convert d5_512_87.07.pth.tar -o d5.keras --device cuda --report d5.json
      volo-convert d1_224_84.2.pth.tar -o d1_feat.h5 --head features --image-size 256
      volo-convert d1_224_84.2.pth.tar -o d1_feat.keras --head features --drop-path-rate 0.1
      volo-convert d1_224_84.2.pth.tar -o d1_savedmodel/
      volo-convert d1_224_84.2.pth.tar -o d1_bf16.keras --compute-dtype bfloat16
      volo-convert d1_224_84.2.pth.tar -o d1_fp16.tflite --tflite-dtype float16
      volo-convert volo_d1_224.sail_in1k/ -o d1.tflite
      volo-convert d1_224_84.2.pth.tar -o d1_b8.tflite --tflite-batch 8
      volo-convert d1_224_84.2.pth.tar -o d1_int8.tflite --tflite-dtype int8 \\
          --calibration-images photos/ --input pixels --tflite-io int8
    """
    start_keras()
    options = ConvertOptions(**fields)
    with StageDisplay() as display:
        result = _run_convert(display, checkpoint, output, options, report)
    _finish(result, report)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@checkpoint_options
@verification_options
@REPORT
@JUNIT
@JUNIT_PER_IMAGE
@EXPLAIN
@OVERWRITE
@head_option(None, "The head MODEL must end in (default: whichever it ends in).")
@TRAINING
@MODEL_INPUT
@MODEL_COMPUTE_DTYPE
@handles_errors
def verify(
    model_file: Path,
    checkpoint: Path,
    report: Path | None,
    junit: Path | None,
    junit_per_image: bool,
    **fields: Any,
) -> None:
    """Check an existing model against its PyTorch checkpoint (for CI).

    MODEL is a .h5 or .keras file (run under the Keras backend KERAS_BACKEND names), a
    SavedModel folder or a .tflite file. Exits 0 when the logits agree within --atol (a
    quantized or bfloat16 file: when top-1 agreement reaches --min-top1), 1 when they do
    not. A checkpoint whose SHA-256 is not the one MODEL records is checked all the same,
    after a warning. --training also checks that a Keras file trains like PyTorch.

    \b
    Example:
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --atol 1e-4 --report parity.json
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --junit parity.xml
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --images photos/ --junit parity.xml \\
          --junit-per-image
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --explain
      volo-convert verify d1.h5 d1_224_84.2.pth.tar --training
      KERAS_BACKEND=torch volo-convert verify d1.keras d1_224_84.2.pth.tar
      volo-convert verify d1_fp16.tflite d1_224_84.2.pth.tar
      volo-convert verify d1_int8.tflite d1_224_84.2.pth.tar --images photos/
      volo-convert verify d1_bf16.keras d1_224_84.2.pth.tar --images photos/
    """
    start_keras()
    from volo_convert.junit import error_case, write_junit
    from volo_convert.pipeline import verify_file

    if junit_per_image and junit is None:
        raise ConversionError("--junit-per-image adds cases to the --junit file; give --junit too")
    options = ConvertOptions(**fields)
    reports = {} if report is None else {report: "the report"}
    check_junit_path(junit, [model_file, checkpoint], options.overwrite, others=reports)
    with StageDisplay() as display:
        try:
            result = verify_file(
                model_file,
                checkpoint,
                options,
                display,
                report_path=report,
                on_warning=display.warn,
            )
        except ConversionError as error:
            if junit is not None:
                name = f"{checkpoint.name} -> {model_file}"
                case = error_case(name, display.stage, display.elapsed, first_line(error))
                write_junit(junit, "verify", [case])
            raise
    _finish(result, report, junit, junit_per_image)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@handles_errors
def inspect(model_file: Path, as_json: bool) -> None:
    """Show what a converted model records: its source, model and verification.

    Every file volo-convert writes records the checkpoint it came from (name and
    SHA-256), the variant, image size, head and classes, the verification figures and
    the library versions. Only that record is read: the model is not loaded, and torch
    is not imported. Exits 2 if MODEL holds no record.

    \b
    Example:
      volo-convert inspect d1.h5
      volo-convert inspect d1_savedmodel/ --json
    """
    from volo_convert.formats import read_provenance

    provenance = read_provenance(model_file)
    if provenance is None:
        raise ConversionError(f"{model_file}: holds no volo-convert provenance record")
    click.echo(provenance.to_json() if as_json else provenance.summary())


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path())
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=DEFAULT_TOP_K,
    show_default=True,
    help="Classes to show per image.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@handles_errors
def predict(model_file: Path, images: tuple[str, ...], top_k: int, as_json: bool) -> None:
    """Show a converted model's top classes for each photo: does it see a cat?

    MODEL is a .h5 or .keras file, a SavedModel folder or a .tflite file; IMAGE a JPEG/PNG
    photo or a folder of them. Each photo is prepared as --images prepares it (timm's eval
    transform, with the crop_pct of the variant MODEL records) and fed as MODEL takes it
    (normalised images or pixels, an int8 file's integers). Classes are named by the labels
    MODEL records, by index otherwise; probabilities are the softmax of the logits. A file
    that is not a readable image is skipped with a warning. torch is not imported.

    \b
    Example:
      volo-convert predict d1.h5 photos/cat.jpg photos/dog.png
      volo-convert predict d1_int8.tflite photos/ --top-k 1
      volo-convert predict d1_savedmodel/ photos/ --json
    """
    import json

    start_keras()
    from volo_convert.prediction import predict as run_predict

    def warn(message: str) -> None:
        click.echo(one_line(f"Warning: {message}"), err=True)

    predictions = run_predict(model_file, images, top_k, on_warning=warn)
    if as_json:
        click.echo(json.dumps(predictions.to_dict(), indent=2))
    else:
        for line in predictions.summary().splitlines():
            click.echo(one_line(line))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("volo-demo"),
    show_default=True,
    help="Folder for the synthetic checkpoint and the converted model.",
)
@float32_verification_options
@REPORT
@EXPLAIN
@OVERWRITE
@handles_errors
def demo(workdir: Path, report: Path | None, **fields: Any) -> None:
    """Run the whole job on a synthetic d1_224 checkpoint in the release format.

    Writes WORKDIR/d1_224_84.2.pth.tar (realistic random weights), converts it to
    WORKDIR/d1_224.h5 and verifies it. Both are the demo's own files and are written
    anew on every run; --overwrite applies to a --report file.

    \b
    Example:
      volo-convert demo --workdir /tmp/volo-demo
    """
    start_keras()
    from volo_convert.synthetic import write_release_checkpoints

    options = ConvertOptions(**fields)
    with StageDisplay() as display:
        display.write(f"writing synthetic checkpoint {workdir / DEMO_CHECKPOINT}")
        (checkpoint,) = write_release_checkpoints(workdir, [DEMO_CHECKPOINT], overwrite=True)
        output = workdir / DEMO_OUTPUT
        if output.is_file() and not output.is_symlink():
            output.unlink()  # the previous demo's model
        result = _run_convert(display, checkpoint, output, options, report)
    _finish(result, report)


cli.add_command(batch)
cli.add_command(synthesize)


def main() -> None:
    """Console-script entry point. It imports no Keras, TensorFlow or torch: the commands
    that need them import them when they run (`start_keras`), so `--help` answers at once."""
    # A stop signal (INT, TERM, HUP) unwinds every cleanup, then ends in one line and
    # 128 + its number, whatever the command was doing.
    try:
        with stop_on_signals():
            cli(prog_name="volo-convert")
    except Stopped as stopped:
        click.echo(f"Aborted: stopped by {stopped.name}; nothing partial was left", err=True)
        sys.exit(stopped.exit_code)
