"""What a resume compares is an allow-list: a flag is recorded only once it is named in RecordedSettings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import train_patchdpo
from patchdpo.config import TrainingConfig
from patchdpo.pair_dataset import TrainingPair
from patchdpo.run_settings import RecordedSettings, run_settings


def test_only_the_allowed_settings_are_recorded():
    config = train_patchdpo.parse_args(
        ["--pretrained_model_name_or_path", "org/model", "--image_encoder_path", "org/enc", "--data_root_path", "d"]
    )
    later = dataclasses.make_dataclass("Later", [("a_flag_added_later", int)], bases=(TrainingConfig,), frozen=True)
    args = later(**vars(config), a_flag_added_later=3)  # a new flag changes nothing a resume checks until it is added to RecordedSettings
    pairs = [TrainingPair("sample0", 0, "a dog", Path("r.png"), Path("g.png"))]
    recorded = run_settings(args, pairs, pairs_per_step=8, mixed_precision="fp16", total_steps=10, quality_maps_sha256=None)
    assert set(recorded) == set(RecordedSettings.__dataclass_fields__) - {"schedule_total_steps"}  # constant schedule
    assert "a_flag_added_later" not in recorded and "clip_model" not in recorded and "output_dir" not in recorded
    args = dataclasses.replace(args, lr_scheduler="cosine")
    assert run_settings(args, pairs, 8, "fp16", 10, None)["schedule_total_steps"] == 10
