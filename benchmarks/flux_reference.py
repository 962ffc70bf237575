"""The FLUX baselines of the speed benchmarks: what a straightforward diffusers user would write.

Training (`reference_train_loop`): `FluxPipeline.from_pretrained` + `FluxPipeline.load_ip_adapter`
(XLabs' file and the CLIP image encoder, diffusers' own modules), and every step encodes everything
again, as diffusers' `train_dreambooth_flux.py` does without `--cache_latents`: the prompt with
`pipe.encode_prompt` (CLIP-L pooled + T5 at 512 tokens), the reference image with the image
encoder (`image_embeds`), both images with the VAE (`(z - shift) * scale`); then the script's
rectified flow (`x_t = (1 - sigma) x0 + sigma eps`, target `eps - x0`), the latents packed with
`FluxPipeline._pack_latents`, the transformer called as the script calls it (timestep / 1000,
guidance, text and image ids) with the image as `joint_attention_kwargs`, the prediction unpacked
with `FluxPipeline._unpack_latents`, and the patch-weighted loss. Its noise and sigmas are drawn as
ours (one generator per pair, the same flow-matching draw), which costs the same and makes the losses
comparable.

Generation (`reference_generate`): `FluxPipeline.__call__` with the adapter loaded by
`load_ip_adapter`, batches of 2 prompts of one subject, the reference image given as
`ip_adapter_image` (CLIP runs inside every call).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import FluxPipeline
from PIL import Image
from torch.utils.data import DataLoader

from base_models import FluxFamily
from common.batching import batched
from common.sampling import EpochSampler
from ip_adapter.batch_generation import GenerationItem
from patchdpo.pair_dataset import EncoderInputs, PairDataset

XLABS_FILE = "ip_adapter.safetensors"
#: As the SDXL reference inference loop: batches of 2 prompts, one generator seeded 42 per batch.
REFERENCE_SEED, REFERENCE_BATCH = 42, 2


def load_reference_pipeline(models: Path, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """FluxPipeline with XLabs' adapter and its image encoder, loaded by diffusers alone."""
    pipe = FluxPipeline.from_pretrained(str(models / "flux"), torch_dtype=dtype, local_files_only=True)
    pipe.load_ip_adapter(
        str(models),
        weight_name=XLABS_FILE,
        image_encoder_pretrained_model_name_or_path=str(models / "image_encoder"),
        image_encoder_dtype=dtype,
        local_files_only=True,
    )
    return pipe


def reference_train_loop(args: Any, accelerator: Accelerator, weight_dtype: torch.dtype, dataset_kwargs: dict):
    """Set up the diffusers-style loop; return (loader, one step, extras) as `train_benchmark.reference_loop` does."""
    models, device = Path(args.models), accelerator.device
    pipe = load_reference_pipeline(models)
    pipe.to(device)
    transformer, vae = pipe.transformer.requires_grad_(False), pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False), pipe.text_encoder_2.requires_grad_(False), pipe.image_encoder.requires_grad_(False)
    trained = [p for name, p in transformer.named_parameters() if "_ip" in name or name.startswith("encoder_hid_proj.")]
    for parameter in trained:
        parameter.requires_grad_(True)
    family = FluxFamily()  # for the pair draw only: noise and sigma from the pair's seed, as ours
    objective = family.load_objective(models / "flux")
    optimizer = torch.optim.AdamW(trained, lr=3e-5, weight_decay=0.01)
    dataset = PairDataset(source=EncoderInputs(args.resolution, family, (pipe.tokenizer, pipe.tokenizer_2)), **dataset_kwargs)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=EpochSampler(len(dataset), 0), num_workers=args.num_workers)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)

    def step(batch) -> torch.Tensor:
        prompts = pipe.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=512)
            image_embeds = pipe.image_encoder(batch["clip_pixels"].to(device, pipe.image_encoder.dtype)).image_embeds
            pixels = torch.cat([batch["reference_pixels"], batch["generated_pixels"]]).to(device, torch.float32)
            latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        noise, timesteps = objective.draw(batch["noise_seed"], latents.shape[1:], device)
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        sigma = objective.sigmas(timesteps).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        rows, channels, height, width = latents.shape
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, rows, channels, height, width),
            timestep=timesteps / 1000,
            guidance=torch.full((rows,), family.settings.guidance_scale, device=device),
            pooled_projections=pooled.repeat(2, 1),
            encoder_hidden_states=prompt_embeds.repeat(2, 1, 1),
            txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(rows, height // 2, width // 2, device, latents.dtype),
            joint_attention_kwargs={"ip_adapter_image_embeds": [image_embeds.repeat(2, 1)[:, None]]},
            return_dict=False,
        )[0]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        pred = FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)
        weight = torch.cat([1 - batch["reference_map"], batch["generated_map"]]).unsqueeze(1)
        loss = (weight * (pred.float() - (noise - latents).float()) ** 2).mean()
        accelerator.gather(loss.repeat(rows // 2)).mean().item()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return loader, step, {}


def reference_generate(
    pipe: FluxPipeline, items: Sequence[GenerationItem], references: dict[str, list[Image.Image]], scale: float, **pipeline_kwargs
) -> list[Image.Image]:
    """diffusers' own path: batches of 2 prompts of one subject, its reference image given as `ip_adapter_image` (CLIP
    runs inside every call: diffusers takes one image per adapter for the whole batch), one generator seeded 42 per batch."""
    pipe.set_ip_adapter_scale(scale)
    images: list[Image.Image] = []
    for batch in batched(items, REFERENCE_BATCH):
        if len({item.subject for item in batch}) != 1:
            raise ValueError("diffusers' FLUX IP-Adapter takes one reference image per call: batch the prompts of one subject")
        (image,) = references[batch[0].subject]
        images += pipe(
            prompt=[item.prompt for item in batch],
            ip_adapter_image=image,
            generator=torch.Generator("cpu").manual_seed(REFERENCE_SEED),
            **pipeline_kwargs,
        ).images
    return images
