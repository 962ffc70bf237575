"""Model arguments that take a local path or a Hugging Face id, resolved to local files in one place.

Every model flag (`--pretrained_model_name_or_path`, `--image_encoder_path`, `--ip_ckpt`,
`--patch_backbone`, `--dino_model`) accepts what `from_pretrained` accepts: an existing local path
is used as is; anything else is read as `org/name[/path/in/repo]` and fetched with huggingface_hub
into its cache (`HF_HOME`), which is also where it is found offline (`HF_HUB_OFFLINE=1`). The
loaders then only ever see local files, so their checks and error messages stay the same for both.

A value that looks like a path (`looks_local`) is never tried as an id: a mistyped
`my_run/checkpoint-30/model.bin` is one "no such local path" line naming the nearest folder that exists
and what it holds, not half a minute of network retries and a hub error. A failed hub lookup is one
`BadInputError` line naming the flag, the id and where it was looked up (the local path, the cache
folder, and huggingface.co unless offline).

huggingface_hub is imported inside the functions: the command-line scripts import this module
while building their parsers, and `--help` must not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common.errors import BadInputError


def is_local(value: str | os.PathLike) -> bool:
    """True when `value` names something on disk (then it is never read as an id)."""
    return Path(value).expanduser().exists()


WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt")
SHOWN_ENTRIES = 8  # entries of the nearest existing folder named in a "no such local path" line


def looks_local(value: str | os.PathLike) -> bool:
    """True when `value` can only mean a path: it starts with / ./ ../ or ~, has a backslash, its first part
    exists here, or it names a weights file in a folder that exists. Such a value is never tried as a hub id."""
    text = str(value)
    if text.startswith(("/", "~", ".")) or "\\" in text:
        return True
    path = Path(text)
    return Path(path.parts[0]).exists() or (path.suffix in WEIGHT_SUFFIXES and path.parent.is_dir())


def no_such_path(value: str | os.PathLike, flag: str) -> BadInputError:
    """One line: `value` does not exist; the nearest folder that does, and what is in it (the likely typo is there)."""
    path = Path(value).expanduser()
    parent = next((folder for folder in path.parents if folder.is_dir()), Path("."))
    try:
        entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in parent.iterdir())
    except OSError as error:
        return BadInputError(f"{flag} {value}: no such local path (and {parent} cannot be listed: {error.strerror})")
    shown = ", ".join(entries[:SHOWN_ENTRIES]) + (f" and {len(entries) - SHOWN_ENTRIES} more" if len(entries) > SHOWN_ENTRIES else "")
    where = "the current folder" if parent == Path(".") else parent
    return BadInputError(f"{flag} {value}: no such local path; {where} holds {shown or 'nothing'}")


def split_repo_path(value: str, flag: str) -> tuple[str, str]:
    """`org/name/sub/path` -> (`org/name`, `sub/path`); the repository id is the first two parts."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if looks_local(value):
        raise no_such_path(value, flag)
    parts = [part for part in str(value).split("/") if part]
    repo_id, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BadInputError(f"{flag} {value}: no such local path, and not a Hugging Face id (org/name[/path/in/repo])") from None
    return repo_id, subpath


def _where(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants

    at = f"@{revision}" if revision else ""
    online = "offline (HF_HUB_OFFLINE=1), not online" if constants.HF_HUB_OFFLINE else "and online at huggingface.co"
    return f"looked up {repo_id}{at} as a local path, in the Hugging Face cache {constants.HF_HUB_CACHE} {online}"


def _hub_error(flag: str, value: str, repo_id: str, revision: str | None, error: Exception) -> BadInputError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub's offline message is a paragraph; ours already says where it looked.
    detail = "" if isinstance(error, LocalEntryNotFoundError) else f" ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return BadInputError(f"{flag} {value}: not found; {_where(repo_id, revision)}{detail}")


def _hub_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    return (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError, ValueError)


WEIGHT_FORMATS = ("safetensors", "bin")


def _patterns(prefix: str, components: Sequence[str] | None, variant: str | None, weight_format: str) -> list[str]:
    """The files a `from_pretrained` load reads: configs, tokenizer files, one weight format (and variant)."""
    folders = [f"{prefix}{component}/" for component in components] if components else [prefix]
    weights = f"*.{variant}.{weight_format}" if variant else f"*.{weight_format}"
    index = [f"{prefix}model_index.json"] if components else []
    return index + [folder + pattern for folder in folders for pattern in ("*.json", "*.txt", weights)]


def resolve_folder(
    value: str | os.PathLike,
    flag: str,
    revision: str | None = None,
    components: Sequence[str] | None = None,
    variant: str | None = None,
) -> Path:
    """A local model folder for a path or an id (`org/name` or `org/name/sub/folder`).

    Only what a load reads is fetched: configs, tokenizer files and one weight format, safetensors
    first and `.bin` only when the repository has no safetensors (`variant`: those weight files
    only); `components` names the sub-folders of a diffusers pipeline.
    """
    if is_local(value):
        return Path(value).expanduser()
    from huggingface_hub import snapshot_download

    repo_id, subpath = split_repo_path(str(value), flag)
    prefix = f"{subpath}/" if subpath else ""
    for weight_format in WEIGHT_FORMATS:
        try:
            snapshot = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=_patterns(prefix, components, variant, weight_format))
            )
        except _hub_errors() as error:
            raise _hub_error(flag, str(value), repo_id, revision, error) from None
        folder = snapshot / subpath
        if any(folder.rglob(f"*.{weight_format}")):
            break
    if not folder.is_dir():
        raise BadInputError(f"{flag} {value}: {repo_id} has no folder {subpath!r}; {_where(repo_id, revision)}")
    return folder


def resolve_file(value: str | os.PathLike, flag: str, revision: str | None = None) -> Path:
    """A local file for a path or `org/name/path/in/repo.ext` (one file of a repository)."""
    if is_local(value):
        return Path(value).expanduser()
    from huggingface_hub import hf_hub_download

    repo_id, filename = split_repo_path(str(value), flag)
    if not filename:
        raise BadInputError(f"{flag} {value}: expected a local file or REPO_ID/path/in/repo (e.g. h94/IP-Adapter/sdxl_models/x.bin)")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except _hub_errors() as error:
        raise _hub_error(flag, str(value), repo_id, revision, error) from None


def recorded_name(value: str | os.PathLike) -> str:
    """How a run records a model argument: an absolute path for a local one, the id as given otherwise."""
    return str(Path(value).expanduser().resolve()) if is_local(value) else str(value)
