"""Registers the tiny-model fixture kit (tests/kit) for every test module."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

from tests.kit.metric_models import *  # noqa: E402,F401,F403
from tests.kit.pairs import *  # noqa: E402,F401,F403
from tests.kit.sd15 import *  # noqa: E402,F401,F403
from tests.kit.sdxl import *  # noqa: E402,F401,F403
from tests.kit.vit_models import *  # noqa: E402,F401,F403


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models on a 2-core box: a second intra-op thread only adds contention (up to 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
