"""A checkpoint ready to convert: its tensors, the architecture they fit, the image size,
and, from a hub folder's config.json, its preprocessing and class names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from volo_convert.architecture.torch_reference import parameter_shapes
from volo_convert.architecture.variants import (
    EvalTransform,
    VoloConfig,
    detect_config,
    eval_transform,
    get_variant,
)
from volo_convert.errors import about
from volo_convert.options import ConvertOptions, check_image_size
from volo_convert.weights.checkpoint import check_finite, load_state_dict, tensor_shapes
from volo_convert.weights.hub_folder import check_hub_config, checkpoint_source, read_hub_config
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.memory import MappedCheckpoint
from volo_convert.weights.porting import check_checkpoint
from volo_convert.weights.resolution import resize_pos_embed


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's tensors and the architecture they fit, resized to `image_size`.

    `sha256` is the hash of the file they were read from (a hub folder's weights file),
    `source_name` what the provenance calls it; `mapped` hands back the pages of its
    memory-mapped tensors once they are read. `transform` prepares photos for the model;
    `labels` are the class names a hub folder's config.json gives (None if none).
    """

    state_dict: dict[str, torch.Tensor]
    config: VoloConfig
    image_size: int
    sha256: str
    mapped: MappedCheckpoint
    source_name: str
    transform: EvalTransform
    labels: tuple[str, ...] | None = None
    label_descriptions: tuple[str, ...] | None = None

    def parameter_count(self, head: str) -> int:
        """Weights of the model ending in `head`: the checkpoint tensors it keeps.

        The same figure as `keras.Model.count_params()`, for files that keep no such count.
        """
        return sum(
            self.state_dict[mapping.torch_key].numel()
            for mapping in weight_mappings(self.config, head)
            if mapping.keras_path is not None and mapping.torch_key in self.state_dict
        )


def load_checkpoint(path: str | Path, options: ConvertOptions) -> LoadedCheckpoint:
    """Reads a checkpoint file or hub folder, finds its architecture and resizes pos_embed
    if asked to.

    Every tensor's name and shape is checked against the mapping tables and the
    architecture here, before any model is built, so a bad checkpoint fails as soon as
    it is read; so is a hub folder's config.json, against the tensors. `options.variant`
    overrides the detected variant (keeping the checkpoint's class count);
    `options.image_size` converts to another input size.
    """
    source = checkpoint_source(path)
    hub = None if source.config is None else read_hub_config(source.config)
    state_dict, sha256 = load_state_dict(
        source.weights, ema=options.ema, trust_checkpoint=options.trust_checkpoint
    )
    shapes = tensor_shapes(state_dict)
    with about(path):
        config, image_size = detect_config(shapes)
        if hub is not None:
            check_hub_config(hub, config, image_size)
        if options.image_size is None:  # the checkpoint's own size, read from pos_embed
            check_image_size(image_size)
        if options.variant is not None:
            config = get_variant(options.variant).with_num_classes(config.num_classes)
        check_checkpoint(shapes, weight_mappings(config), parameter_shapes(config, image_size))
    # Reading every value maps its pages in; each tensor hands them back once checked.
    mapped = MappedCheckpoint(source.weights)
    check_finite(state_dict, source.weights, on_checked=mapped.release)
    if options.image_size is not None and options.image_size != image_size:
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], options.image_size)
        image_size = options.image_size
    if hub is None:
        transform, labels, descriptions = eval_transform(config.name, image_size), None, None
    else:
        transform, labels, descriptions = (
            hub.transform(image_size),
            hub.labels,
            hub.label_descriptions,
        )
    return LoadedCheckpoint(
        state_dict, config, image_size, sha256, mapped, source.name, transform, labels, descriptions
    )
