"""Session fixtures over the tiny ViT-family backbones of `stand_ins.vit_models`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stand_ins.vit_models import save_tiny_clip_vision, save_tiny_dinov2, save_tiny_dinov2_registers, save_tiny_vit


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_dinov2_registers_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2_registers(tmp_path_factory.mktemp("tiny_dinov2_registers"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="session")
def tiny_clip_vision_dir(tmp_path_factory) -> Path:
    return save_tiny_clip_vision(tmp_path_factory.mktemp("tiny_clip_vision"))
