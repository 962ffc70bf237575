"""Small helpers every script needs: atomic output files, checksums, boolean flags.

Outputs are written to a temporary file in the destination folder and renamed into place, so a
run that is killed midway never leaves a truncated image, JSON or checkpoint that a later resumed
run would mistake for finished work.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from `parts` that is the same in every process and Python run.

    Python's `hash()` of a string is salted per process, so seeding from it would make images depend
    on which worker generated them; sha256 of the parts' text does not.
    """
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def str2bool(value: str | bool) -> bool:
    """argparse type for the official scripts' `--flag True/False` style switches."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean word (true/false), got {value!r}")


@contextlib.contextmanager
def exit_on_bad_input(program: str) -> Iterator[None]:
    """Turn the one-line bad-input errors our modules raise into `program: error: ...` and exit 1.

    A researcher launching a multi-GPU job wants the reason, not a traceback from every process.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"{program}: error: {error}")

