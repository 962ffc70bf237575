"""Self-supervised finetuning that makes a backbone's patch features more discriminative.

The paper finetunes its feature extractor so that patches of the same object part match and other
patches do not, but gives no objective. Ours is patch correspondence: two augmented views of one
image (random resized crop, horizontal flip, colour jitter) whose patch grids are related by the
known crop/flip geometry; InfoNCE where each patch's positive is the patch of the other view that
covers the same image point, and every other patch of both views and of every image in the batch
is a negative. Only the last N transformer blocks up to the feature layer train; the rest is
frozen. The result is a small safetensors file of those blocks, applied with
`--backbone DIR --finetuned FILE` by `patch_quality.maps`.

Patch-matching accuracy (top-1: the argmax over the other view's patches of the same image is the
corresponding patch) is measured on held-out images with fixed augmentations before training and
at every validation, so the gain is measured, not assumed.

    accelerate launch -m patch_quality.ssl_train --backbone DINOV2_DIR --train_data DATA --output_dir ssl_out
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from patch_quality.cli import ssl_train_config

if __name__ == "__main__":
    ssl_train_config()  # --help and a wrong flag answer before the imports below load torch

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.checkpoints import find_resume_checkpoint, remove_orphan_checkpoint_files
from common.checks import require_flags_in_range
from common.cli import exit_on_reported_error, quiet_libraries
from common.errors import BadInputError
from common.images import load_rgb_image
from common.io import atomic_write_json
from common.launch import check_launch
from common.outputs import check_output_dir
from common.sampling import EpochSampler
from common.seeds import stable_seed
from common.training_state import Resumable, TrainedWeights, load_training_state, save_training_state
from patch_quality.cli import FINETUNED_NAME, SSL_TRAIN_PROG
from patch_quality.config import SslTrainConfig
from patch_quality.features import PatchFeatureExtractor, center_square, load_finetuned, save_finetuned, transformer_blocks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class AugmentSettings:
    """Random resized crop (area fraction, aspect ratio), flip probability, colour-jitter strength."""

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter: float = 0.4


@dataclass(frozen=True)
class View:
    """A crop box in source pixels, then an optional horizontal flip of the crop."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_view(source_size: int, settings: AugmentSettings, generator: torch.Generator) -> View:
    area = source_size * source_size
    for _ in range(10):
        scale = settings.crop_scale[0] + (settings.crop_scale[1] - settings.crop_scale[0]) * torch.rand((), generator=generator).item()
        log_ratio = (
            math.log(settings.crop_ratio[0])
            + (math.log(settings.crop_ratio[1]) - math.log(settings.crop_ratio[0])) * torch.rand((), generator=generator).item()
        )
        ratio = math.exp(log_ratio)
        width = int(round(math.sqrt(area * scale * ratio)))
        height = int(round(math.sqrt(area * scale / ratio)))
        if 0 < width <= source_size and 0 < height <= source_size:
            top = int(torch.randint(0, source_size - height + 1, (), generator=generator))
            left = int(torch.randint(0, source_size - width + 1, (), generator=generator))
            break
    else:
        top, left, height, width = 0, 0, source_size, source_size
    flip = bool(torch.rand((), generator=generator).item() < settings.flip_prob)
    return View(top, left, height, width, flip)


def render_view(image: torch.Tensor, view: View, size: int, jitter: torch.Tensor) -> torch.Tensor:
    """Crop, resize (bilinear, antialiased), flip and colour-jitter one (3, S, S) image in [0, 1].

    `jitter` holds (brightness, contrast, saturation) factors around 1.
    """
    crop = TF.resized_crop(image, view.top, view.left, view.height, view.width, [size, size], antialias=True)
    if view.flip:
        crop = crop.flip(-1)
    brightness, contrast, saturation = jitter.tolist()
    crop = crop * brightness
    crop = (crop - crop.mean()) * contrast + crop.mean()
    gray = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2]).unsqueeze(0)
    crop = (crop - gray) * saturation + gray
    return crop.clamp(0.0, 1.0)


def correspondence(view_a: View, view_b: View, size: int, patch_size: int) -> torch.Tensor:
    """For each patch of view A (row-major), the index of view B's patch covering its centre, or -1."""
    grid = size // patch_size
    centers = (torch.arange(grid, dtype=torch.float64) + 0.5) * patch_size
    y_a, x_a = torch.meshgrid(centers, centers, indexing="ij")
    if view_a.flip:
        x_a = size - x_a
    x_source = view_a.left + x_a * view_a.width / size
    y_source = view_a.top + y_a * view_a.height / size
    x_b = (x_source - view_b.left) * size / view_b.width
    y_b = (y_source - view_b.top) * size / view_b.height
    if view_b.flip:
        x_b = size - x_b
    inside = (x_b >= 0) & (x_b < size) & (y_b >= 0) & (y_b < size)
    index = (y_b // patch_size).clamp(0, grid - 1) * grid + (x_b // patch_size).clamp(0, grid - 1)
    return torch.where(inside, index.long(), torch.full_like(index.long(), -1)).flatten()


def make_pair(
    image: torch.Tensor, size: int, patch_size: int, settings: AugmentSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of one (3, S, S) image: (view_a, view_b (3, size, size), targets a->b, targets b->a (grid²,))."""
    low, high = 1.0 - settings.color_jitter, 1.0 + settings.color_jitter
    view_a, view_b = (sample_view(image.shape[-1], settings, generator) for _ in range(2))
    jitter_a, jitter_b = (low + (high - low) * torch.rand(3, generator=generator) for _ in range(2))
    return (
        render_view(image, view_a, size, jitter_a),
        render_view(image, view_b, size, jitter_b),
        correspondence(view_a, view_b, size, patch_size),
        correspondence(view_b, view_a, size, patch_size),
    )


def make_pairs(
    images: torch.Tensor, size: int, patch_size: int, settings: AugmentSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`make_pair` for each image in turn from one generator, stacked: views (N, 3, size, size), targets (N, grid²)."""
    pairs = [make_pair(image, size, patch_size, settings, generator) for image in images]
    return tuple(torch.stack(part) for part in zip(*pairs, strict=True))


def _one_direction(
    queries: torch.Tensor, keys_other: torch.Tensor, keys_same: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    n, patches, dim = queries.shape
    valid = targets >= 0
    if not valid.any():
        return queries.sum() * 0.0
    image_index, patch_index = torch.nonzero(valid, as_tuple=True)
    q = queries[image_index, patch_index]
    keys = torch.cat([keys_other.reshape(n * patches, dim), keys_same.reshape(n * patches, dim)])
    logits = q @ keys.T / temperature
    own = n * patches + image_index * patches + patch_index
    logits[torch.arange(len(q), device=q.device), own] = float("-inf")  # a patch is not its own negative
    labels = image_index * patches + targets[valid]
    return F.cross_entropy(logits, labels)


def correspondence_info_nce(
    features_a: torch.Tensor, features_b: torch.Tensor, targets_ab: torch.Tensor, targets_ba: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised (N, grid², D) patch features of the two views."""
    loss_ab = _one_direction(features_a, features_b, features_a, targets_ab, temperature)
    loss_ba = _one_direction(features_b, features_a, features_b, targets_ba, temperature)
    return (loss_ab + loss_ba) / 2


@torch.no_grad()
def matching_accuracy(
    extractor: PatchFeatureExtractor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
) -> float:
    """Top-1 patch correspondence A -> B within each image, over all A patches visible in B."""
    correct = total = 0
    for views_a, views_b, targets_ab, _ in pairs:
        features_a = extractor.patch_features(views_a).flatten(1, 2)
        features_b = extractor.patch_features(views_b).flatten(1, 2)
        predicted = torch.einsum("npd,nqd->npq", features_a, features_b).argmax(dim=-1).cpu()
        valid = targets_ab >= 0
        correct += int((predicted[valid] == targets_ab[valid]).sum())
        total += int(valid.sum())
    return correct / max(total, 1)


def trainable_parameter_names(extractor: PatchFeatureExtractor, num_blocks: int) -> list[str]:
    """Names of the parameters of the last `num_blocks` blocks feeding the feature layer."""
    if extractor.layer == 0:
        raise BadInputError("layer 0 (patch embeddings) has no transformer block to train; pick --layer >= 1")
    if not 1 <= num_blocks <= extractor.layer:
        raise BadInputError(f"--trainable_blocks must be in 1..{extractor.layer} for layer {extractor.layer}, got {num_blocks}")
    blocks = transformer_blocks(extractor.model)
    chosen = {id(p) for block in blocks[extractor.layer - num_blocks : extractor.layer] for p in block.parameters()}
    return [name for name, parameter in extractor.model.named_parameters() if id(parameter) in chosen]


class SourceImages(Dataset):
    """Images as (3, S, S) tensors in [0, 1]: the centred square resized to `source_size`."""

    def __init__(self, paths: Sequence[Path], source_size: int):
        self.paths, self.source_size = list(paths), source_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_rgb_image(self.paths[index])
        square = center_square(image).resize((self.source_size, self.source_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"training image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise BadInputError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def split_paths(paths: Sequence[Path], validation_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(len(paths) * validation_fraction)) if validation_fraction > 0 else 0
    if count >= len(paths):
        raise BadInputError(f"--validation_fraction {validation_fraction} leaves no training image out of {len(paths)}")
    validation = sorted(paths[i] for i in order[:count])
    train = sorted(paths[i] for i in order[count:])
    return train, validation


def validation_pairs(
    images: torch.Tensor, size: int, patch_size: int, settings: AugmentSettings, pairs_per_image: int, seed: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed augmented pairs (same seed, same pairs before and after training)."""
    generator = torch.Generator().manual_seed(seed)
    repeated = images.repeat_interleave(pairs_per_image, dim=0)
    return [make_pairs(chunk, size, patch_size, settings, generator) for chunk in repeated.split(batch_size)]


class AugmentedPairs(Dataset):
    """Training items `(index, epoch)` -> the two views of source image `index` and their targets.

    Each item draws its views from a generator seeded with `(seed, epoch, index)`, so a batch is a
    function of where it sits in training: a resumed run sees the same views as a straight one,
    whatever the number of processes or data workers.
    """

    def __init__(self, sources: Dataset, size: int, patch_size: int, augment: AugmentSettings, seed: int) -> None:
        self.sources, self.size, self.patch_size, self.augment, self.seed = sources, size, patch_size, augment, seed

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index, epoch = key
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "views", epoch, index))
        return make_pair(self.sources[index], self.size, self.patch_size, self.augment, generator)


@dataclass
class TrainSettings:
    trainable_blocks: int = 2
    temperature: float = 0.1
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 16
    max_steps: int = 2000
    seed: int = 42


@dataclass(frozen=True)
class Schedule:
    """When to validate and checkpoint, and where to resume from (None: start fresh)."""

    validation_steps: int = 200
    checkpointing_steps: int | None = None
    resume_from_checkpoint: str | None = None


def _unfreeze(extractor: PatchFeatureExtractor, trainable_blocks: int) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Freeze the backbone except the last blocks up to the feature layer; optimise in fp32."""
    model = extractor.model
    names = trainable_parameter_names(extractor, trainable_blocks)
    named = dict(model.named_parameters())
    model.requires_grad_(False)
    for name in names:
        named[name].requires_grad_(True)
    model.float()  # accelerate's --mixed_precision handles autocast
    return names, [named[name] for name in names]


def _trained_blocks(model: torch.nn.Module, names: list[str], backbone_dir: Path, metadata: dict) -> TrainedWeights:
    """A training state's weights: only the trained blocks (as the finetuned file), not the whole backbone."""
    return TrainedWeights(
        FINETUNED_NAME,
        save=lambda path: save_finetuned(path, model, names, backbone_dir, metadata),
        load=lambda path: load_finetuned(model, path, backbone_dir),
    )


def _resume_step(accelerator: Accelerator, output_dir: Path, resume_from_checkpoint: str | None, resumable: Resumable) -> int:
    resume = find_resume_checkpoint(output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
    if accelerator.is_main_process:
        remove_orphan_checkpoint_files(output_dir)
    return 0 if resume is None else load_training_state(resume, resumable)


def _batches_from(accelerator: Accelerator, loader: DataLoader, step: int):
    """The batches of training from `step` on, epoch after epoch: the resumed epoch skips what was trained."""
    epoch, skip = divmod(step, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _loss(accelerator: Accelerator, extractor: PatchFeatureExtractor, batch, temperature: float) -> torch.Tensor:
    views_a, views_b, targets_ab, targets_ba = batch
    with accelerator.autocast():
        features = extractor.patch_features(torch.cat([views_a, views_b]).to(accelerator.device)).flatten(1, 2)
    features_a, features_b = features.float().chunk(2)
    return correspondence_info_nce(features_a, features_b, targets_ab.to(features.device), targets_ba.to(features.device), temperature)


def train(
    accelerator: Accelerator,
    extractor: PatchFeatureExtractor,
    train_images: Dataset,
    held_out: torch.Tensor,
    settings: TrainSettings,
    augment: AugmentSettings,
    output_dir: Path,
    backbone_dir: Path,
    validation_pairs_per_image: int = 2,
    validation_steps: int = 200,
    checkpointing_steps: int | None = None,
    resume_from_checkpoint: str | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Train the last blocks; returns {"accuracy_before", "accuracy_after", "final_loss", "steps"}."""
    schedule = Schedule(validation_steps, checkpointing_steps, resume_from_checkpoint)
    names, parameters = _unfreeze(extractor, settings.trainable_blocks)
    size, patch = extractor.image_size, extractor.patch_size
    eval_pairs = validation_pairs(held_out, size, patch, augment, validation_pairs_per_image, settings.seed + 1, settings.batch_size)
    extractor.model.eval()
    accuracy_before = matching_accuracy(extractor, eval_pairs)

    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loader = DataLoader(
        AugmentedPairs(train_images, size, patch, augment, settings.seed),
        batch_size=settings.batch_size,
        sampler=EpochSampler(len(train_images), settings.seed),
        drop_last=len(train_images) >= settings.batch_size,
        num_workers=num_workers,
    )
    unwrapped = extractor.model
    metadata = {
        "layer": str(extractor.layer),
        "trainable_blocks": str(settings.trainable_blocks),
        "objective": "patch-correspondence InfoNCE",
    }
    prepared_model, optimizer, loader = accelerator.prepare(unwrapped, optimizer, loader)
    resumable = Resumable(_trained_blocks(unwrapped, names, backbone_dir, metadata), optimizer, scaler=accelerator.scaler)
    step = _resume_step(accelerator, output_dir, schedule.resume_from_checkpoint, resumable)

    extractor.model = prepared_model
    step, loss_value = _train_steps(accelerator, extractor, resumable, loader, eval_pairs, settings, schedule, output_dir, step)
    prepared_model.eval()
    accuracy_after = matching_accuracy(extractor, eval_pairs)
    extractor.model = unwrapped
    metrics = {"accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "final_loss": loss_value, "steps": step}
    accelerator.log({"val/patch_matching_top1": accuracy_after}, step=step)
    _save_results(accelerator, output_dir, unwrapped, names, backbone_dir, metadata, metrics)
    return metrics


def _train_steps(
    accelerator: Accelerator,
    extractor: PatchFeatureExtractor,
    resumable: Resumable,
    loader: DataLoader,
    eval_pairs: list,
    settings: TrainSettings,
    schedule: Schedule,
    output_dir: Path,
    step: int,
) -> tuple[int, float]:
    """Optimise from `step` to `settings.max_steps` (checkpointing `resumable`); returns the last step and its loss."""
    model, optimizer = extractor.model, resumable.optimizer
    progress = tqdm(total=settings.max_steps, initial=step, desc="ssl_train", disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    model.train()
    batches = _batches_from(accelerator, loader, step)
    while step < settings.max_steps:
        loss = _loss(accelerator, extractor, next(batches), settings.temperature)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = accelerator.reduce(loss.detach(), "mean").item()
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        accelerator.log({"train/loss": loss_value}, step=step)
        if schedule.validation_steps and step % schedule.validation_steps == 0 and step < settings.max_steps:
            model.eval()
            accelerator.log({"val/patch_matching_top1": matching_accuracy(extractor, eval_pairs)}, step=step)
            model.train()
        if schedule.checkpointing_steps and step % schedule.checkpointing_steps == 0:
            save_training_state(accelerator, output_dir / f"checkpoint-{step}", resumable, step)
    progress.close()
    return step, loss_value


def _save_results(
    accelerator: Accelerator, output_dir: Path, model: torch.nn.Module, names: list[str], backbone_dir: Path, metadata: dict, metrics: dict
) -> None:
    """The finetuned blocks (with the accuracies in their metadata) and metrics.json, from the main process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_finetuned(
            output_dir / FINETUNED_NAME,
            model,
            names,
            backbone_dir,
            {
                **metadata,
                "steps": str(metrics["steps"]),
                "patch_matching_top1_before": f"{metrics['accuracy_before']:.4f}",
                "patch_matching_top1_after": f"{metrics['accuracy_after']:.4f}",
            },
        )
        atomic_write_json(output_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()


def _settings(config: SslTrainConfig) -> tuple[TrainSettings, AugmentSettings]:
    train_settings = TrainSettings(
        trainable_blocks=config.trainable_blocks,
        temperature=config.temperature,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        batch_size=config.train_batch_size,
        max_steps=config.max_train_steps,
        seed=config.seed,
    )
    return train_settings, AugmentSettings(tuple(config.crop_scale), tuple(config.crop_ratio), config.flip_prob, config.color_jitter)


def run(config: SslTrainConfig, accelerator: Accelerator) -> dict[str, float]:
    """Load the backbone and the images, hold some out, train, write the results."""
    extractor = PatchFeatureExtractor.from_pretrained(
        config.backbone, layer=config.layer, image_size=config.image_size, device=accelerator.device
    )
    train_paths, validation_paths = split_paths(find_images(config.train_data), config.validation_fraction, config.seed)
    if not validation_paths:
        raise BadInputError("--validation_fraction must hold out at least one image to measure the matching accuracy")
    source_size = config.source_size or 2 * extractor.image_size
    held_out = torch.stack([SourceImages(validation_paths, source_size)[i] for i in range(len(validation_paths))])
    settings, augment = _settings(config)
    if accelerator.is_main_process:
        accelerator.init_trackers("patch_quality_ssl", config={field.name: str(getattr(config, field.name)) for field in fields(config)})
    return train(
        accelerator,
        extractor,
        SourceImages(train_paths, source_size),
        held_out,
        settings,
        augment,
        config.output_dir,
        config.backbone,
        config.validation_pairs_per_image,
        config.validation_steps,
        config.checkpointing_steps,
        config.resume_from_checkpoint,
        config.dataloader_num_workers,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = ssl_train_config(argv)
    quiet_libraries()
    with exit_on_reported_error(SSL_TRAIN_PROG):
        require_flags_in_range(config, ("train_batch_size", "image_size", "source_size"), minimum=1)
        check_output_dir(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=str(config.output_dir / "logs")),
    )
    set_seed(config.seed)
    with exit_on_reported_error(SSL_TRAIN_PROG):
        check_launch(accelerator.num_processes, "-m patch_quality.ssl_train")
        metrics = run(config, accelerator)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(
            f"patch-matching top-1: {metrics['accuracy_before']:.4f} -> {metrics['accuracy_after']:.4f}; wrote {config.output_dir / FINETUNED_NAME}"
        )
    return metrics


if __name__ == "__main__":
    main()
