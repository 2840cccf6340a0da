"""What every imzarr command line shares: one clear line and exit code 2 for user errors."""

from __future__ import annotations

import sys
from typing import Callable

from schemas.errors import ImzarrError


def run_cli(prog: str, body: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command body; an ImzarrError or one of `user_errors` becomes `prog: error: message` and exit 2."""
    try:
        return int(body() or 0)
    except (ImzarrError, *user_errors) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
