"""Session fixtures over the tiny SDXL + IP-Adapter-Plus stand-ins of `ip_adapter.random_models`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ip_adapter.random_models import ModelPaths as TinyModels
from ip_adapter.random_models import build_clip_tokenizer  # noqa: F401  (re-exported for test modules)
from ip_adapter.random_models import build_image_encoder as build_tiny_image_encoder  # noqa: F401
from ip_adapter.random_models import build_resampler as build_tiny_resampler  # noqa: F401
from ip_adapter.random_models import build_sdxl_pipeline as build_tiny_sdxl_pipeline  # noqa: F401
from ip_adapter.random_models import load_pipeline as load_tiny_pipeline  # noqa: F401
from ip_adapter.random_models import save_random_models
from ip_adapter.random_models import write_ip_checkpoint as write_tiny_ip_checkpoint  # noqa: F401


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return save_random_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_models: TinyModels) -> Path:
    return tiny_models.sdxl_dir


@pytest.fixture(scope="session")
def tiny_image_encoder_dir(tiny_models: TinyModels) -> Path:
    return tiny_models.image_encoder_dir


@pytest.fixture(scope="session")
def tiny_ip_ckpt(tiny_models: TinyModels) -> Path:
    return tiny_models.ip_ckpt
