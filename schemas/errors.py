"""Exceptions shared by every imzarr package; the CLI turns any ImzarrError into one clear line."""


class ImzarrError(Exception):
    """Base of every error imzarr reports to the user as one line (exit code 2)."""


class StoreValidationError(ImzarrError):
    """A store does not follow its contract: the message names the store and what is wrong."""
