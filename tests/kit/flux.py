"""Session fixtures over the tiny FLUX.1-dev + XLabs IP-Adapter stand-ins of `stand_ins.flux`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stand_ins.flux import FluxModelPaths, save_flux_models


@pytest.fixture(scope="session")
def tiny_flux_models(tmp_path_factory: pytest.TempPathFactory) -> FluxModelPaths:
    return save_flux_models(tmp_path_factory.mktemp("tiny_flux_models"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tiny_flux_models: FluxModelPaths) -> Path:
    return tiny_flux_models.flux_dir


@pytest.fixture(scope="session")
def tiny_flux_image_encoder_dir(tiny_flux_models: FluxModelPaths) -> Path:
    return tiny_flux_models.image_encoder_dir


@pytest.fixture(scope="session")
def tiny_xlabs_ckpt(tiny_flux_models: FluxModelPaths) -> Path:
    return tiny_flux_models.ip_ckpt
