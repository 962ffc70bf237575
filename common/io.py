"""Atomic output files and checksums.

Outputs are written to a temporary file in the destination folder and renamed into place, so a
run that is killed midway never leaves a truncated image, JSON or checkpoint that a later resumed
run would mistake for finished work. A temporary file's name carries its writer's pid and host, so a
resumed run removes only the orphans of dead processes, never the files another live run is writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import WriteError

logger = logging.getLogger(__name__)
_TEMP_OWNER = re.compile(r"\.pid(?P<pid>\d+)@(?P<host>[^.]*)\.[^.]*\.tmp")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.pid{os.getpid()}@{_host()}."


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the file-size limit `ulimit -f`, or the file system's maximum)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
#: How torch's and safetensors' writers report a failed write: without an errno, so the cause is diagnosed.
_LIBRARY_WRITE_FAILURES = re.compile(
    r"iostream error|file write failed|PytorchStreamWriter failed|inline_container.cc.*unexpected pos|File too large|No space left|I/O error"
)


def _diagnose(path: Path, written: Path | None) -> str:
    """The likely cause of a write that failed without an errno: the file-size limit, a full disk, or unknown."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and written is not None and written.exists() and written.stat().st_size >= limit - (1 << 16):
        return _CAUSES[errno.EFBIG]
    folder = next((parent for parent in (path, *path.parents) if parent.exists()), Path("."))
    if shutil.disk_usage(folder).free < (1 << 20):
        return _CAUSES[errno.ENOSPC]
    return "the write failed (disk full, file-size limit or I/O error)"


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike, written: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a failed write of `path` into a one-line `WriteError` naming it and the cause.

    `written` is the file actually being written (a temporary sibling), used to tell a file-size
    limit from other failures when the library reports none. Errors that are not write failures
    keep their traceback.
    """
    path = Path(path)
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        cause = _CAUSES.get(error.errno, error.strerror or str(error))
        raise WriteError(f"cannot write {path}: {cause}") from error
    except Exception as error:
        if not _LIBRARY_WRITE_FAILURES.search(str(error)):
            raise
        os_error = re.search(r"os error (\d+)", str(error))  # safetensors passes the errno on in its message
        if os_error:
            cause = _CAUSES.get(int(os_error[1]), os.strerror(int(os_error[1])))
        else:
            cause = _diagnose(path, Path(written) if written else None)
        raise WriteError(f"cannot write {path}: {cause}") from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed.

    A failed write (no space, file too large, name too long...) is a one-line `WriteError`.
    """
    path = Path(path)
    with reporting_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp" + path.suffix)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with reporting_write_errors(path, tmp_path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and move the result to `path` only if it returned normally."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def atomic_save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def temp_file_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) of the process that created an `atomic_path` temporary file; None for an untagged name."""
    match = _TEMP_OWNER.search(path.name)
    return None if match is None else (int(match["pid"]), match["host"])


def is_orphan_temp_file(path: Path) -> bool:
    """True unless a live process (this one included) or a process on another host may still write it.

    Untagged names (written before the pid tag existed) count as orphans; another host's files are
    kept, since its processes cannot be checked from here.
    """
    owner = temp_file_owner(path)
    if owner is None:
        return True
    pid, host = owner
    return host == _host() and pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temp_files(output_dir: str | os.PathLike, folders: Iterable[str], suffix: str = ".png") -> list[Path]:
    """Delete the temporary `suffix` files (`"*"`: any) that dead runs left in the given sub-folders of `output_dir`.

    `atomic_path` names its temporary files `.<name>.pid<pid>@<host>.<random>.tmp<suffix>`. Files of a
    live process are kept and reported: another run is writing to this folder.
    """
    removed, live = [], []
    for folder in folders:
        directory = Path(output_dir) / folder
        if directory.is_dir():
            for path in sorted(directory.glob(f".*.tmp{suffix}")):
                if is_orphan_temp_file(path):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                else:
                    live.append(path)
    if live:
        owners = sorted({"pid {}@{}".format(*temp_file_owner(path)) for path in live})
        logger.warning(
            f"kept {len(live)} temporary file(s) in {output_dir} being written by {', '.join(owners)}: another run is writing to this folder"
        )
    return removed
