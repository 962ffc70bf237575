"""Guards of the method: each test fails when the behaviour it names is broken.

They run the real pieces (PairDataset, training_step, train_patchdpo.main, ssl_train.main) on the
tiny models and watch what reaches the loss or the model, rather than re-deriving it with the
code under test. The mutation each one catches is listed in ARCHITECTURE.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch.utils.data import default_collate

import patchdpo.method
import train_patchdpo
from base_models.unet_family import DDPMObjective
from common.training_state import TRAINING_STATE_DIR
from patch_quality.ssl_train import FINETUNED_NAME
from patch_quality.ssl_train import main as ssl_main
from patch_quality.store import QualityMaps
from patchdpo.method import EncodedPairs, Method, training_step
from patchdpo.models import ADAPTER_STATE_NAME, IPAdapterTrainingModel, load_training_models
from patchdpo.pair_dataset import EncoderInputs, PairDataset, index_pairs
from tests.test_patch_quality_ssl_train import ssl_cli_args, texture_folder
from tests.test_train_patchdpo import LATENT, RESOLUTION, train_args

# stand_ins.pairs: references are RESOLUTION square, generated images RESOLUTION + 8 wide; (H, W) per latent row.
REFERENCE_HW, GENERATED_HW = (32.0, 32.0), (32.0, 40.0)


@pytest.fixture()
def loaded(tiny_models):
    return load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)


@pytest.fixture()
def loss_inputs(monkeypatch) -> list[dict]:
    """Every call of the training step's `compute_loss`: its prediction, target and quality maps."""
    calls: list[dict] = []
    real = patchdpo.method.compute_loss

    def spy(mode, pred, target, **kwargs):
        calls.append({"pred": pred.detach().clone(), "target": target.detach().clone(), **kwargs})
        return real(mode, pred, target, **kwargs)

    monkeypatch.setattr(patchdpo.method, "compute_loss", spy)
    return calls


@pytest.fixture()
def unet_time_ids(monkeypatch) -> list[torch.Tensor]:
    """The SDXL time ids of every forward pass of the training model."""
    seen: list[torch.Tensor] = []
    real = IPAdapterTrainingModel.forward

    def spy(self, noisy_latents, timesteps, image_features, prompt_embeds, added):
        seen.append(added["time_ids"].detach().clone())
        return real(self, noisy_latents, timesteps, image_features, prompt_embeds, added)

    monkeypatch.setattr(IPAdapterTrainingModel, "forward", spy)
    return seen


def train(models, data, out: Path, *extra: str, steps: int = 1) -> Path:
    """`train_patchdpo.main` with PatchDPO's loss on the tiny models: `steps` steps of 2 pairs."""
    train_patchdpo.main(train_args(models, data, out, "--use_dpo_loss", "True", *extra, steps=steps))
    return out


def checkpoints(out: Path) -> set[str]:
    return {path.name for path in out.glob("checkpoint-*")}


# ----------------------------------------------------------------------------------------------
# What the loss sees


def test_asymmetric_quality_maps_reach_the_loss_in_their_roles(loaded, tiny_pair_data, loss_inputs):
    """Real dataset -> real step: `1 - M_ref` weighs the reference half, `M_gen` the generated half."""
    maps = QualityMaps.load(tiny_pair_data.quality_file)
    pairs = index_pairs(tiny_pair_data.root, maps, 1, LATENT)
    dataset = PairDataset(pairs, LATENT, 42, EncoderInputs(RESOLUTION, loaded.family, loaded.encoders.tokenizers), maps)
    rows = (3, 1)
    batch = default_collate([dataset[(index, 0)] for index in rows])
    cond = EncodedPairs.from_batch(batch, loaded.encoders)
    # The latent batch is [references; generated]: the first half is the reference images.
    torch.testing.assert_close(cond.latents[: len(rows)], loaded.encoders.latents(batch["reference_pixels"]))

    # A nearly noise-free schedule: the two halves' errors then differ clearly (at SDXL's noise levels the
    # tiny UNet barely sees the image, and giving a half the other half's weights would hide in rounding).
    scheduler = DDPMScheduler.from_config(loaded.objective.scheduler.config, beta_start=1e-5, beta_end=1e-4, beta_schedule="linear")
    output = training_step(loaded.model, cond, Method("patch_dpo", DDPMObjective(scheduler, loaded.model_dir), RESOLUTION))

    (seen,) = loss_inputs
    expected_ref = torch.stack([maps.get(pairs[index].sample, 0)[0] for index in rows])
    expected_gen = torch.stack([maps.get(pairs[index].sample, 0)[1] for index in rows])
    assert not torch.allclose(expected_ref, expected_gen)  # asymmetric, so a swap shows
    assert torch.equal(seen["reference_map"], expected_ref)
    assert torch.equal(seen["generated_map"], expected_gen)
    error = (seen["pred"] - seen["target"]).square()

    def weighted(first_half: torch.Tensor, second_half: torch.Tensor) -> torch.Tensor:
        return (torch.cat([first_half, second_half]).unsqueeze(1) * error).mean()

    right = weighted(1 - expected_ref, expected_gen)
    torch.testing.assert_close(output.loss, right, rtol=1e-6, atol=0)
    for wrong in (
        weighted(1 - expected_gen, expected_ref),
        weighted(expected_gen, 1 - expected_ref),
        weighted(expected_ref, 1 - expected_gen),
    ):
        assert abs(wrong - right) > 1e-4 * right  # each role mix-up gives another loss, so the check above can fail


def test_official_time_ids_reach_the_unet(tiny_models, tiny_pair_data, tmp_path, unet_time_ids):
    r = float(RESOLUTION)
    train(tiny_models, tiny_pair_data, tmp_path / "per_image")
    (per_image,) = unet_time_ids
    expected = torch.tensor([[*REFERENCE_HW, 0, 0, r, r]] * 2 + [[*GENERATED_HW, 0, 0, r, r]] * 2)
    torch.testing.assert_close(per_image, expected)

    train(tiny_models, tiny_pair_data, tmp_path / "official", "--official_time_ids")
    official = unet_time_ids[1]
    # The reference code's (B, 6, 2) tensor read six numbers per latent row: pair 0 fills rows 0-1, pair 1 rows 2-3.
    scrambled = [[*REFERENCE_HW, *GENERATED_HW, 0, 0], [0, 0, r, r, r, r]] * 2
    torch.testing.assert_close(official, torch.tensor(scrambled))


def test_noise_offset_shifts_each_channel_of_the_noise(tiny_models, tiny_pair_data, tmp_path, loss_inputs):
    train(tiny_models, tiny_pair_data, tmp_path / "plain")
    train(tiny_models, tiny_pair_data, tmp_path / "offset", "--noise_offset", "0.5")
    plain, offset = (call["target"] for call in loss_inputs)
    shift = offset - plain
    assert shift.abs().amax() > 0.05
    # One offset per (pair, channel): constant over the latent grid and shared by the pair's two halves.
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    torch.testing.assert_close(shift[:2], shift[2:])
    assert shift[:2, :, 0, 0].unique().numel() == shift[:2, :, 0, 0].numel()


def test_v_prediction_targets_the_velocity(loaded, tiny_pair_data, loss_inputs):
    """With a v-prediction scheduler the target is sqrt(a_t) * noise - sqrt(1 - a_t) * latents, per pair."""
    pairs = index_pairs(tiny_pair_data.root, None, 1, LATENT)
    dataset = PairDataset(pairs, LATENT, 42, EncoderInputs(RESOLUTION, loaded.family, loaded.encoders.tokenizers))
    cond = EncodedPairs.from_batch(default_collate([dataset[(index, 0)] for index in (0, 1)]), loaded.encoders)
    v_scheduler = DDPMScheduler.from_config(loaded.objective.scheduler.config, prediction_type="v_prediction")
    for scheduler in (loaded.objective.scheduler, v_scheduler):  # the epsilon run gives the step's noise
        training_step(loaded.model, cond, Method("mse", DDPMObjective(scheduler, loaded.model_dir), RESOLUTION))
    noise, velocity = (call["target"] for call in loss_inputs)
    alphas = v_scheduler.alphas_cumprod
    coefficients = []
    for row in range(velocity.shape[0]):
        basis = torch.stack([noise[row].flatten(), -cond.latents[row].flatten()], dim=1).double()
        solution = torch.linalg.lstsq(basis, velocity[row].flatten().double()[:, None]).solution.flatten()
        residual = basis @ solution - velocity[row].flatten().double()
        assert residual.abs().max() < 1e-4
        coefficients.append(solution.float())
    a, s = torch.stack(coefficients).T
    assert (s > 1e-3).all() and (a > 0).all()
    torch.testing.assert_close(a.square() + s.square(), torch.ones_like(a), atol=1e-4, rtol=0)
    assert all((alphas - value**2).abs().min() < 1e-4 for value in a)  # a schedule point sqrt(alpha_bar_t)
    torch.testing.assert_close(a[:2], a[2:])  # a pair's two halves share their timestep


# ----------------------------------------------------------------------------------------------
# How long training runs and what it leaves


def test_the_epoch_cap_ends_training_before_stop_step(tiny_models, tiny_pair_data, tmp_path):
    # 5 pairs at 2 per step: 2 whole steps per epoch (the incomplete last one is dropped); one epoch ends the run
    # long before --stop_step.
    out = train(tiny_models, tiny_pair_data, tmp_path / "run", "--num_train_epochs", "1", "--save_steps", "100", steps=100)
    assert checkpoints(out) == {"checkpoint-2"}


def test_the_final_step_is_saved_with_the_final_weights(tiny_models, tiny_pair_data, tmp_path):
    out = train(tiny_models, tiny_pair_data, tmp_path / "run", "--save_steps", "2", "--checkpointing_steps", "3", steps=3)
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-3"}
    final = torch.load(out / "checkpoint-3" / "model.bin", map_location="cpu", weights_only=True)["ip_adapter"]
    state = load_file(str(out / "checkpoint-3" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))
    assert all(torch.equal(final[key], state[f"ip_adapter.{key}"].half()) for key in final)
    earlier = torch.load(out / "checkpoint-2" / "model.bin", map_location="cpu", weights_only=True)["ip_adapter"]
    assert not all(torch.equal(final[key], earlier[key]) for key in final)


# ----------------------------------------------------------------------------------------------
# ssl_train: a resumed run is the same run


def test_ssl_train_resumed_2_plus_2_steps_equals_4_straight_steps(tmp_path, tiny_dinov2_dir):
    images = texture_folder(tmp_path / "images", 9)  # 3 held out, 6 trained at 2 per step: 3 batches per epoch

    def run(out: Path, steps: int, *extra: str) -> None:
        ssl_main(ssl_cli_args(tiny_dinov2_dir, images, out, "--learning_rate", "1e-3", "--max_train_steps", str(steps), *extra))

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)  # the second half resumes inside epoch 0 (skips 2 batches) and crosses into epoch 1
    run(tmp_path / "resumed", 4, "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "1")
    straight = load_file(str(tmp_path / "straight" / FINETUNED_NAME))
    resumed = load_file(str(tmp_path / "resumed" / FINETUNED_NAME))
    halfway = load_file(str(tmp_path / "resumed" / "checkpoint-2" / TRAINING_STATE_DIR / FINETUNED_NAME))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert not all(torch.equal(straight[key], halfway[key]) for key in straight)
