"""One entry point's keywords gathered from the builders it hands them to, so that help(), editors and the command
line's argument mapping (schemas/cli/arguments.py) see every option by name while each is defined once."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def takes_keywords_of(entry: Callable[..., Any], *builders: Callable[..., Any] | inspect.Signature) -> None:
    """Give `entry` (whose `**options` it passes on) a signature of its own parameters plus the builders' keywords."""
    own = [p for p in inspect.signature(entry).parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in own}
    for builder in builders:
        signature = builder if isinstance(builder, inspect.Signature) else inspect.signature(builder)
        for p in signature.parameters.values():
            if p.name not in names and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                own.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                names.add(p.name)
    entry.__signature__ = inspect.signature(entry).replace(parameters=own)  # type: ignore[attr-defined]


def keyword_parameters(fields: list[Any]) -> inspect.Signature:
    """Dataclass fields as keyword-only parameters with their defaults (for `takes_keywords_of`)."""
    return inspect.Signature([inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields])
