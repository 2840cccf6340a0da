"""The rules for an option's value that every entry shares, so that the command line and the Python API refuse
alike: whole numbers within a range, and one of a few names. Each returns the value as the run records it and
raises ValueError with the rule ("must be a whole number ≥ 1"); the caller's error names the option.

Whole numbers may be numpy's: a notebook passes `np.int64` as readily as `int`. They become Python ints here,
because what is recorded (a store's settings, in JSON) must be plain. A bool is not a whole number, and neither
is 2.0: the command line never gives one, and a float count is more often a mistake than a choice.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

from schemas.suggestions import did_you_mean

# The seeds numpy's legacy RandomState takes (KID's subsets and IS's splits are drawn with it, as torch-fidelity
# draws them), and the 64-bit seeds of everything else.
SEED_32 = (0, 2**32 - 1, "2**32 - 1")
SEED_64 = (0, 2**64 - 1, "2**64 - 1")


def whole_number(value: object, minimum: int = 0, maximum: int | None = None, maximum_text: str | None = None) -> int:
    """`value` as a Python int: an integer (Python's or numpy's, not a bool) from `minimum` to `maximum`
    (`maximum_text` says it, e.g. "2**64 - 1"); ValueError saying the rule otherwise."""
    if maximum is None:
        rule = f"must be a whole number ≥ {minimum}"
    else:
        rule = f"must be a whole number from {minimum} to {maximum_text or maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(rule)
    return int(value)


def optional_whole_number(value: object, minimum: int = 0, maximum: int | None = None, maximum_text: str | None = None) -> int | None:
    """None as it is, else `whole_number`."""
    return None if value is None else whole_number(value, minimum, maximum, maximum_text)


def one_of(value: object, choices: Sequence[str]) -> str:
    """`value` when it is one of `choices`; ValueError listing them, with the close match, otherwise."""
    if isinstance(value, str) and value in choices:
        return value
    hint = did_you_mean(value, choices) if isinstance(value, str) else ""
    raise ValueError(f"choose {', '.join(choices[:-1])} or {choices[-1]}{hint}" if len(choices) > 1 else f"must be {choices[0]}")


def shown(value: object) -> str:
    """A value as an error message quotes it: numbers as typed (`5`, not `np.int64(5)`), anything else by repr."""
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def whole_numbers(given: Mapping[str, tuple[object, ...]], error: Callable[[str], Exception]) -> dict[str, int | None]:
    """Each option's `(value, minimum[, maximum, maximum_text])` checked by `whole_number`, None kept, as ints by
    option name; `error("--option VALUE: rule")` raised for the first value that breaks its rule."""
    checked: dict[str, int | None] = {}
    for option, (value, *rule) in given.items():
        try:
            checked[option] = optional_whole_number(value, *rule)
        except ValueError as exc:
            raise error(f"{option} {shown(value)}: {exc}") from None
    return checked
