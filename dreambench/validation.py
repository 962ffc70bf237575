"""Validation during PatchDPO training: DreamBench images of the current adapter, next to the starting one.

Every `--validation_steps` the main process generates a few fixed-seed DreamBench images (the
first `--validation_prompts` prompts of each `--validation_subjects` subject) with the adapter as
it is now, logs one grid per validation to TensorBoard (rows: reference | starting adapter |
current adapter) and, with `--clip_model/--dino_model`, the CLIP-T / CLIP-I / DINO of those
images as curves; the other processes wait at a barrier.

It samples with the model being trained: the family's pipeline (SDXL, SD 1.5) built around the training UNet (whose
IP-Adapter layers are the current adapter), its frozen VAE and text encoders, and the training
CLIP image encoder and Resampler; no second base model is loaded and nothing moves between devices
(`docs/memory.md`). The pipeline denoises under the run's autocast and returns latents; the fp32
VAE decodes them with autocast off, because under `--mixed_precision fp16` autocast would run its
convolutions in fp16, where SDXL's VAE overflows into NaN (black) images. An image that still has
a NaN or inf pixel is drawn as a marked tile, named in a warning with its step, and its step is
not scored. Validation never changes training: the IP-Adapter scale is put back to training's 1.0
afterwards, the noise comes from per-image CPU generators, and the global random state is
restored, so a run with validation trains exactly the same adapter as one without.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw

from common.seeds import stable_seed
from dreambench.benchmark import prompts_for, resolve_subjects
from dreambench.config import ValidationSettings
from dreambench.data import load_conditioning_images, load_reference_images
from dreambench.generation import build_items
from ip_adapter.attention_processor import set_ip_adapter_scale
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.flux_ip_adapter import set_flux_ip_adapter_scale
from ip_adapter.ip_adapter import ImagePromptAdapter

TILE = 128
NON_FINITE = "non-finite"  # the label of a tile whose image had a NaN or inf pixel

logger = logging.getLogger(__name__)


@dataclass
class _Scorer:
    clip: tuple[torch.nn.Module, object]
    dino: torch.nn.Module
    references: dict[str, list[Image.Image]] = field(default_factory=dict)

    def __call__(self, items: list[GenerationItem], images: list[Image.Image], data_root: Path) -> dict[str, float]:
        from dreambench.evaluation import score_images

        per_subject = []
        for subject in dict.fromkeys(item.subject for item in items):
            rows = [(item.prompt, image) for item, image in zip(items, images) if item.subject == subject]
            if subject not in self.references:
                self.references[subject] = load_reference_images(data_root, subject, kosmosg=False)
            per_subject.append(
                score_images([p for p, _ in rows], [i for _, i in rows], self.references[subject], *self.clip, self.dino, batch_size=8)
            )
        return {key: float(np.mean([scores[key] for scores in per_subject])) for key in per_subject[0]}


def _label(image: Image.Image | None, text: str) -> Image.Image:
    """A labelled tile; a non-finite image (None) is a grey tile saying so, never a black square."""
    tile = Image.new("RGB", (TILE, TILE), (96, 96, 96)) if image is None else image.convert("RGB").resize((TILE, TILE))
    draw = ImageDraw.Draw(tile)
    draw.text((3, 2), text, fill=(255, 255, 0))
    if image is None:
        draw.text((3, TILE // 2), NON_FINITE, fill=(255, 64, 64))
    return tile


@torch.no_grad()
def decode_in_float32(vae: torch.nn.Module, latents: torch.Tensor, family: Any, size: int) -> torch.Tensor:
    """Pixels in [-1, 1] of a pipeline's latents (`size` px images), decoded by `vae` in its own dtype (fp32) with autocast off.

    One image at a time, so the decoder's activations are those of one image whatever the number of
    validation images.
    """
    with torch.autocast(latents.device.type, enabled=False):
        return torch.cat([vae.decode(family.vae_latents(latent[None].to(vae.dtype), vae.config, size, size)).sample for latent in latents])


def as_images(pipe: DiffusionPipeline, pixels: torch.Tensor) -> list[Image.Image | None]:
    """PIL images of decoded pixels; an image with a NaN or inf pixel comes back as None."""
    finite = pixels.flatten(1).isfinite().all(dim=1).tolist()
    images = pipe.image_processor.postprocess(pixels.nan_to_num(), output_type="pil")
    return [image if ok else None for image, ok in zip(images, finite)]


TRAINING_SCALE = 1.0  # the IP-Adapter scale training runs at (the processors' default)


def _around_training_models(models: Any) -> ImagePromptAdapter:
    """The family's IP-Adapter pipeline made of the training run's own modules; only the scheduler and tokenizer files are read."""
    encoders = models.encoders
    pipe = models.family.pipeline_class().from_pretrained(
        models.model_dir,
        **{models.family.denoiser_component: models.model.unet},
        vae=encoders.vae,
        **models.family.text_components(encoders.tokenizers, encoders.text_encoders),
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return models.family.ip_adapter_class().around(pipe, encoders.image_encoder, *models.model.adapter.frozen)


def validation_grid(
    references: list[Image.Image], start: list[Image.Image | None], current: list[Image.Image | None], prompts: list[str]
) -> Image.Image:
    """One row per image: the subject's reference, the starting adapter's image, the current adapter's (None: non-finite)."""
    tiles = [
        _label(image, text)
        for reference, first, now, prompt in zip(references, start, current, prompts)
        for image, text in ((reference, prompt[:22]), (first, "start"), (now, "current"))
    ]
    return make_image_grid(tiles, rows=len(prompts), cols=3)  # equal-size labelled tiles: the library grid


class TrainingValidation:
    """Set up on every process (cheap); the model and the images exist on the main process only."""

    def __init__(self, settings: ValidationSettings, accelerator: Accelerator, seed: int, models: Any) -> None:
        """`models`: the run's `patchdpo.models.TrainingModels`, encoders included (the pipeline is built from them)."""
        self.accelerator = accelerator
        self.every = settings.every
        self.data_root = settings.data_root
        self.steps = settings.num_inference_steps
        self.size = settings.size
        subjects = [subject.name for subject in resolve_subjects(settings.subjects)]
        self.items = build_items({s: prompts_for(s)[: settings.prompts_per_subject] for s in subjects}, stable_seed(seed, "validation"))
        for subject in subjects:  # a bad folder fails at start-up, not at the first validation
            load_conditioning_images(self.data_root, subject, kosmosg=False)
        self.family = models.family
        self.model: ImagePromptAdapter | None = None
        self.scale = settings.scale
        self.scorer: _Scorer | None = None
        self.start_images: list[Image.Image | None] = []
        if accelerator.is_main_process:
            self.model = _around_training_models(models)
            self.tokens = SubjectTokens(self.model, lambda subject: load_conditioning_images(self.data_root, subject, kosmosg=False))
            if settings.clip_model is not None:
                from dreambench.metrics import load_clip, load_dino

                self.scorer = _Scorer(
                    load_clip(settings.clip_model, accelerator.device), load_dino(settings.dino_model, accelerator.device)
                )

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _pixels(self) -> torch.Tensor:
        """The current adapter's validation images as decoded pixels, on the training device (what a CUDA rehearsal runs)."""
        unet = self.model.denoiser
        compiled = unet.__dict__.pop("forward", None)  # a --compile'd forward would recompile for the sampling shapes
        sampling = dict(scale=self.scale, height=self.size, width=self.size, output_type="latent")  # decoded below, in fp32
        try:
            with self.accelerator.autocast():
                latents = generate_batch(self.model, self.tokens, self.items, self.steps, **sampling)
        finally:
            set_ip_adapter_scale(unet, TRAINING_SCALE)  # the IP-Adapter layers of either kind the denoiser holds
            set_flux_ip_adapter_scale(unet, TRAINING_SCALE)
            if compiled is not None:
                unet.forward = compiled
        return decode_in_float32(self.model.pipe.vae, latents, self.family, self.size)

    def _generate(self) -> list[Image.Image | None]:
        """The validation images of the current adapter; None for one with a NaN or inf pixel."""
        return as_images(self.model.pipe, self._pixels())

    def __call__(self, step: int, adapter_modules: torch.nn.Module) -> None:
        """Validate the adapter after `step` (step 0: the starting adapter); all processes call, the main one works.

        `adapter_modules` are the training UNet's own IP-Adapter layers, the ones the pipeline samples with.
        """
        if self.accelerator.is_main_process:
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                images = self._generate()
                if step == 0 or not self.start_images:
                    self.start_images = images
                self._log(step, images)
        self.accelerator.wait_for_everyone()

    def _log(self, step: int, images: list[Image.Image | None]) -> None:
        references = [self.tokens.load_references(item.subject)[0] for item in self.items]
        grid = validation_grid(references, self.start_images, images, [item.prompt for item in self.items])
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=False)
        tracker.log_images({"validation/reference_start_current": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        broken = [f"{item.subject}: {item.prompt!r}" for item, image in zip(self.items, images) if image is None]
        if broken:
            logger.warning(
                f"validation at step {step}: {len(broken)} of {len(images)} images have NaN/inf pixels ({'; '.join(broken)}); "
                f"drawn as '{NON_FINITE}' tiles, and step {step} is not scored"
            )
        elif self.scorer is not None:
            scores = self.scorer(self.items, images, self.data_root)
            self.accelerator.log({f"validation/{key}": value for key, value in scores.items()}, step=step)
