"""One entry point's keywords gathered from the builders it hands them to, so that help(), editors and the command
line's argument mapping (schemas/cli/arguments.py) see every option by name while each is defined once."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from schemas.errors import ImzarrError
from schemas.suggestions import did_you_mean


class UnknownKeywordError(ImzarrError, TypeError):
    """A keyword an entry point does not take (a TypeError too, as Python's own for an unknown keyword)."""


def refuse_unknown_keywords(given: Iterable[str], accepted: Iterable[str], entry: str) -> None:
    """One line naming the first keyword `entry` does not take, with the close match (`no_noise` → noise=False,
    as the command line's --no-noise is spelt in Python) and the keywords it does take."""
    accepted = sorted(set(accepted))
    unknown = sorted(set(given) - set(accepted))
    if not unknown:
        return
    name = unknown[0]
    hint = f"; did you mean {name[3:]}=False?" if name.startswith("no_") and name[3:] in accepted else did_you_mean(name, accepted)
    raise UnknownKeywordError(f"{entry}() takes no keyword {name!r}{hint} (its keywords: {', '.join(accepted)})")


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


def keyword_names(builder: Callable[..., Any]) -> list[str]:
    """The names a builder takes by keyword: keyword-only ones and those with a default (not `**rest`)."""
    return [
        p.name for p in inspect.signature(builder).parameters.values()
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
    ]  # fmt: skip


def keyword_parameters(fields: list[Any]) -> inspect.Signature:
    """Dataclass fields as keyword-only parameters with their defaults (for `takes_keywords_of`)."""
    return inspect.Signature([inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields])
