"""What a converted file records about itself: its source, its model, how it was verified.

Every output carries one JSON document, stored the native way for its format (see
`formats`): an attribute of an `.h5` file's root, an entry of a `.keras` zip, a SavedModel
asset, a TFLite metadata entry. Torch-free and Keras-free, so `inspect` stays light.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from volo_convert.errors import ConversionError

PROVENANCE_NAME = "volo_convert_provenance"  # the attribute, zip entry, asset, metadata name
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class VerificationRecord:
    """The parity check a file passed before it was moved into place."""

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None  # None for features
    atol: float
    images: int
    seed: int
    device: str  # where the PyTorch reference ran
    runtime: str  # where the file ran
    seconds: float


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a converted file comes from and how it was checked.

    `verification` is None for a file written with `--no-verify`; `environment` holds
    the library versions and the machine (`environment.environment()`).
    """

    converter_version: str
    created: str  # UTC, ISO 8601
    source_file: str  # the checkpoint's name, without its folder
    source_sha256: str
    variant: str
    image_size: int
    head: str
    num_classes: int
    output_format: str
    verification: VerificationRecord | None
    environment: dict[str, str]

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
        if schema != SCHEMA_VERSION:
            raise ConversionError(
                f"{where}: its provenance record has schema {schema!r}, this volo-convert "
                f"reads {SCHEMA_VERSION}"
            )
        try:
            verification = document.pop("verification")
            return cls(
                **document,
                verification=None if verification is None else VerificationRecord(**verification),
            )
        except (KeyError, TypeError):
            raise damaged from None

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
            verified = (
                f"max abs diff {verification.max_abs_diff:.3g} (atol {verification.atol:g}), "
                f"max rel diff {verification.max_rel_diff:.3g}{top1}, {verification.images} "
                f"images (seed {verification.seed}), reference on {verification.device}, model "
                f"in {verification.runtime}, {verification.seconds:.1f}s"
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
                f"{self.head} head, {self.output_format}",
            ),
            ("verified", verified),
            ("libraries", libraries),
            ("machine", self.environment.get("machine", "unknown")),
        ]
        return "\n".join(f"{label:<10} {value}" for label, value in rows)
