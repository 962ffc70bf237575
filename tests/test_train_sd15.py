"""train_patchdpo.py on SD 1.5 + IP-Adapter-Plus: the same command, the family read from the folder's model_index.json.

Tiny SD 1.5 stand-ins (`stand_ins.sd15`, h94's checkpoint layout) and a tiny pair folder whose quality
maps sit on SD 1.5's latent grid. Each behaviour the SDXL tests check once per run type is checked
here on SD 1.5: the three losses, bf16, `--cache_dir`, accumulation and process layout, resume after
SIGTERM, validation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_patchdpo
from common.stop_signals import STOPPED_EXIT_CODE
from common.training_state import TRAINING_STATE_DIR
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from patchdpo.models import ADAPTER_STATE_NAME
from stand_ins.pairs import save_pair_data
from tests.kit.cli import bad_input_message
from tests.kit.train_runs import launch_under_torchrun, train_stopped_by_sigterm, train_with_own_precision
from tests.test_train_patchdpo import logged
from tests.test_validation import GRID_TAG, events, validation_args

RESOLUTION, LATENT = 32, 8  # the tiny SD 1.5 VAE downsamples by 4
STEPS = 2
LR = 1e-3


@pytest.fixture(scope="module")
def sd15_pairs(tmp_path_factory):
    return save_pair_data(tmp_path_factory.mktemp("sd15_pairs"), num_samples=4, image_size=RESOLUTION, latent_size=LATENT)


def sd15_args(models, data, out: Path, *extra: str, steps: int = STEPS, batch: int = 2) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(models.sd15_dir), "--image_encoder_path", str(models.image_encoder_dir),
        "--pretrained_ip_adapter_path", str(models.ip_ckpt), "--data_root_path", str(data.root),
        "--patch_quality_file", str(data.quality_file), "--resolution", str(RESOLUTION), "--train_batch_size", str(batch),
        "--stop_step", str(steps), "--save_steps", str(steps), "--checkpointing_steps", str(steps), "--output_dir", str(out),
        "--logging_steps", "1", "--learning_rate", str(LR), *extra,
    ]  # fmt: skip


def adapter(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))


def mean_deviation(a: Path, b: Path, step: int = STEPS) -> float:
    weights_a, weights_b = adapter(a, step), adapter(b, step)
    assert weights_a.keys() == weights_b.keys()
    return torch.cat([(weights_a[k] - weights_b[k]).abs().flatten() for k in weights_a]).mean().item()


def assert_same_training(out: Path, reference: Path, rel: float = 1e-5) -> None:
    """The same losses and the same adapter up to float noise: Adam turns noise in near-zero gradients into rare
    flips of size ~lr, while another draw moves most weights by ~lr (`test_the_tolerance_separates_a_different_draw`)."""
    assert logged(out, "loss") == pytest.approx(logged(reference, "loss"), rel=rel)
    assert mean_deviation(out, reference) < LR * 1e-3


@pytest.fixture(scope="module")
def baseline(tiny_sd15_models, sd15_pairs, tmp_path_factory) -> Path:
    """PatchDPO's loss in fp32, 2 pairs per micro-batch, one process: what the other layouts must reproduce."""
    out = tmp_path_factory.mktemp("sd15_runs") / "baseline"
    train_patchdpo.main(sd15_args(tiny_sd15_models, sd15_pairs, out, "--loss", "patch_dpo"))
    return out


@pytest.mark.parametrize("loss", ["mse", "patch_dpo", "image_dpo"])
def test_each_loss_trains_the_sd15_adapter_and_saves_h94s_layout(tiny_sd15_models, sd15_pairs, tmp_path, loss):
    out = tmp_path / loss
    train_patchdpo.main(sd15_args(tiny_sd15_models, sd15_pairs, out, "--loss", loss))
    start = load_ip_adapter_checkpoint(tiny_sd15_models.ip_ckpt)
    saved = load_ip_adapter_checkpoint(out / f"checkpoint-{STEPS}" / "model.bin")
    for section in ("image_proj", "ip_adapter"):  # the public ip-adapter-plus_sd15.bin's keys and shapes
        assert {k: v.shape for k, v in saved[section].items()} == {k: v.shape for k, v in start[section].items()}
    trained = adapter(out)
    assert any(not torch.equal(trained[f"ip_adapter.{k}"], start["ip_adapter"][k]) for k in start["ip_adapter"])
    losses = logged(out, "loss")
    assert len(losses) == STEPS and all(math.isfinite(value) for value in losses)
    if loss == "image_dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # trained adapter == frozen reference at step 0


def test_cache_and_accumulation_train_the_same_adapter_and_bf16_trains(tiny_sd15_models, sd15_pairs, baseline, tmp_path):
    cached = tmp_path / "cached"
    train_patchdpo.main(sd15_args(tiny_sd15_models, sd15_pairs, cached, "--loss", "patch_dpo", "--cache_dir", str(tmp_path / "cache")))
    accumulated = tmp_path / "accumulated"
    train_patchdpo.main(
        sd15_args(tiny_sd15_models, sd15_pairs, accumulated, "--loss", "patch_dpo", "--gradient_accumulation_steps", "2", batch=1)
    )
    assert_same_training(cached, baseline)
    assert_same_training(accumulated, baseline)

    bf16 = tmp_path / "bf16"
    train_with_own_precision(sd15_args(tiny_sd15_models, sd15_pairs, bf16, "--loss", "patch_dpo", "--mixed_precision", "bf16"))
    trained = adapter(bf16)
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())  # the adapter trains in fp32 under bf16 autocast
    assert logged(bf16, "loss") == pytest.approx(logged(baseline, "loss"), rel=2e-2)  # bf16 rounding, not another training


def test_the_tolerance_separates_a_different_draw(tiny_sd15_models, sd15_pairs, baseline, tmp_path):
    """Control for `assert_same_training`: another --seed (noise, dropout, order) is far outside it."""
    train_patchdpo.main(sd15_args(tiny_sd15_models, sd15_pairs, tmp_path / "seed7", "--loss", "patch_dpo", "--seed", "7"))
    assert mean_deviation(tmp_path / "seed7", baseline) > 10 * LR * 1e-3


def test_two_processes_train_the_same_adapter_as_one(tiny_sd15_models, sd15_pairs, baseline, tmp_path):
    """Also with the frozen UNet sharded over the two processes (--shard_base, FSDP2)."""
    out, sharded = tmp_path / "two", tmp_path / "sharded"
    runs = [
        {"name": "two", "argv": sd15_args(tiny_sd15_models, sd15_pairs, out, "--loss", "patch_dpo", batch=1)},
        {"name": "sharded", "argv": sd15_args(tiny_sd15_models, sd15_pairs, sharded, "--loss", "patch_dpo", "--shard_base", batch=1)},
    ]
    result = launch_under_torchrun(runs, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_training(out, baseline)
    assert_same_training(sharded, baseline)


def test_sigterm_saves_and_the_resumed_run_equals_an_uninterrupted_one(tiny_sd15_models, sd15_pairs, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_patchdpo.main(sd15_args(tiny_sd15_models, sd15_pairs, straight, "--loss", "patch_dpo", steps=4))
    exit_code = train_stopped_by_sigterm(  # SIGTERM arrives in the middle of step 2
        monkeypatch, sd15_args(tiny_sd15_models, sd15_pairs, stopped, "--loss", "patch_dpo", steps=4)
    )
    assert exit_code == STOPPED_EXIT_CODE
    assert sorted(path.name for path in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    train_patchdpo.main(
        [*sd15_args(tiny_sd15_models, sd15_pairs, stopped, "--loss", "patch_dpo", steps=4), "--resume_from_checkpoint", "latest"]
    )
    resumed, uninterrupted = adapter(stopped, 4), adapter(straight, 4)
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


def test_validation_samples_with_the_sd15_training_models(tiny_sd15_models, sd15_pairs, tiny_clip_path, tiny_dino_dir, tmp_path):
    out = tmp_path / "validated"
    train_patchdpo.main(
        sd15_args(tiny_sd15_models, sd15_pairs, out, "--loss", "patch_dpo", *validation_args(tiny_clip_path, tiny_dino_dir))
    )
    logs = events(out)
    assert [event.step for event in logs.Images(GRID_TAG)] == [0, 2]
    assert [event.step for event in logs.Scalars("validation/clipi_score")] == [0, 2]


def test_official_time_ids_on_sd15_is_one_line(tiny_sd15_models, sd15_pairs, tmp_path):
    message = bad_input_message(train_patchdpo.main, sd15_args(tiny_sd15_models, sd15_pairs, tmp_path / "out", "--official_time_ids"))
    assert "--official_time_ids" in message and "SD 1.5" in message
