"""Registers the tiny-model fixture kit (tests/kit) for every test module."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

from tests.kit.sdxl import *  # noqa: E402,F401,F403
from tests.kit.vit_models import *  # noqa: E402,F401,F403
from tests.kit.metric_models import *  # noqa: E402,F401,F403
from tests.kit.pairs import *  # noqa: E402,F401,F403
