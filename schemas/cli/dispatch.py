"""The `imzarr` command: one argparse tree built from every package's `add_commands(subparsers)`.

Packages register their commands as entry points (group `imzarr.commands` in pyproject.toml), so `schemas`
imports neither `converter` nor `extractor` by name. Each command's parser sets `handler` (a function of the
parsed arguments returning an exit code) and `prog_name` through `set_defaults`.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

from schemas.cli.arguments import CommandParser, HelpFormatter, add_debug_option
from schemas.cli.running import run_command, run_main
from schemas.api import did_you_mean
from schemas.api import apply_storage_options, parse_storage_options, refuse_process_bound_output, remote_protocols

ENTRY_POINT_GROUP = "imzarr.commands"
# Order in `imzarr --help`: the workflow's order; packages not listed come after, by name.
PACKAGE_ORDER = ("converter", "extractor", "schemas")


def imzarr_version() -> str:
    try:
        return version("imzarr")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The whole command tree (`imzarr COMMAND [SUBCOMMAND] …`) and its command names."""
    parser = CommandParser(
        prog="imzarr",
        formatter_class=HelpFormatter,
        description=(
            "ImageNet (NPZ shards or JPEG trees) → one Zarr v3 image store → model activations as a labeled "
            "xarray/Zarr store. `imzarr COMMAND --help` explains each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"imzarr {imzarr_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in command_registrars():
        register(sub)
    return parser, list(sub.choices)


def command_registrars() -> list:
    """Every installed package's `add_commands`, in workflow order."""
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    rank = {name: i for i, name in enumerate(PACKAGE_ORDER)}
    found.sort(key=lambda ep: (rank.get(ep.value.split(".")[0], len(rank)), ep.name))
    return [ep.load() for ep in found]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, known = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        hint = did_you_mean(argv[0], known) or f"; commands: {', '.join(known)}"
        print(f"imzarr: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    return dispatch(parser, argv)


def dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse `argv` with a tree whose leaf parsers set `handler` and `prog_name`, then run the handler."""
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse's own usage errors (exit 2) and --help/--version (exit 0)
        return int(exc.code or 0)
    if extra:  # argparse would name the top-level parser; the command they were given to is the one to name
        prog = getattr(args, "prog_name", parser.prog)
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)", file=sys.stderr)
        return 2

    def body() -> int:
        options = parse_storage_options(getattr(args, "storage_options", None))
        # Every path or URL argument, not the scheduler's address (tcp://…), which names no storage.
        apply_storage_options(options, remote_protocols(value for name, value in vars(args).items() if name != "scheduler"))
        for name in args.process_outputs:
            refuse_process_bound_output(getattr(args, name))
        return args.handler(args)

    return run_command(args.prog_name, body, debug=getattr(args, "debug", False))


def add_command(
    sub, name: str, help_: str, description: str | None = None, prog_name: str | None = None, outputs: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """A command's parser with the house help formatter and `--debug`.

    `prog_name` starts its error lines (default `imzarr NAME`), the same however the command was started;
    `outputs` names the options whose stores must outlive the command's process (memory:// refused).
    """
    parser = sub.add_parser(name, help=help_, description=description or help_, formatter_class=HelpFormatter)
    add_debug_option(parser)
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="filesystem options for the remote URLs of this command, as a JSON object or @file.json, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server (default: none; the standard '
        "AWS_* and FSSPEC_* variables also apply)",
    )
    parser.set_defaults(prog_name=prog_name or f"imzarr {name}", process_outputs=outputs)
    return parser


def run() -> None:
    """The `imzarr` console script."""
    run_main("imzarr", main)
