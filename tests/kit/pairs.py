"""A tiny synthetic PatchDPO data folder for the tiny models (see `stand_ins.pairs`)."""

from __future__ import annotations

import pytest

from stand_ins.pairs import PairData, save_pair_data


@pytest.fixture(scope="session")
def tiny_pair_data(tmp_path_factory: pytest.TempPathFactory) -> PairData:
    """Five 32 px pairs for the tiny models (VAE factor 2 -> 16x16 quality maps)."""
    return save_pair_data(tmp_path_factory.mktemp("pair_data"), num_samples=5, image_size=32, latent_size=16)
