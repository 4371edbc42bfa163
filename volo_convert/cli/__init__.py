"""The command line: `commands` holds the click commands, `parameters` their options."""

from volo_convert.cli.commands import cli, main

__all__ = ["cli", "main"]
