"""Base-model families: the one place that knows SDXL, SD 1.5 and FLUX.1 apart (see `family.BaseModelFamily`).

`family_of(model)` reads the `_class_name` of the pipeline folder's (or Hugging Face id's)
`model_index.json`, so every script takes the same flags whatever the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import BadInputError
from common.hub import is_local, resolve_file

from .family import BaseModelFamily, Objective, TrainableAdapter
from .flux import FluxFamily
from .sd15 import SD15
from .sdxl import SDXL

#: `model_index.json` `_class_name` -> family.
FAMILIES: dict[str, type[BaseModelFamily]] = {family.pipeline_class_name: family for family in (SDXL, SD15, FluxFamily)}


def supported() -> str:
    return ", ".join(f"{cls.name} ({name})" for name, cls in FAMILIES.items())


def family_of(
    model: str | os.PathLike,
    flag: str = "--pretrained_model_name_or_path",
    revision: str | None = None,
    official_time_ids: bool = False,
    flow_matching: Mapping[str, Any] | None = None,
) -> BaseModelFamily:
    """The family of a diffusers pipeline folder or Hugging Face id, from its model_index.json.

    `flow_matching`: the flow-matching flags given (FLUX's; refused for a UNet family)."""
    index = Path(model) / "model_index.json" if is_local(model) else resolve_file(f"{model}/model_index.json", flag, revision)
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except FileNotFoundError:
        raise BadInputError(
            f"{flag} {model}: no model_index.json; expected a diffusers pipeline folder (save_pretrained) of {supported()}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise BadInputError(
            f"{flag} {model}: model_index.json is unreadable ({type(error).__name__}); expected a diffusers pipeline's"
        ) from None
    if class_name not in FAMILIES:
        raise BadInputError(f"{flag} {model}: a {class_name} pipeline is not supported; supported: {supported()}")
    family = FAMILIES[class_name]().with_flow_matching(flow_matching or {})
    return family.with_official_time_ids() if official_time_ids else family


__all__ = ["FAMILIES", "SD15", "SDXL", "BaseModelFamily", "FluxFamily", "Objective", "TrainableAdapter", "family_of"]
