"""Session fixtures over the tiny SD 1.5 + IP-Adapter-Plus stand-ins of `stand_ins.sd15`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stand_ins.sd15 import SD15Paths, save_sd15_models


@pytest.fixture(scope="session")
def tiny_sd15_models(tmp_path_factory: pytest.TempPathFactory) -> SD15Paths:
    return save_sd15_models(tmp_path_factory.mktemp("tiny_sd15_models"))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tiny_sd15_models: SD15Paths) -> Path:
    return tiny_sd15_models.sd15_dir


@pytest.fixture(scope="session")
def tiny_sd15_image_encoder_dir(tiny_sd15_models: SD15Paths) -> Path:
    return tiny_sd15_models.image_encoder_dir


@pytest.fixture(scope="session")
def tiny_sd15_ip_ckpt(tiny_sd15_models: SD15Paths) -> Path:
    return tiny_sd15_models.ip_ckpt
