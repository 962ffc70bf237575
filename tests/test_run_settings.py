"""What a resume compares is an allow-list: a flag is recorded only once it is named in RecordedSettings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import train_patchdpo
from common.errors import BadInputError
from common.flags import PAPER_DINO_MODEL
from common.training_state import SETTINGS_NAME
from patchdpo.config import TrainingConfig
from patchdpo.pair_dataset import TrainingPair
from patchdpo.run_settings import RecordedSettings, check_resume_settings, run_settings


def test_only_the_allowed_settings_are_recorded():
    config = train_patchdpo.parse_args(
        ["--pretrained_model_name_or_path", "org/model", "--image_encoder_path", "org/enc", "--data_root_path", "d"]
    )
    later = dataclasses.make_dataclass("Later", [("a_flag_added_later", int)], bases=(TrainingConfig,), frozen=True)
    args = later(**vars(config), a_flag_added_later=3)  # a new flag changes nothing a resume checks until it is added to RecordedSettings
    pairs = [TrainingPair("sample0", 0, "a dog", Path("r.png"), Path("g.png"))]
    recorded = run_settings(args, pairs, pairs_per_step=8, mixed_precision="fp16", total_steps=10, quality_maps_sha256=None)
    # constant schedule; a UNet family records no objective settings (a FLUX run records its flow matching's)
    assert set(recorded) == set(RecordedSettings.__dataclass_fields__) - {"schedule_total_steps", "objective"}
    assert "a_flag_added_later" not in recorded and "clip_model" not in recorded and "output_dir" not in recorded
    args = dataclasses.replace(args, lr_scheduler="cosine")
    assert run_settings(args, pairs, 8, "fp16", 10, None)["schedule_total_steps"] == 10
    assert run_settings(args, pairs, 8, "fp16", 10, None, {"guidance_scale": 3.5})["objective"] == {"guidance_scale": 3.5}


#: What the trainer before the allow-list (912290d) recorded beyond it: every flag not deemed free.
OLDER_KEYS = {"clip_model": "org/clip", "dino_model": None}


def test_a_state_of_an_older_version_resumes_and_its_extra_keys_are_free(tmp_path):
    """A state saved before `RecordedSettings` also holds keys this version does not record (e.g. the validation models):
    they may differ now; a recorded setting may not."""
    pairs = [TrainingPair("sample0", 0, "a dog", Path("r.png"), Path("g.png"))]
    config = train_patchdpo.parse_args(REQUIRED)
    now = run_settings(config, pairs, pairs_per_step=8, mixed_precision="fp16", total_steps=10, quality_maps_sha256=None)
    state = tmp_path / "training_state"
    state.mkdir()
    (state / SETTINGS_NAME).write_text(json.dumps({**now, **OLDER_KEYS}))
    assert check_resume_settings(state, now, allowed=()) == []
    (state / SETTINGS_NAME).write_text(json.dumps({**now, **OLDER_KEYS, "learning_rate": 1.0}))
    with pytest.raises(BadInputError, match="learning_rate: recorded 1.0"):
        check_resume_settings(state, now, allowed=())


REQUIRED = ["--pretrained_model_name_or_path", "org/model", "--image_encoder_path", "org/enc", "--data_root_path", "d"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--image_drop_rate", "0.5", "--text_drop_rate", "0.4", "--both_drop_rate", "0.2"), "dropout rates must be >= 0 and sum to <= 1"),
        (("--text_drop_rate", "-0.1"), "--text_drop_rate must be finite and >= 0 and <= 1, got -0.1"),
        (("--validation_data_root", "db"), "--validation_data_root needs --pretrained_ip_adapter_path"),
        (("--resolution", "0"), "--resolution must be >= 1"),
        (("--logit_std", "0"), "--logit_std must be > 0, got 0.0"),
        (("--shard_base", "--validation_data_root", "db", "--pretrained_ip_adapter_path", "ip.bin"), "--shard_base: validation"),
    ],
)
def test_every_flag_check_answers_before_anything_loads(tmp_path, capsys, extra, message):
    """`TrainingConfig.checked` holds every check of a flag's value; the script reports it as one line and exits 2."""
    with pytest.raises(SystemExit) as raised:
        train_patchdpo.main([*REQUIRED, "--output_dir", str(tmp_path / "out"), *extra])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train_patchdpo.py: error: ") and message in err and err.count("\n") == 1


def test_the_logged_hyperparameters_are_the_flags_in_order_with_the_loss_and_metric_models_resolved():
    argv = [*REQUIRED, "--use_dpo_loss", "True", "--patch_quality_file", "q", "--pretrained_ip_adapter_path", "ip.bin"]
    argv += ["--validation_data_root", "db", "--clip_model", "org/clip"]
    flags = vars(train_patchdpo.build_parser().parse_args(argv))
    flags.update(loss="patch_dpo", dino_model=PAPER_DINO_MODEL)
    expected = {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in flags.items()}
    hyperparameters = train_patchdpo.parse_args(argv).hyperparameters()
    assert list(hyperparameters.items()) == list(expected.items())
    assert train_patchdpo.parse_args(REQUIRED).dino_model is None  # no validation: no metric model is filled in
