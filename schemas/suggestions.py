""""Did you mean" for every name a user types: commands, presets, layers and other choices (classes list their
own close matches in extractor/selection.py, with WNIDs). One rule, difflib's ratio, so all answer alike."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's similarity ratio at or above which a known name is offered (`midblok` → midblock is 0.93, `tiny` →
# tiny-random 0.53); below it, the listing of valid names says more than a guess.
CLOSE_CUTOFF = 0.5


def close_matches(word: str, choices: Iterable[object], n: int = 3) -> list[str]:
    """The known names most like `word` (case-insensitively), best first."""
    names = [str(c) for c in choices]
    folded = {name.casefold(): name for name in reversed(names)}
    return [folded[m] for m in difflib.get_close_matches(word.casefold(), list(folded), n=n, cutoff=CLOSE_CUTOFF)]


def did_you_mean(word: str, choices: Iterable[object]) -> str:
    """'; did you mean X?' (or 'X or Y') when a known name is close to `word`, else ''."""
    close = close_matches(word, choices)
    return f"; did you mean {' or '.join(close)}?" if close else ""
