"""The verification step both commands end in: one reference run, then parity, and the
diagnosis and training check when asked for or needed."""

from __future__ import annotations

import time

import keras
import torch

from volo_convert.architecture.keras_model import build_volo
from volo_convert.checks.diagnosis import diagnose
from volo_convert.checks.parity import check_parity, worst_parity
from volo_convert.checks.photos import Photos, verification_photos
from volo_convert.checks.reference import reference_memory_bytes, run_reference
from volo_convert.checks.training import check_training_parity
from volo_convert.checks.weight_floor import floor_outputs
from volo_convert.environment import GIGABYTE, available_memory_bytes
from volo_convert.errors import ConversionError
from volo_convert.formats import (
    Predictor,
    compute_dtype,
    input_contract,
    precision,
    verification_runs,
)
from volo_convert.options import (
    DEFAULT_ATOL,
    DEFAULT_COMPUTE_DTYPE,
    QUANTIZED_DTYPES,
    ConvertOptions,
    default_atol,
    default_max_floor_ratio,
    default_min_top1,
    default_verify_images,
)
from volo_convert.pipeline.stages import StageCallback, WarningCallback, notify
from volo_convert.results import ConversionResult
from volo_convert.weights.loading import LoadedCheckpoint
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights


def verification_images(
    options: ConvertOptions, checkpoint: LoadedCheckpoint, file_kind: str, warn: WarningCallback
) -> Photos | None:
    """The photos of `--images` to verify a file of precision `file_kind` on, or None for
    synthetic images.

    The memory the verification needs is checked here, once the image count is known.
    """
    size, transform = checkpoint.image_size, checkpoint.transform
    photos = verification_photos(options.images, size, transform, warn, file_kind)
    count = len(photos.names) if photos is not None else _synthetic_image_count(options, file_kind)
    _check_memory(checkpoint, count)
    return photos


def _synthetic_image_count(options: ConvertOptions, file_kind: str) -> int:
    return options.verify_images or default_verify_images(file_kind)


def _check_memory(checkpoint: LoadedCheckpoint, image_count: int) -> None:
    """Refuses a verification batch the machine's available memory cannot hold."""
    needed = reference_memory_bytes(checkpoint.config, checkpoint.image_size, image_count)
    available = available_memory_bytes()
    if needed > available:
        raise ConversionError(
            f"verifying {image_count} images at {checkpoint.image_size}px needs about "
            f"{needed / GIGABYTE:,.1f} GB, but this machine has {available / GIGABYTE:,.1f} GB "
            "available; use fewer --verify-images or a smaller --image-size"
        )


def _keras_graph(model: Predictor, checkpoint: LoadedCheckpoint, head: str) -> keras.Model:
    """`model` itself if it is a float32 Keras model; else the float32 Keras graph a
    SavedModel, a TFLite file or a bfloat16 model came from."""
    if isinstance(model, keras.Model) and compute_dtype(model) == DEFAULT_COMPUTE_DTYPE:
        return model
    rebuilt = build_volo(
        checkpoint.config, checkpoint.image_size, head, input_kind=input_contract(model).kind
    )
    port_weights(rebuilt, checkpoint.state_dict, weight_mappings(checkpoint.config, head))
    return rebuilt


def verify(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    photos: Photos | None,
    device: torch.device,
    result: ConversionResult,
    on_stage: StageCallback | None,
) -> None:
    """Fills in `result`'s parity and timing, its diagnosis if asked for or failed, and
    the training check if asked for.

    A quantized file is judged beside its weight-rounding floor: the float32 Keras graph
    with its kernels rounded to int8, run on the same images.

    The reference runs once, on `photos` or else the seeded synthetic images;
    parity and diagnosis both read that run. A TFLite file is run at each batch
    `verification_runs` names, and every run must pass. A SavedModel or TFLite file has no stage
    outputs to read, and a bfloat16 model's would all miss an atol, so the float32 Keras
    graph it came from is diagnosed (against DEFAULT_ATOL where the file has no atol
    bar): if every stage of that passes, the export or the precision lost the parity. The
    training check takes one stateless training step of the Keras `model` beside a fresh
    reference.
    """
    notify(on_stage, "verifying")
    started = time.perf_counter()
    dtype = precision(model)
    reference = run_reference(
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        head=result.head,
        device=device,
        photos=photos,
        batch_size=_synthetic_image_count(options, dtype),
        seed=options.seed,
    )
    atol = default_atol(dtype) if options.atol is None else options.atol
    min_top1 = default_min_top1(dtype) if options.min_top1 is None else options.min_top1
    graph, floor = None, None
    if dtype in QUANTIZED_DTYPES:
        graph = _keras_graph(model, checkpoint, result.head)
        pixels_in = input_contract(graph).kind == "pixels"
        floor = floor_outputs(graph, reference.pixels if pixels_in else reference.images)
    runs = verification_runs(model, len(reference.outputs))
    result.parity = worst_parity(
        [
            check_parity(runner, reference, atol, min_top1, floor, default_max_floor_ratio(dtype))
            for _, runner in runs
        ]
    )
    result.verified_batches = [batch for batch, _ in runs if batch is not None] or None
    result.verify_seconds = time.perf_counter() - started
    diagnosis_atol = DEFAULT_ATOL if atol is None else atol
    if options.explain or not result.parity.passed:
        notify(on_stage, "diagnosing")
        if graph is None:
            graph = _keras_graph(model, checkpoint, result.head)
        result.diagnosis = diagnose(
            graph, checkpoint.config, reference, diagnosis_atol, rebuilt=graph is not model
        )
    if options.training:
        notify(on_stage, "training")
        result.training = check_training_parity(
            model,
            checkpoint.config,
            checkpoint.state_dict,
            atol=diagnosis_atol,
            batch_size=_synthetic_image_count(options, dtype),
            seed=options.seed,
            device=device,
        )
