"""Session fixtures over the tiny DreamBench metric models of `stand_ins.metric_models`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stand_ins.metric_models import save_tiny_clip_archive, save_tiny_dino


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip_archive(tmp_path_factory.mktemp("tiny_clip") / "tiny-clip.pt")


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dino(tmp_path_factory.mktemp("tiny_dino") / "dino-vits16")
