"""What a conversion or verification found: the result, its one-line verdict, its report."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

from volo_convert import __version__
from volo_convert.checks.diagnosis import Diagnosis, format_diagnosis
from volo_convert.checks.parity import FloorFigures, ParityResult
from volo_convert.checks.training import TrainingParity, format_training
from volo_convert.environment import environment
from volo_convert.errors import one_line
from volo_convert.options import (
    CLEAR_MARGIN_MULTIPLE,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_HEAD,
    DEFAULT_INPUT,
    DEFAULT_TFLITE_BATCH,
    QUANTIZATION_REMEDY,
    Status,
    file_precision,
)
from volo_convert.paths import write_text
from volo_convert.provenance import (
    Provenance,
    VerificationRecord,
    describe_batches,
    describe_delegates,
    describe_input,
)

DEFAULT_IO = (DEFAULT_INPUT, "float32")  # the input the summary need not mention


@dataclasses.dataclass
class ConversionResult:
    """What a conversion or a verification found, as written to reports.

    `checkpoint_sha256` is the hash of the checkpoint read (a hub folder's weights file,
    which `checkpoint_name` names); `labels` are the class names a hub folder's config
    gives, and `label_descriptions` theirs (None if none). A verification also holds
    `recorded_sha256`, the hash the model's provenance records (None if it has none),
    and the `warnings` it gave. `str(result)` is the summary the CLI prints.
    """

    checkpoint: str
    output: str
    variant: str
    image_size: int
    num_classes: int
    parameters: int
    head: str = DEFAULT_HEAD
    convert_seconds: float | None = None
    verify_seconds: float | None = None
    parity: ParityResult | None = None
    diagnosis: Diagnosis | None = None
    output_format: str | None = None
    runtime: str | None = None
    checkpoint_sha256: str | None = None
    recorded_sha256: str | None = None
    checkpoint_name: str | None = None  # None: the checkpoint path's own name
    labels: tuple[str, ...] | None = None
    label_descriptions: tuple[str, ...] | None = None
    transform: dict[str, Any] | None = None  # EvalTransform as a dict: how photos are prepared
    warnings: list[str] = dataclasses.field(default_factory=list)
    training: TrainingParity | None = None
    tflite_dtype: str | None = None
    tflite_batch: int | str | None = None  # a TFLite file's batch: N, or `dynamic`
    delegates: dict[str, Any] | None = None  # a TFLite file's DelegateReport.to_dict()
    verified_batches: list[int] | None = None  # the batches a TFLite file was verified at
    input: dict[str, Any] | None = None  # InputContract.to_dict(): what the model takes
    compute_dtype: str = DEFAULT_COMPUTE_DTYPE  # what the model computes in

    @property
    def passed(self) -> bool:
        """True unless verification (or the training check) ran and failed."""
        return (self.parity is None or self.parity.passed) and (
            self.training is None or self.training.passed
        )

    @property
    def status(self) -> Status:
        if self.parity is None:
            return Status.UNVERIFIED
        return Status.PASSED if self.passed else Status.FAILED

    @property
    def failure_reason(self) -> str | None:
        """One line saying why parity failed, and where first; None if it did not."""
        if self.passed or self.parity is None:
            return None
        if self.parity.passed and self.training is not None:
            return f"training parity failed: {self.training.failure_reason}"
        reason = f"parity failed: {self.parity.failure}"
        if self.diagnosis is not None and self.diagnosis.first_failing_stage:
            reason += f"; first stage out of tolerance: {self.diagnosis.first_failing_stage}"
        elif self.diagnosis is not None and self.diagnosis.rebuilt:
            reason += "; the Keras graph rebuilt from the checkpoint passes every stage"
        floor = self.parity.floor
        if floor is not None and not floor.passed and self.tflite_dtype in QUANTIZATION_REMEDY:
            reason += f"; {QUANTIZATION_REMEDY[self.tflite_dtype]}"
        return reason

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data, with its status and failure reason."""
        return {
            **dataclasses.asdict(self),
            "status": str(self.status),
            "reason": self.failure_reason,
        }

    def summary(self) -> str:
        """The figures as the CLI prints them: the model, timings, parity, diagnosis."""
        what = f"{self.output_format} {self.tflite_dtype}" if self.tflite_dtype else None
        if what and self.tflite_batch not in (None, DEFAULT_TFLITE_BATCH):
            what += f", batch {self.tflite_batch}"
        if self.compute_dtype != DEFAULT_COMPUTE_DTYPE:
            what = f"{self.output_format}, {self.compute_dtype} compute"
        route = f"{one_line(self.checkpoint)} -> {one_line(self.output)}"  # names escaped
        lines = [
            f"{route}: VOLO {self.variant} at {self.image_size}px, "
            f"{self.num_classes} classes, {self.parameters:,} parameters, {self.head} head"
            + (f", {what}" if what else "")
        ]
        if self.input is not None and (self.input["kind"], self.input["dtype"]) != DEFAULT_IO:
            lines.append(f"input           {describe_input(self.input)}")
        if self.delegates is not None:
            lines.append(f"delegates       {describe_delegates(self.delegates)}")
        if self.convert_seconds is not None:
            lines.append(f"converted in {self.convert_seconds:.1f}s")
        if self.parity is None:
            lines.append("not verified (--no-verify)")
            return "\n".join(lines)
        parity = self.parity
        atol = f"  (atol {parity.atol:g})" if parity.atol is not None else ""
        lines.append(f"max abs diff    {parity.max_abs_diff:.3g}{atol}")
        precision = file_precision(self.tflite_dtype or "float32", self.compute_dtype)
        if precision != "float32":  # how far reduced precision drifts
            lines.append(f"mean abs diff   {parity.mean_abs_diff:.3g}")
        lines.append(f"max rel diff    {parity.max_rel_diff:.3g}")
        if parity.top1_agreement is not None:
            bar = f", min {parity.min_top1:.0%}" if parity.min_top1 is not None else ""
            floor_top1 = f"; floor {parity.floor.floor_top1_agreement:.0%}" if parity.floor else ""
            lines.append(
                f"top-1 agreement {parity.top1_agreement:.0%}  "
                f"({parity.batch_size} images{bar}{floor_top1})"
            )
        worst = parity.worst_image
        if parity.photos and worst is not None:  # synthetic images are named in the report
            lines.append(f"worst image     {one_line(worst.image)}: {worst.figures()}")
        if parity.floor is not None:
            lines += _floor_lines(parity.mean_abs_diff, parity.floor)
        lines.append(
            f"verified in {self.verify_seconds:.1f}s, reference on {parity.device}, "
            f"model in {self.runtime}" + describe_batches(self.verified_batches)
        )
        if self.diagnosis is not None:
            lines.append(format_diagnosis(self.diagnosis))
        if self.training is not None:
            lines.append(format_training(self.training))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def provenance(self, seed: int) -> Provenance:
        """What the output records about itself, verified on images of `seed` (or not,
        with `--no-verify`)."""
        parity = self.parity
        verification = None
        if parity is not None and self.runtime is not None and self.verify_seconds is not None:
            verification = VerificationRecord(
                max_abs_diff=parity.max_abs_diff,
                mean_abs_diff=parity.mean_abs_diff,
                max_rel_diff=parity.max_rel_diff,
                top1_agreement=parity.top1_agreement,
                atol=parity.atol,
                min_top1=parity.min_top1,
                images=parity.batch_size,
                seed=seed,
                device=parity.device,
                runtime=self.runtime,
                seconds=round(self.verify_seconds, 1),
                batches=self.verified_batches,
            )
        return Provenance(
            converter_version=__version__,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            source_file=self.checkpoint_name or Path(self.checkpoint).name,
            source_sha256=self.checkpoint_sha256,
            variant=self.variant,
            image_size=self.image_size,
            head=self.head,
            num_classes=self.num_classes,
            output_format=str(self.output_format),
            tflite_dtype=self.tflite_dtype,
            tflite_batch=self.tflite_batch,
            delegates=self.delegates,
            input=self.input,
            compute_dtype=self.compute_dtype,
            labels=None if self.labels is None else list(self.labels),
            label_descriptions=(
                None if self.label_descriptions is None else list(self.label_descriptions)
            ),
            transform=self.transform,
            verification=verification,
            environment=environment(),
        )


def _floor_lines(mean_abs_diff: float, floor: FloorFigures) -> list[str]:
    """A quantized file's error beside its weight-rounding floor's, and its clear-margin
    agreement, as the summary prints them."""
    bar = f", max {floor.max_error_ratio:g}x" if floor.max_error_ratio is not None else ""
    clear = (
        f"{floor.clear_top1_agreement:.0%}  ({floor.clear_images} images"
        if floor.clear_top1_agreement is not None
        else "-  (no image"
    )
    return [
        f"weight floor    {floor.floor_mean_abs_diff:.3g} mean abs diff, "
        f"{floor.floor_mean_abs_diff / floor.logit_std:.1%} of the logits' std "
        f"{floor.logit_std:.3g}",
        f"vs the floor    {floor.error_ratio:.2f}x  "
        f"({mean_abs_diff / floor.logit_std:.1%} of the std{bar})",
        f"clear margin    {clear} whose float top-1 margin is {CLEAR_MARGIN_MULTIPLE:g}x the "
        f"floor's logit error there; min {floor.min_clear_top1:.0%})",
    ]


def write_report(path: str | Path, result: ConversionResult) -> None:
    """Writes `result` and the environment as pretty-printed JSON, atomically."""
    document = {**result.to_dict(), "environment": environment()}
    write_text(path, json.dumps(document, indent=2) + "\n")
