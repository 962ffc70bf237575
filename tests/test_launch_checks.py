"""A misconfigured multi-process launch is a one-line error in every script, before any work starts.

`accelerate launch --multi_gpu --num_processes 2` without GPUs sets WORLD_SIZE=2 in two processes
that accelerate runs as one process each. Here the environment says WORLD_SIZE=2 while this
process's accelerate state has one process: the same situation. Every path given is missing, so
a script that loaded anything before the check would fail with another message.
"""

from __future__ import annotations

import pytest

import inference_dreambooth
import train_patchdpo
from common.errors import BadInputError
from common.launch import check_launch
from patch_quality import maps, ssl_train
from tests.kit.cli import bad_input_message
from training_data import construct


def generator_paths(tmp_path) -> list[str]:
    return [
        "--base_model_path",
        str(tmp_path / "sdxl"),
        "--image_encoder_path",
        str(tmp_path / "enc"),
        "--ip_ckpt",
        str(tmp_path / "ip.bin"),
    ]


SCRIPTS = {
    "train_patchdpo.py": lambda tmp: (
        train_patchdpo.main,
        [
            *("--pretrained_model_name_or_path", str(tmp / "sdxl"), "--image_encoder_path", str(tmp / "enc")),
            *("--data_root_path", str(tmp / "data"), "--output_dir", str(tmp / "out")),
        ],
    ),
    "inference_dreambooth.py": lambda tmp: (
        inference_dreambooth.main,
        [*generator_paths(tmp), "--data_root", str(tmp / "dreambench"), "--output_dir", str(tmp / "out")],
    ),
    "-m training_data.construct": lambda tmp: (
        construct.main,
        [*generator_paths(tmp), "--num_samples", "2", "--output_dir", str(tmp / "out")],
    ),
    "-m patch_quality.maps": lambda tmp: (maps.main, ["--data_root", str(tmp / "data"), "--backbone", str(tmp / "dinov2")]),
    "-m patch_quality.ssl_train": lambda tmp: (
        ssl_train.main,
        ["--backbone", str(tmp / "dinov2"), "--train_data", str(tmp / "data"), "--output_dir", str(tmp / "out")],
    ),
}


@pytest.fixture()
def launched_as_two(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # else accelerate would try to join a 2-process group


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_launch_accelerate_runs_as_one_process_each_is_refused(script, tmp_path, launched_as_two):
    main, argv = SCRIPTS[script](tmp_path)
    error = bad_input_message(main, argv)
    assert "WORLD_SIZE=2" in error and "accelerate sees 1" in error, error
    assert f"ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N {script} ..." in error, error
    assert not (tmp_path / "out").exists()


def test_matching_launches_pass(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(1, "x.py")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(2, "x.py")
    with pytest.raises(BadInputError):
        check_launch(1, "x.py")
