"""Atomic output files and checksums.

Outputs are written to a temporary file in the destination folder and renamed into place, so a
run that is killed midway never leaves a truncated image, JSON or checkpoint that a later resumed
run would mistake for finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
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


def remove_stale_temp_files(output_dir: str | os.PathLike, folders: Iterable[str], suffix: str = ".png") -> list[Path]:
    """Delete the temporary `suffix` files a killed run left behind in the given sub-folders of `output_dir`.

    `atomic_path` names its temporary files `.<name>.<random>.tmp<suffix>`.

    Only call this while no process is writing: a live writer's temporary file matches the pattern too.
    """
    removed = []
    for folder in folders:
        directory = Path(output_dir) / folder
        if directory.is_dir():
            for path in sorted(directory.glob(f".*.tmp{suffix}")):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
