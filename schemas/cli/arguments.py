"""Argument types and help formatting shared by every imzarr command."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

from schemas.api import did_you_mean


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions as written and shows each option's default, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text.lower() or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other imzarr error (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: object) -> None:
        # argparse's own check, plus "did you mean" for choices (presets, pooling, subcommands such as `npx`).
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            hint = did_you_mean(str(value), action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint} (choose from {choices})")


def positive_int(text: str) -> int:
    """An integer ≥ 1 (sizes and counts)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number ≥ 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (seeds)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number ≥ 0")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number") from None


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")


def builder_keywords(args: argparse.Namespace, *builders: Callable[..., Any], **renamed: str) -> dict[str, Any]:
    """The parsed options that the `builders` (a package API's entry and the options builders it hands its keywords
    to) take, by name: a flag's argparse name is the parameter's name, or `renamed` maps parameter → argparse name.
    An option left unset (None) where the builder has a default of its own is left out: the library owns it."""
    taken: dict[str, Any] = {}
    for builder in builders:
        for p in inspect.signature(builder).parameters.values():
            source = renamed.get(p.name, p.name)
            if p.name in taken or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(args, source):
                continue
            value = getattr(args, source)
            if value is None and p.default not in (None, p.empty):
                continue
            taken[p.name] = value
    return taken
