"""What a converted file records about itself: its source, its model, how it was verified.

Every output carries one JSON document, stored the native way for its format (see
`formats`): an attribute of an `.h5` file's root, an entry of a `.keras` zip, a SavedModel
asset, a TFLite metadata entry. Torch-free and Keras-free, so `inspect` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from volo_convert.errors import ConversionError, one_line
from volo_convert.options import DEFAULT_COMPUTE_DTYPE, DEFAULT_TFLITE_BATCH, HEADS

PROVENANCE_NAME = "volo_convert_provenance"  # the attribute, zip entry, asset, metadata name
# 2 added the input contract, the TFLite dtype and the top-1 bar; 3 the compute dtype; 4 the
# class names (and, added within 4 with defaults, a TFLite file's batch and the batches it
# was verified at). Older ones are read as before: what they lack takes the only value there was.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, SCHEMA_VERSION)
LABELS_SHOWN = 3  # the class names `inspect` prints before "..."
# What a schema-1 file took: the only input there was.
IMAGES_INPUT = {"kind": "images", "dtype": "float32"}


@dataclasses.dataclass(frozen=True)
class VerificationRecord:
    """The parity check a file passed before it was moved into place."""

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None  # None for features
    atol: float | None  # None for quantized and bfloat16 files, judged by top-1 agreement
    images: int
    seed: int
    device: str  # where the PyTorch reference ran
    runtime: str  # where the file ran
    seconds: float
    mean_abs_diff: float | None = None  # None in schema 1
    min_top1: float | None = None
    batches: list[int] | None = None  # a TFLite file's run batches; None for other formats


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a converted file comes from and how it was checked.

    `verification` is None for a file written with `--no-verify`; `environment` holds
    the library versions and the machine (`environment.environment()`). `input` is the
    input contract (`formats.contract.InputContract.to_dict()`); `tflite_dtype` is None
    for other formats, and so is `tflite_batch` (N, or `dynamic`; None in records written
    before files took a batch, which took one image). `compute_dtype` is what the model
    computes in (`options.COMPUTE_DTYPES`).
    `labels` are the class names by index, where the checkpoint's hub config.json gives
    them (None otherwise), and `label_descriptions` their descriptions (timm's
    `label_descriptions`, e.g. "tench, Tinca tinca" for the synset n01440764).
    `source_file` is the checkpoint's name, or a hub folder's `FOLDER/WEIGHTS`, and
    `source_sha256` that file's hash (for a hub folder, of its weights file).
    """

    converter_version: str
    created: str  # UTC, ISO 8601
    source_file: str  # the checkpoint's name, without its folder; FOLDER/WEIGHTS for a hub folder
    source_sha256: str
    variant: str
    image_size: int
    head: str
    num_classes: int
    output_format: str
    verification: VerificationRecord | None
    environment: dict[str, str]
    tflite_dtype: str | None = None
    tflite_batch: int | str | None = None
    input: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(IMAGES_INPUT))
    compute_dtype: str = DEFAULT_COMPUTE_DTYPE  # schemas 1 and 2 knew no other
    labels: list[str] | None = None  # schemas 1 to 3 recorded none
    label_descriptions: list[str] | None = None
    # How photos are prepared for the model (`variants.EvalTransform` as a dict): a hub
    # folder's config.json or the release values; None in records before it was kept.
    transform: dict[str, Any] | None = None
    # A TFLite file's delegate report (`formats.tflite_delegates.DelegateReport.to_dict()`).
    delegates: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The document as stored in a file: JSON with a schema version."""
        return json.dumps({"schema": SCHEMA_VERSION, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str | Path) -> Provenance:
        """Parses a stored document; `where` names the file in a ConversionError."""
        damaged = ConversionError(f"{where}: its provenance record is damaged")
        try:
            document: dict[str, Any] = json.loads(text)
            schema = document.pop("schema")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise damaged from None
        if schema not in READABLE_SCHEMAS:
            raise ConversionError(
                f"{where}: its provenance record has schema {schema!r}, this volo-convert "
                f"reads {', '.join(map(str, READABLE_SCHEMAS[:-1]))} and {READABLE_SCHEMAS[-1]}"
            )
        try:
            verification = document.pop("verification")
            record = cls(
                **document,
                verification=None if verification is None else VerificationRecord(**verification),
            )
        except (KeyError, TypeError):
            raise damaged from None
        # JSON holds any value anywhere: a null, a list or a stranger head where the record
        # needs a head or a dict would otherwise fail later, as a bug.
        checked = [record] + ([] if record.verification is None else [record.verification])
        if not all(map(_holds_its_types, checked)) or record.head not in HEADS:
            raise damaged
        if not all(isinstance(record.input.get(key), str) for key in ("kind", "dtype")):
            raise damaged
        return record

    def summary(self) -> str:
        """The record as `volo-convert inspect` prints it."""
        verification = self.verification
        if verification is None:
            verified = "no (--no-verify)"
        else:
            top1 = (
                ""
                if verification.top1_agreement is None
                else f", top-1 agreement {verification.top1_agreement:.0%}"
            )
            atol = "" if verification.atol is None else f" (atol {verification.atol:g})"
            bar = "" if verification.min_top1 is None else f" (min {verification.min_top1:.0%})"
            verified = (
                f"max abs diff {verification.max_abs_diff:.3g}{atol}, "
                f"max rel diff {verification.max_rel_diff:.3g}{top1}{bar}, {verification.images} "
                f"images (seed {verification.seed}), reference on {verification.device}, model "
                f"in {verification.runtime}{describe_batches(verification.batches)}, "
                f"{verification.seconds:.1f}s"
            )
        libraries = ", ".join(
            f"{name} {version}" for name, version in self.environment.items() if name != "machine"
        )
        rows = [
            ("converter", f"volo-convert {self.converter_version}, {self.created}"),
            ("source", self.source_file),
            ("sha256", self.source_sha256),
            (
                "model",
                f"VOLO {self.variant} at {self.image_size}px, {self.num_classes} classes, "
                f"{self.head} head, {self.output_format}"
                + ("" if self.tflite_dtype is None else f" {self.tflite_dtype}")
                + (
                    ""
                    if self.tflite_dtype is None
                    else f", batch {self.tflite_batch or DEFAULT_TFLITE_BATCH}"
                )
                + (
                    ""
                    if self.compute_dtype == DEFAULT_COMPUTE_DTYPE
                    else f", {self.compute_dtype} compute"
                ),
            ),
            ("input", describe_input(self.input)),
            *([] if self.labels is None else [("labels", describe_labels(self.labels))]),
            ("verified", verified),
            *(
                []
                if self.delegates is None
                else [("delegates", describe_delegates(self.delegates))]
            ),
            ("libraries", libraries),
            ("machine", self.environment.get("machine", "unknown")),
        ]
        return "\n".join(f"{label:<10} {value}" for label, value in rows)


def _holds_its_types(record: Any) -> bool:
    """True when every field of a dataclass `record` holds a value of its annotated type."""
    for name, hint in typing.get_type_hints(type(record)).items():
        value = getattr(record, name)
        allowed = tuple(typing.get_origin(kind) or kind for kind in typing.get_args(hint))
        allowed = allowed if typing.get_origin(hint) is not dict else (dict,)
        allowed = allowed or (hint,)
        if float in allowed:
            allowed = (*allowed, int)
        if isinstance(value, bool) is not (bool in allowed) or not isinstance(value, allowed):
            return False
    return True


def describe_delegates(report: dict[str, Any]) -> str:
    """One line for a TFLite file's delegate report: the GPU delegate, XNNPACK, the rank."""
    flagged = report["gpu_flagged"]
    if report["gpu_compatible"]:
        gpu = "compatible"
    else:
        gpu = f"not compatible ({len(flagged)} ops flagged{': ' + flagged[0] if flagged else ''})"
    partitions = "partition" if report["xnnpack_partitions"] == 1 else "partitions"
    return (
        f"GPU delegate {gpu}; XNNPACK {report['xnnpack_nodes']} of {report['nodes']} nodes "
        f"({report['xnnpack_partitions']} {partitions}); largest tensor rank "
        f"{report['max_tensor_rank']}"
    )


def describe_input(contract: dict[str, Any]) -> str:
    """One line for an input contract: kind, type and, if quantized, scale and zero point."""
    line = f"{contract['kind']} ({contract['dtype']}"
    if "scale" in contract:
        line += f", scale {contract['scale']:.6g}, zero point {contract['zero_point']}"
    return line + ")"


def describe_batches(batches: list[int] | None) -> str:
    """Where a TFLite file was run in verification (" at batch 1 and 64"); "" if unrecorded."""
    if not batches:
        return ""
    return f" at batch {' and '.join(map(str, batches))}"


def describe_labels(labels: list[str]) -> str:
    """One line for the class names: how many, and the first few."""
    shown = ", ".join(one_line(label) for label in labels[:LABELS_SHOWN]) + (
        ", ..." if len(labels) > LABELS_SHOWN else ""
    )
    return f"{len(labels)} class names: {shown}"
