"""Output folders that record the settings they were made with, and refuse to be resumed with others.

A resumed run adds files to a folder that may already hold thousands; with other settings (another
checkpoint, seed, scale...) the folder would silently mix two experiments. Each writer records its
settings in a JSON file there, and a later run compares before it writes anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.errors import BadInputError


def read_recorded(path: str | os.PathLike, what: str) -> dict[str, Any] | None:
    """The JSON object at `path`, or None for a folder no run has claimed yet; `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: unreadable {what} ({type(exc).__name__}); fix or delete it, or use a new --output_dir") from None
    if not isinstance(recorded, dict):
        raise BadInputError(f"{path}: expected a JSON object, got {type(recorded).__name__}")
    return recorded


def refuse_other_settings(
    path: str | os.PathLike,
    recorded: Mapping[str, Any],
    now: Mapping[str, Any],
    keys: Iterable[str],
    what: str = "settings",
    other_differences: Iterable[str] = (),
) -> None:
    """Fail, naming every difference, unless `now` matches `recorded` on `keys` (and nothing else differs)."""
    differences = [f"{key}: recorded {recorded.get(key)!r}, now {now[key]!r}" for key in keys if recorded.get(key) != now[key]]
    differences += list(other_differences)
    if differences:
        raise BadInputError(
            f"{path} was written with other {what} ({'; '.join(differences)}); rerun with the recorded settings or use a new --output_dir"
        )
