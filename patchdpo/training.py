"""The PatchDPO training step and what it needs: frozen encoders, trainable model, checkpoints.

One step on B pairs (see `patchdpo.loss` for the objectives):

* latents `[reference; generated]` (2B) from the VAE posterior mean x scaling factor, VAE in fp32;
* one noise and one timestep per pair, shared by its two halves;
* image tokens from the Resampler applied to the reference's CLIP penultimate features, and the
  two-encoder prompt embeddings, both repeated for the two halves;
* SDXL time ids per latent (`patchdpo.sdxl_conditioning.pair_time_ids`).

Only the IP-Adapter projections `to_k_ip` / `to_v_ip` train. The Resampler is frozen and sits
upstream of them, so its tokens are computed without autograd; the UNet's frozen weights are
held in the compute dtype (no per-step casts) while the adapter stays in fp32 for the optimizer.

Randomness is stateless and keyed on the pair: each pair's noise and timestep come from a
generator seeded with its `noise_seed`, a function of `(seed, epoch, dataset index)` drawn by
`patchdpo.pair_dataset` like the pair's dropout and crop. So neither the process a pair lands
on, nor its micro-batch, nor a resume changes how it is trained, and caching changes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from common.errors import BadInputError
from common.hub import resolve_file, resolve_folder
from common.training_state import TrainedWeights
from ip_adapter.attention_processor import adapter_modules_of, install_ip_adapter
from ip_adapter.checkpoint import load_adapter_state, load_ip_adapter_checkpoint, load_strict, naming_file, save_ip_adapter
from ip_adapter.image_encoder import encode_image_features, load_image_encoder
from ip_adapter.loading import SDXL_COMPONENTS
from ip_adapter.resampler import Resampler

from .loss import LossOutput, compute_loss
from .sdxl_conditioning import encode_prompts, pair_time_ids

logger = logging.getLogger(__name__)

#: The IP-Adapter-Plus SDXL resampler (`ip-adapter-plus_sdxl_vit-h.bin`), used when training from scratch.
FRESH_RESAMPLER_CONFIG = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, ff_mult=4)
ADAPTER_STATE_NAME = "ip_adapter_state.safetensors"


@dataclass
class FrozenEncoders:
    """The frozen encoders; a step whose batch carries cached outputs keeps only those it still runs (`kept_with_cache`)."""

    vae: AutoencoderKL | None
    image_encoder: CLIPVisionModelWithProjection | None
    text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection] | None
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]

    def kept_with_cache(self, clip_per_step: bool) -> FrozenEncoders:
        """What a step runs once the cache holds the other outputs: the image encoder when CLIP crops are drawn per step."""
        return FrozenEncoders(None, self.image_encoder if clip_per_step else None, None, self.tokenizers)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 posterior-mean latents x scaling factor (the VAE always runs in fp32)."""
        pixels = pixels.to(self.vae.device, torch.float32)
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        return encode_image_features(self.image_encoder, clip_pixels)

    def prompt_embeds(self, input_ids: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.text_encoders, input_ids)


@dataclass
class PairConditioning:
    """Everything a step needs for B pairs, whether encoded now or read from the cache."""

    latents: torch.Tensor  # (2B, C, h, w) float32, [references; generated]
    image_features: torch.Tensor  # (B, L, D) CLIP penultimate features of the references
    prompt_embeds: torch.Tensor  # (B, 77, D1 + D2)
    pooled_prompt_embeds: torch.Tensor  # (B, D2)
    reference_size: torch.Tensor  # (B, 2) original (H, W)
    generated_size: torch.Tensor
    reference_map: torch.Tensor  # (B, h, w)
    generated_map: torch.Tensor
    noise_seeds: torch.Tensor  # (B,) int64, each pair's noise and timestep seed

    @property
    def batch_size(self) -> int:
        return self.image_features.shape[0]

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], encoders: FrozenEncoders) -> PairConditioning:
        """The step's conditioning: what the batch carries as encoder outputs (from the cache) is used as it is, and
        the frozen `encoders` run on what it carries as their inputs (pixels, token ids, CLIP pixels)."""
        if "reference_latents" in batch:
            latents = torch.cat([batch["reference_latents"], batch["generated_latents"]]).float()
        else:
            latents = encoders.latents(torch.cat([batch["reference_pixels"], batch["generated_pixels"]]))
        if "prompt_embeds" in batch:
            prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            prompt_embeds, pooled = encoders.prompt_embeds((batch["input_ids"], batch["input_ids_2"]))
        image_features = batch["image_features"] if "image_features" in batch else encoders.image_features(batch["clip_pixels"])
        return cls(
            latents=latents,
            image_features=image_features,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            reference_size=batch["reference_size"],
            generated_size=batch["generated_size"],
            reference_map=batch["reference_map"],
            generated_map=batch["generated_map"],
            noise_seeds=batch["noise_seed"],
        )


class IPAdapterTrainingModel(nn.Module):
    """SDXL UNet with IP-Adapter layers plus the frozen Resampler; forward takes pair-level inputs."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        image_proj_model: Resampler,
        compute_dtype: torch.dtype,
        image_proj_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.image_proj_model = image_proj_model
        self.compute_dtype = compute_dtype
        # Held outside the module tree (the processors are already the UNet's submodules): looked up once,
        # not by walking the UNet's processors at every access; the state-dict keys stay the UNet's.
        self.__dict__["adapter_modules"] = adapter_modules_of(unet)
        # The frozen Resampler's tensors as loaded: saved instead of its copy in the compute dtype, so a
        # bf16 or fp16 run writes back exactly the image_proj it started from.
        self.image_proj_state = image_proj_state if image_proj_state is not None else cpu_state(image_proj_model)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        image_features: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Noise prediction for the 2B latents; the B per-pair conditionings are used twice."""
        dtype = self.compute_dtype
        with torch.no_grad():
            image_tokens = self.image_proj_model(image_features.to(dtype))
        hidden_states = torch.cat([prompt_embeds.to(dtype), image_tokens], dim=1).repeat(2, 1, 1)
        added = {"text_embeds": pooled_prompt_embeds.to(dtype).repeat(2, 1), "time_ids": time_ids.to(dtype)}
        return self.unet(noisy_latents.to(dtype), timesteps, hidden_states, added_cond_kwargs=added).sample


@dataclass
class TrainingModels:
    model: IPAdapterTrainingModel
    encoders: FrozenEncoders | None  # None once a feature cache has replaced them
    scheduler: DDPMScheduler


def _build_resampler(ip_adapter_path: str | os.PathLike | None, embedding_dim: int, output_dim: int) -> tuple[Resampler, dict | None]:
    if ip_adapter_path is None:
        logger.warning(
            "no --pretrained_ip_adapter_path: to_k_ip/to_v_ip start as copies of to_k/to_v and the Resampler is freshly "
            "initialised and stays frozen (only the adapter layers train)"
        )
        return Resampler(**FRESH_RESAMPLER_CONFIG, embedding_dim=embedding_dim, output_dim=output_dim), None
    checkpoint = load_ip_adapter_checkpoint(resolve_file(ip_adapter_path, "--pretrained_ip_adapter_path"))
    with naming_file(ip_adapter_path):
        config = Resampler.config_from_state_dict(checkpoint["image_proj"])
        for key, expected in (("embedding_dim", embedding_dim), ("output_dim", output_dim)):
            if config[key] != expected:
                raise BadInputError(f"image_proj has {key}={config[key]}, but the models here need {expected}")
    return Resampler.from_state_dict(checkpoint["image_proj"], ip_adapter_path), checkpoint


def load_training_models(
    model_dir: str | os.PathLike,
    image_encoder_dir: str | os.PathLike,
    ip_adapter_path: str | os.PathLike | None,
    device: torch.device | str,
    weight_dtype: torch.dtype,
    revision: str | None = None,
    variant: str | None = None,
    unet_dtype: torch.dtype | None = None,
) -> TrainingModels:
    """Load SDXL parts from a folder or a Hugging Face id (`common.hub`), install and initialise the adapter, freeze the rest.

    The frozen UNet is held in `unet_dtype` (default `weight_dtype`; float32 is the official script's
    fp32 UNet under autocast, whose `unet.to(dtype)` is commented out).
    """
    model_dir = resolve_folder(model_dir, "--pretrained_model_name_or_path", revision, SDXL_COMPONENTS, variant)
    for sub in SDXL_COMPONENTS:
        if not (model_dir / sub).is_dir():
            raise BadInputError(f"{model_dir} has no {sub}/ folder; expected an SDXL pipeline saved with save_pretrained")
    local = dict(local_files_only=True)
    weights = dict(local, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **weights)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **weights)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **weights)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", **weights)
    tokenizers = (
        CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", **local),
        CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", **local),
    )
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **local)
    image_encoder = load_image_encoder(image_encoder_dir, device, weight_dtype)

    resampler, checkpoint = _build_resampler(ip_adapter_path, image_encoder.config.hidden_size, unet.config.cross_attention_dim)
    adapter_modules = install_ip_adapter(unet, num_tokens=resampler.num_queries)
    if checkpoint is not None:
        load_strict(adapter_modules, checkpoint["ip_adapter"], "ip_adapter", ip_adapter_path)

    for module in (unet, vae, text_encoder, text_encoder_2, resampler):
        module.eval().requires_grad_(False)
    # Full-precision copies taken before the cast to the compute dtype: the trainable adapter restarts
    # from them (casting it down and back up would round it), the frozen Resampler is saved from them.
    adapter_state, image_proj_state = cpu_state(adapter_modules), cpu_state(resampler)
    unet.to(device, unet_dtype or weight_dtype)
    adapter_modules.to(torch.float32).requires_grad_(True)
    adapter_modules.load_state_dict(adapter_state)
    resampler.to(device, weight_dtype)
    vae.to(device, torch.float32)
    text_encoder.to(device, weight_dtype)
    text_encoder_2.to(device, weight_dtype)
    encoders = FrozenEncoders(vae, image_encoder, (text_encoder, text_encoder_2), tokenizers)
    return TrainingModels(IPAdapterTrainingModel(unet, resampler, weight_dtype, image_proj_state), encoders, scheduler)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a module's tensors, unaffected by later `.to(dtype)` calls."""
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in module.state_dict().items()}


def frozen_adapter_copy(model: IPAdapterTrainingModel) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable weights: the frozen reference policy of `image_dpo`."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def pair_noise(
    noise_seeds: torch.Tensor, latent_shape: torch.Size, num_timesteps: int, noise_offset: float | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *latent_shape), timesteps (B,)) on `device`: pair i's from a CPU generator seeded with `noise_seeds[i]`.

    Drawn on the CPU and then moved, so a pair's noise is the same on every device type and needs no
    CUDA generator (which needs a driver, so the fake-CUDA rehearsal could not run it): a few latents'
    worth of numbers per step, negligible next to the UNet.
    """
    noises, timesteps = [], []
    for seed in noise_seeds.tolist():
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latent_shape, generator=generator)
        if noise_offset:
            noise += noise_offset * torch.randn((latent_shape[0], 1, 1), generator=generator)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_timesteps, (), generator=generator))
    return torch.stack(noises).to(device), torch.stack(timesteps).to(device)


def training_step(
    accelerator: Accelerator,
    model: nn.Module,
    cond: PairConditioning,
    scheduler: DDPMScheduler,
    *,
    loss_mode: str,
    resolution: int,
    official_time_ids: bool = False,
    noise_offset: float | None = None,
    reference_params: dict[str, torch.Tensor] | None = None,
    dpo_beta: float | None = None,
) -> LossOutput:
    """Forward pass and loss for one batch of pairs; `cond.noise_seeds` fix their noise and timesteps."""
    latents = cond.latents
    device = latents.device
    noise, timesteps = pair_noise(cond.noise_seeds, latents.shape[1:], scheduler.config.num_train_timesteps, noise_offset, device)
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise BadInputError(f"unsupported scheduler prediction_type {scheduler.config.prediction_type!r}")

    time_ids = pair_time_ids(cond.reference_size, cond.generated_size, resolution, official_time_ids).to(device)
    inputs = (noisy_latents, timesteps, cond.image_features, cond.prompt_embeds, cond.pooled_prompt_embeds, time_ids)
    pred = model(*inputs)
    reference_pred = None
    if loss_mode == "image_dpo":
        if reference_params is None:
            raise ValueError("loss 'image_dpo' needs the frozen reference adapter weights (frozen_adapter_copy)")
        with torch.no_grad(), accelerator.autocast():
            reference_pred = torch.func.functional_call(accelerator.unwrap_model(model), reference_params, inputs)
    return compute_loss(
        loss_mode,
        pred,
        target,
        reference_map=cond.reference_map.to(device),
        generated_map=cond.generated_map.to(device),
        reference_pred=reference_pred,
        beta=dpo_beta,
    )


def save_adapter_checkpoint(directory: str | os.PathLike, model: IPAdapterTrainingModel) -> Path:
    """`model.bin` and `model.safetensors` (fp16, public IP-Adapter layout) in `directory`."""
    directory = Path(directory)
    save_ip_adapter(directory / "model.bin", model.image_proj_state, model.adapter_modules)
    save_ip_adapter(directory / "model.safetensors", model.image_proj_state, model.adapter_modules)
    return directory


def adapter_weights(model: IPAdapterTrainingModel) -> TrainedWeights:
    """A training state's weights: the adapter and the Resampler as loaded, full precision, in the IP-Adapter format.

    Only these: the frozen UNet's gigabytes never change. Loading them back also makes the state's
    Resampler tensors the ones every later checkpoint saves.
    """

    def save(path: Path) -> None:
        save_ip_adapter(path, model.image_proj_state, model.adapter_modules, dtype=None)

    def load(path: Path) -> None:
        checkpoint = load_ip_adapter_checkpoint(path)
        load_adapter_state(model.image_proj_model, model.adapter_modules, checkpoint, path)
        model.image_proj_state = {key: tensor.clone() for key, tensor in checkpoint["image_proj"].items()}

    return TrainedWeights(ADAPTER_STATE_NAME, save, load)
