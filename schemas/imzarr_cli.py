"""The `imzarr` command: a thin dispatcher over each package's own command line.

Commands are looked up by module name, so `schemas` imports neither `converter` nor `extractor`.
"""

from __future__ import annotations

import importlib
import sys

from schemas.cli_support import exit_process

COMMANDS: dict[str, tuple[str, list[str], str]] = {
    # name: (module with main(argv), argv prefix, help)
    "convert": ("converter.cli", [], "NPZ shards or a JPEG tree → image store (convert npz|jpeg --help)"),
    "sample": ("converter.cli", ["sample"], "write the embedded sample shards"),
    "info": ("schemas.info", [], "validate a store and summarise it"),
    "extract": ("extractor.cli", ["extract"], "image store → activation store through a model"),
    "layers": ("extractor.cli", ["layers"], "list a model's layers and their output shapes"),
    "generate": ("extractor.cli", ["generate"], "sample the one-step generator into an image store"),
    "compare": ("extractor.cli", ["compare"], "compare two activation stores per class (FD, precision/recall, coverage)"),
    "show": ("extractor.cli", ["show"], "contact sheet of a store's images"),
}


def usage() -> str:
    lines = ["usage: imzarr COMMAND [options]   (imzarr COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"imzarr: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[name]
    return int(importlib.import_module(module).main(prefix + rest) or 0)


def run() -> None:
    """The `imzarr` console script."""
    exit_process(main())


if __name__ == "__main__":
    run()
