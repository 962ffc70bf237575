"""A first GPU run rehearsed on the CPU: the training step, validation sampling and generation on fake CUDA tensors.

Every module is loaded as a run loads it, then placed on device `cuda` under `FakeTensorMode`
(`common.fake_cuda`); the code under test runs unchanged, so a tensor it creates on the CPU next to
a CUDA one raises the device-mismatch error a GPU would. What stays off the device, and why:

* `noise_seed`: accelerate moves it to the GPU too, where `.tolist()` reads it back; a fake tensor has
  no values to read, so the rehearsal keeps the real seeds on the CPU;
* the backward pass: torch's autograd engine asks the CUDA driver for its streams before running a
  fake CUDA graph, so only the forward pass and the loss are rehearsed (backward ops run on the
  devices of the forward's tensors).
"""

from __future__ import annotations

import time

import pytest
import torch
from accelerate import Accelerator
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
from torch.utils.data import default_collate

import train_patchdpo
from base_models import family_of
from base_models.flow_matching import FlowMatchingObjective
from base_models.unet_family import DDPMObjective
from common.fake_cuda import CUDA, cuda_autocast, fake_mode, place, scheduler_on_host
from common.flags import LOSS_MODES
from dreambench.data import load_conditioning_images
from dreambench.generation import build_items
from dreambench.validation import TrainingValidation
from ip_adapter import flux_generation
from ip_adapter.batch_generation import SubjectTokens, generate_batch
from patch_quality.store import QualityMaps
from patchdpo.loop import frozen_forward
from patchdpo.method import EncodedPairs, Method, training_step
from patchdpo.models import TrainingModels, frozen_adapter_copy, load_training_models
from patchdpo.pair_dataset import EncoderInputs, PairDataset, index_pairs
from tests.kit.flux import *  # noqa: F401,F403
from tests.test_validation import DREAMBENCH, validation_args

LATENT = 16  # the tiny pair data's quality maps
#: Every family the trainer supports: its tiny stand-in fixture, the resolution whose latents are 16 x 16, its objective,
#: and the shape of a generation batch's two latents (FLUX's come packed: 2x2 positions x 4 channels a token).
FAMILIES = {
    "sdxl": ("tiny_models", 32, DDPMObjective, (2, 4, LATENT, LATENT)),
    "sd15": ("tiny_sd15_models", 64, DDPMObjective, (2, 4, LATENT, LATENT)),
    "flux": ("tiny_flux_models", 128, FlowMatchingObjective, (2, (LATENT // 2) ** 2, 4 * 4)),
}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def one_subject_rows(monkeypatch):
    """FLUX compares its rows' image embeddings to call the pipeline once per subject: a read of values (a host sync on
    a GPU) that fake tensors cannot answer. The batches rehearsed here hold one subject ("dog"), which is what the
    comparison finds; the comparison itself is tested on real tensors (tests/test_flux_generation.py)."""
    monkeypatch.setattr(flux_generation, "runs_of_equal_rows", lambda rows: [(0, rows.shape[0])])


def place_on_fake_cuda(models: TrainingModels) -> TrainingModels:
    """The training models, loaded as a run loads them, placed on fake CUDA (call in the mode)."""
    encoders = models.encoders
    for module in (models.model, encoders.vae, encoders.image_encoder, *encoders.text_encoders):
        place(module, CUDA)
    return models


def loader_batch(models: TrainingModels, tiny_pair_data, resolution: int, size: int = 2) -> dict[str, torch.Tensor]:
    """A batch of `size` pairs as the run's dataset and loader give it (on the CPU)."""
    maps = QualityMaps.load(tiny_pair_data.quality_file)
    pairs = index_pairs(tiny_pair_data.root, maps, 1, LATENT)
    dataset = PairDataset(pairs, LATENT, 0, EncoderInputs(resolution, models.family, models.encoders.tokenizers), maps)
    return default_collate([dataset[index, 0] for index in range(size)])


def rehearse_training_steps(request, family: str, tiny_pair_data, losses: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One training step of `family` per loss in a `dtype` run, on fake CUDA; returns the losses."""
    fixture, resolution, _, _ = FAMILIES[family]
    paths = request.getfixturevalue(fixture)
    models = load_training_models(paths.base_model_dir, paths.image_encoder_dir, paths.ip_ckpt, "cpu", dtype)
    batch = loader_batch(models, tiny_pair_data, resolution)
    results = {}
    with fake_mode():
        place_on_fake_cuda(models)
        batch = {key: value if key == "noise_seed" else value.to(CUDA) for key, value in batch.items()}  # as accelerate moves it
        reference = frozen_forward(Accelerator(cpu=True), models.model, frozen_adapter_copy(models.model))
        offset = 0.05 if isinstance(models.objective, DDPMObjective) else None  # FLUX's rectified flow has no noise offset
        for loss in losses:
            method = Method(loss, models.objective, resolution, noise_offset=offset, dpo_beta=5000.0, reference_forward=reference)
            with cuda_autocast(dtype):  # what accelerate's prepared model and accelerator.autocast() run under on a GPU
                results[loss] = training_step(models.model, EncodedPairs.from_batch(batch, models.encoders), method).loss
    return results


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_training_step_runs_on_cuda(request, tiny_pair_data, family, precision):
    """Encoding the batch, the pair noise, the family's conditioning, the forward and each of the three losses, on the device."""
    started = time.perf_counter()
    results = rehearse_training_steps(request, family, tiny_pair_data, LOSS_MODES, HALF[precision])
    assert sorted(results) == sorted(LOSS_MODES)
    for loss in results.values():
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    assert time.perf_counter() - started < 120


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_cpu_tensor_made_inside_the_step_fails_the_rehearsal(request, tiny_pair_data, family, monkeypatch):
    """A mask made with `torch.zeros(n)` (no device) next to the CUDA latents: a GPU would refuse it, and so does the rehearsal."""
    objective = FAMILIES[family][2]
    real = objective.noisy

    def with_a_cpu_mask(self, latents, noise, timesteps):
        return real(self, latents, noise, timesteps) + torch.zeros(latents.shape[-1])

    monkeypatch.setattr(objective, "noisy", with_a_cpu_mask)
    with pytest.raises(FakeTensorDeviceMismatchError):
        rehearse_training_steps(request, family, tiny_pair_data, ("patch_dpo",), torch.float16)


def test_pair_noise_is_drawn_on_the_cpu_and_moved(tiny_models):
    """Each pair's noise and timestep come from a CPU generator keyed on its seed: the same numbers on any device, no CUDA generator."""
    objective = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, None, "cpu", torch.float32).objective
    seeds, shape = torch.tensor([3, 11]), torch.Size((4, 8, 8))
    noise, timesteps = objective.draw(seeds, shape, torch.device("cpu"), 0.1)
    generator = torch.Generator().manual_seed(11)
    expected = torch.randn(shape, generator=generator)
    expected += 0.1 * torch.randn((4, 1, 1), generator=generator)
    steps = objective.scheduler.config.num_train_timesteps
    assert torch.equal(noise[1], expected) and timesteps[1] == torch.randint(0, steps, (), generator=generator)
    with fake_mode():
        on_cuda, steps_on_cuda = objective.draw(seeds, shape, CUDA, None)
    assert on_cuda.device.type == steps_on_cuda.device.type == "cuda"


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_runs_on_cuda(request, family, precision, one_subject_rows):
    """One DreamBench / pair-construction generation batch (`generate_batch`): image tokens, prompts, denoising, on the device."""
    fixture, resolution, _, latent_shape = FAMILIES[family]
    paths, dtype = request.getfixturevalue(fixture), HALF[precision]
    wrapper = family_of(paths.base_model_dir).ip_adapter_class()
    pipe = wrapper.pipeline_class.from_pretrained(paths.base_model_dir, dtype=dtype, local_files_only=True)
    loaded = wrapper(pipe, paths.image_encoder_dir, paths.ip_ckpt, device="cpu")
    projection = getattr(loaded, "image_proj_model", None)  # FLUX's lives in the transformer
    with fake_mode():
        for module in (c for c in pipe.components.values() if isinstance(c, torch.nn.Module)):
            place(module, CUDA)
        if projection is not None:
            place(projection, CUDA)
        model = wrapper.around(pipe, place(loaded.image_encoder, CUDA), projection)
        tokens = SubjectTokens(model, lambda subject: load_conditioning_images(DREAMBENCH, subject, kosmosg=False))
        items = build_items({"dog": ["a dog", "a dog on the beach"]}, 0)
        with scheduler_on_host(pipe.scheduler):
            sampling = dict(scale=0.6, height=resolution, width=resolution, output_type="latent")
            latents = generate_batch(model, tokens, items, 2, **sampling)
    assert latents.device.type == "cuda" and latents.shape == latent_shape


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_validation_sampling_runs_on_cuda(request, tiny_pair_data, tmp_path, family, precision, one_subject_rows):
    """`TrainingValidation` around the training models: sampling under the run's autocast and the VAE decode outside it."""
    fixture, resolution, _, _ = FAMILIES[family]
    paths, dtype = request.getfixturevalue(fixture), HALF[precision]
    model_dir, flags = paths.base_model_dir, validation_args(None, None)
    args = train_patchdpo.parse_args(
        [
            *("--pretrained_model_name_or_path", str(model_dir), "--image_encoder_path", str(paths.image_encoder_dir)),
            *("--pretrained_ip_adapter_path", str(paths.ip_ckpt), "--data_root_path", str(tiny_pair_data.root)),
            *("--output_dir", str(tmp_path), "--resolution", str(resolution)),
            *flags[: flags.index("--clip_model")],
            *("--validation_size", str(resolution)),
        ]
    )
    accelerator = Accelerator(cpu=True)
    accelerator.autocast = lambda: cuda_autocast(dtype)  # what accelerator.autocast() is in a half-precision run on a GPU
    models = load_training_models(model_dir, paths.image_encoder_dir, paths.ip_ckpt, "cpu", dtype)
    with fake_mode():
        place_on_fake_cuda(models)
    validation = TrainingValidation(train_patchdpo.validation_settings(args), accelerator, args.seed, models)
    with fake_mode(), scheduler_on_host(validation.model.pipe.scheduler):
        pixels = validation._pixels()
    assert pixels.device.type == "cuda" and pixels.dtype == torch.float32 and pixels.shape == (2, 3, resolution, resolution)


def test_cuda_autocast_runs_cuda_s_policy_without_a_driver_and_restores_the_state():
    with fake_mode():
        with torch.device(CUDA):
            layer = torch.nn.Linear(8, 8)
        x = torch.randn(2, 8, device=CUDA)
        with cuda_autocast(torch.float16):
            assert layer(x).dtype == torch.float16 and layer(x).softmax(-1).dtype == torch.float32  # CUDA's fp32 list
            with cuda_autocast(None):
                assert layer(x).dtype == torch.float32
            assert layer(x).dtype == torch.float16
        assert layer(x).dtype == torch.float32 and not torch.is_autocast_enabled(CUDA.type)


def test_place_casts_a_real_module_and_gives_fake_cuda_copies_in_the_mode():
    layer = torch.nn.Linear(4, 4)
    weight = layer.weight.detach().clone()
    place(layer, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and torch.equal(layer.weight.float(), weight) and layer.weight.requires_grad
    with fake_mode():
        place(layer, CUDA, torch.float16)
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.float16 and layer.weight.requires_grad
