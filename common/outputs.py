"""Output locations checked before any model loads: a folder that cannot be written fails in a second.

Without this a run discovers that `--output_dir` names a file, or sits on a read-only disk, only when
it writes its first result: after loading every model, or (evaluation) after computing every score.
Nothing is created here; writability is probed with a temporary file that is removed at once, which
is the only test that also holds for root, ACLs and read-only mounts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.errors import BadInputError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe_writable(folder: Path, flag: str, path: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write_probe."):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise BadInputError(f"{flag} {path}: cannot write in {folder} ({reason})") from None


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """`path` is a writable folder or can be created as one (its nearest existing ancestor is a writable folder)."""
    path = Path(path)
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"lies under the file {existing}"
        raise BadInputError(f"{flag} {path} {where}; expected a folder")
    _probe_writable(existing, flag, path)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """`path` can be (re)placed atomically: it is not a folder and its folder is writable or creatable."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{flag} {path} is a folder; expected a file path")
    check_output_dir(path.parent, flag)
    return path
