"""The one root of every error imzarr raises on purpose; the CLI turns each into one clear line.

`exit_code` says what kind of error it is to a shell: 2 for bad input or options (the user can fix the
command), 1 for a run that failed (a writer holds the store, values failed a check, the disk is full).
"""


class ImzarrError(Exception):
    """Base of every error imzarr reports to the user as one line; exit code 2 (bad input)."""

    exit_code = 2


class RunFailedError(ImzarrError):
    """The inputs were acceptable but the run could not finish; exit code 1."""

    exit_code = 1


class StoreValidationError(ImzarrError):
    """A store does not follow its contract: the message names the store and what is wrong."""


class StoreLockedError(RunFailedError):
    """Another live process is writing the same store."""
