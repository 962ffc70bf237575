"""Session fixtures over the tiny SDXL + IP-Adapter-Plus stand-ins of `stand_ins.sdxl`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stand_ins.sdxl import ModelPaths, save_sdxl_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    return save_sdxl_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_models: ModelPaths) -> Path:
    return tiny_models.sdxl_dir


@pytest.fixture(scope="session")
def tiny_image_encoder_dir(tiny_models: ModelPaths) -> Path:
    return tiny_models.image_encoder_dir


@pytest.fixture(scope="session")
def tiny_ip_ckpt(tiny_models: ModelPaths) -> Path:
    return tiny_models.ip_ckpt
