"""The command line: `commands` and `batch_commands` hold the click commands, `parameters`
their options, `progress` the stage display."""

from volo_convert.cli.commands import cli, main

__all__ = ["cli", "main"]
