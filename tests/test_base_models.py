"""The family is read from the pipeline folder's model_index.json; anything else is one line naming the supported ones."""

from __future__ import annotations

import json

import pytest

from base_models import SD15, SDXL, family_of
from common.errors import BadInputError


def test_the_sdxl_stand_in_is_sdxl(tiny_sdxl_dir):
    family = family_of(tiny_sdxl_dir)
    assert isinstance(family, SDXL) and not family.official_time_ids
    assert family_of(tiny_sdxl_dir, official_time_ids=True).official_time_ids


def _folder(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


def test_an_sd15_folder_is_sd15_and_has_no_time_ids(tmp_path):
    assert isinstance(family_of(_folder(tmp_path, "StableDiffusionPipeline")), SD15)
    with pytest.raises(BadInputError, match="--official_time_ids .* SD 1.5 model has no time ids"):
        family_of(tmp_path, official_time_ids=True)


def test_an_unsupported_pipeline_names_the_supported_ones(tmp_path):
    with pytest.raises(BadInputError) as error:
        family_of(_folder(tmp_path, "StableDiffusion3Pipeline"))
    message = str(error.value)
    assert "StableDiffusion3Pipeline" in message and "StableDiffusionXLPipeline" in message and "StableDiffusionPipeline" in message
    assert "\n" not in message


def test_a_folder_without_model_index_says_what_it_expected(tmp_path):
    with pytest.raises(BadInputError, match="no model_index.json; expected a diffusers pipeline folder"):
        family_of(tmp_path)
