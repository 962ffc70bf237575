"""Running a script's `main` on bad input and reading its one-line `prog: error: ...` exit."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence

import pytest


def bad_input_message(main: Callable[[Sequence[str]], object], argv: Sequence[str], exit_code: int = 2) -> str:
    """The error line `main(argv)` exits with; fails unless it exits `exit_code` with exactly one line."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as raised, contextlib.redirect_stderr(stderr):
        main(list(argv))
    text = stderr.getvalue()
    assert raised.value.code == exit_code, (raised.value.code, text)
    lines = [line for line in text.splitlines() if ": error: " in line]
    assert len(lines) == 1, text
    return lines[0]
