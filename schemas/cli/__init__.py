"""What every imzarr command line shares: the `imzarr` dispatcher, argument types and help, and one way to run
a command so that every error is one clear line with a meaningful exit code."""

from schemas.cli.arguments import CommandParser, HelpFormatter, add_debug_option, builder_keywords, non_negative_int, positive_int
from schemas.cli.dispatch import add_command, dispatch
from schemas.cli.running import exit_process, resumed_note, run_command, run_main

__all__ = [
    "CommandParser",
    "HelpFormatter",
    "add_command",
    "dispatch",
    "add_debug_option",
    "builder_keywords",
    "exit_process",
    "non_negative_int",
    "positive_int",
    "resumed_note",
    "run_command",
    "run_main",
]
