"""`python -m volo_convert` runs the command line."""

from volo_convert.cli import main

main()
