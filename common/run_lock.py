"""One run per output folder: a second run into a folder another is writing stops at start-up.

Two runs into one `--output_dir` interleave their checkpoints, logs and images without a word. The
folder's owner holds an exclusive `fcntl.flock` on `<folder>/.run.lock` (the ordinary file-lock
mechanism: the kernel releases it when its holder exits or dies, so a crashed run never leaves a
stale lock behind) and writes its pid, host and start time into it, which the refused run names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.errors import BadInputError, WriteError
from common.outputs import check_output_dir

LOCK_NAME = ".run.lock"
_held: dict[Path, IO[str]] = {}  # folders this process owns, until it exits or releases them


def claim_output_dir(folder: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Own `folder` (created if needed) for the rest of this process; a one-line error if another live run owns it.

    Call it in the process that writes the folder's shared files (the main process), before loading
    any model. Claiming a folder this process already owns is a no-op.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return folder
    check_output_dir(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as error:
        raise WriteError(f"{flag} {folder}: cannot create its lock file ({error.strerror})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BadInputError(f"{flag} {folder} is in use by another run ({owner}); wait for it to finish or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    os.fsync(handle.fileno())  # visible to the other nodes of a launch (NFS writes back on fsync or close)
    _held[folder] = handle
    return folder


def release_output_dir(folder: str | os.PathLike) -> None:
    """Give up a folder claimed by `claim_output_dir` (exiting the process does the same)."""
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def holding_output_dir(folder: str | os.PathLike, owner: bool = True, flag: str = "--output_dir") -> Iterator[None]:
    """Own `folder` for the duration of the block when `owner` (the main process); the other processes only run the block."""
    if not owner:
        yield
        return
    claimed = Path(folder).resolve() in _held
    claim_output_dir(folder, flag)
    try:
        yield
    finally:
        if not claimed:
            release_output_dir(folder)
