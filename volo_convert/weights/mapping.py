"""The torch -> Keras name-mapping tables: load `tables/*.yaml` and expand their patterns.

Each table names a scope; a scope yields one set of placeholder values per repetition
(one per block, say), and every pattern in the table is formatted with each set. A row
may list the `heads` that need it; with any other head its tensor is declared unused.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterator
from typing import Any

import yaml

from volo_convert.architecture.variants import NUM_CLASS_BLOCKS, TRANSFORMER_STACKS, VoloConfig
from volo_convert.errors import ConversionError
from volo_convert.options import DEFAULT_HEAD, HEADS, check_choice
from volo_convert.weights.transforms import TRANSFORMS

TABLES_FOLDER = "tables"  # inside this package
STEM_CONV_INDICES = (0, 3, 6)  # torch Sequential index of each stem conv; its BN follows


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One checkpoint tensor, the Keras variable (`layer/weight`) it fills, and how.

    `keras_path` is None for a tensor the chosen head leaves out: it must still be in
    the checkpoint, and is deliberately not ported.
    """

    torch_key: str
    keras_path: str | None
    transform: str


@dataclasses.dataclass(frozen=True)
class MappingRow:
    """One row of a table: name patterns with placeholders, the transform, the heads."""

    torch: str
    keras: str
    transform: str = "identity"
    heads: tuple[str, ...] = HEADS


@dataclasses.dataclass(frozen=True)
class MappingTable:
    """One YAML table: a scope and its pattern rows."""

    source: str
    scope: str
    rows: tuple[MappingRow, ...]


def _scope_values(scope: str, config: VoloConfig) -> Iterator[dict[str, int]]:
    """Placeholder values for each repetition of `scope` in a model of `config`."""
    if scope == "model":
        yield {}
    elif scope == "stem_conv":
        for index, conv_index in enumerate(STEM_CONV_INDICES, start=1):
            yield {"index": index, "conv_index": conv_index, "bn_index": conv_index + 1}
    elif scope == "outlooker_block":
        for block in range(config.layers[0]):
            yield {"stack": 0, "network_index": 0, "block": block}
    elif scope == "transformer_block":
        for stack in TRANSFORMER_STACKS:
            for block in range(config.layers[stack]):
                # torch network.1 is the downsample, so stack s lives at network.{s + 1}
                yield {"stack": stack, "network_index": stack + 1, "block": block}
    elif scope == "class_block":
        for index in range(NUM_CLASS_BLOCKS):
            yield {"index": index}
    else:
        raise ValueError(f"unknown mapping scope {scope!r}")


def _parse_table(source: str, text: str) -> MappingTable:
    """Parses and checks one YAML table."""
    document: Any = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("tensors"), list):
        raise ValueError(f"{source}: expected a mapping with 'scope' and a 'tensors' list")
    rows = []
    for row in document["tensors"]:
        if not isinstance(row, dict) or not {"torch", "keras"} <= row.keys():
            raise ValueError(f"{source}: every row needs 'torch' and 'keras', got {row!r}")
        transform = row.get("transform", "identity")
        if transform not in TRANSFORMS:
            raise ValueError(
                f"{source}: unknown transform {transform!r}, expected one of {tuple(TRANSFORMS)}"
            )
        heads = tuple(row.get("heads", HEADS))
        if unknown := [head for head in heads if head not in HEADS]:
            raise ValueError(f"{source}: unknown heads {unknown}, expected some of {HEADS}")
        rows.append(MappingRow(row["torch"], row["keras"], transform, heads))
    return MappingTable(source, document.get("scope", "model"), tuple(rows))


def load_tables() -> list[MappingTable]:
    """Loads every table shipped in `tables/`, sorted by file name."""
    folder = importlib.resources.files(__package__) / TABLES_FOLDER
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )
    return [_parse_table(entry.name, entry.read_text(encoding="utf-8")) for entry in files]


def expand_tables(
    tables: list[MappingTable], config: VoloConfig, head: str = DEFAULT_HEAD
) -> list[WeightMapping]:
    """Expands the tables' patterns into concrete mappings for a model of `config`.

    Rows whose `heads` leave out `head` expand to mappings with no Keras path.
    """
    check_choice("head", head, HEADS, ValueError)
    mappings = []
    for table in tables:
        for values in _scope_values(table.scope, config):
            for row in table.rows:
                try:
                    keras_path = row.keras.format(**values)
                    mappings.append(
                        WeightMapping(
                            row.torch.format(**values),
                            keras_path if head in row.heads else None,
                            row.transform,
                        )
                    )
                except KeyError as error:
                    raise ConversionError(
                        f"{table.source}: placeholder {error} is not defined in scope "
                        f"{table.scope!r}"
                    ) from None
    return mappings


def weight_mappings(config: VoloConfig, head: str = DEFAULT_HEAD) -> list[WeightMapping]:
    """All mappings for a model of `config` ending in `head`, from the shipped tables."""
    return expand_tables(load_tables(), config, head)
