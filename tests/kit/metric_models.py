"""Session fixtures over the tiny DreamBench metric models of `dreambench.random_models`."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambench.random_models import build_tiny_clip_archive, build_tiny_dino_dir

__all__ = ["build_tiny_clip_archive", "build_tiny_dino_dir", "tiny_clip_path", "tiny_dino_dir"]


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip_archive(tmp_path_factory.mktemp("tiny_clip") / "tiny-clip.pt")


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dino_dir(tmp_path_factory.mktemp("tiny_dino") / "dino-vits16")
