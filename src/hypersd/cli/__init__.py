"""The hypersd command line: ``commands`` builds the parser; ``lora`` and ``generate`` add
their subcommands."""

from hypersd.cli.commands import main

__all__ = ["main"]
