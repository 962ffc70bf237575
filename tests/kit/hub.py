"""An offline Hugging Face cache, in huggingface_hub's on-disk layout, holding the tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Put `files` (path in repo -> local file or folder) into `hf_home`'s cache as `repo_id` at `main`.

    The layout is what huggingface_hub writes and reads: `hub/models--org--name/refs/main` holds the
    commit, `snapshots/<commit>/` the files.
    """
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot
