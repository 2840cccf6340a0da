"""One-line descriptions of where a store's values came from, for reports, figure titles and contact sheets."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

SHA_SHOWN = 12  # hex digits of a sha256 shown: enough to tell checkpoints apart at a glance


def short_sha(sha256: str | None) -> str:
    """The first SHA_SHOWN hex digits, or '?' when none was recorded."""
    return (sha256 or "?")[:SHA_SHOWN]


def describe_model(model: dict[str, Any] | None) -> str:
    """'preset tiny-random, sha256 0123456789ab, UNTRAINED (random weights)' or 'checkpoint …/x.bin, sha256 …, trained'."""
    if not model:
        return "model not recorded"
    if model.get("checkpoint"):  # a checkpoint's record also names the preset its keys match
        source = f"checkpoint {_tail(str(model['checkpoint']))}"
    elif model.get("preset"):
        source = f"preset {model['preset']}"
    else:
        source = str(model.get("name", "unnamed model"))
    trained = "trained" if model.get("trained") is True else "UNTRAINED (random weights)"
    return f"{source}, sha256 {short_sha(model.get('sha256'))}, {trained}"


def describe_sigma(sigma: Any) -> str:
    """The σ a network was conditioned on, or 'none (clean images)' where none was (a feature network)."""
    return "none (clean images)" if sigma is None else str(sigma)


def _tail(path: str, parts: int = 2) -> str:
    """The last path components: checkpoint folders are long, the end names them."""
    pieces = PurePath(path).parts
    return path if len(pieces) <= parts else "…/" + "/".join(pieces[-parts:])
