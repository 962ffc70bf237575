"""Patch-quality maps: how faithfully each patch of a generated image reproduces the reference.

Following the paper, a generated patch's quality is its best cosine similarity to any reference
patch (no spatial alignment needed): `gen_sim[h, w] = max_ij cos(f(gen)[h, w], f(ref)[i, j])`.
Our additions, each a flag (see README.md):

- the max runs over reference *foreground* patches only; the reference has a clean background, so
  thresholding near-white pixels gives the mask (`--foreground_mask`, `--background_level`);
- the reference map is the reverse direction, `ref_sim[i, j] = max_hw cos(f(ref)[i, j], f(gen)[h, w])`,
  so `1 - ref_map` up-weights reference patches the generated image failed to reproduce; on the
  reference background it is set to 1 (weight 0) so training is not taught to paint white
  backgrounds (`--mask_reference_background`);
- similarities are resized from the patch grid to the latent grid (resolution / VAE factor) with
  bilinear interpolation, align_corners=False, no antialiasing, *then* turned into weights
  (`--transform raw|minmax|threshold`, `--good_threshold`, `--signed`), so thresholded maps stay
  binary at latent resolution.

    accelerate launch -m patch_quality.maps --data_root DATA --backbone DINOV2_DIR --base_model_path SDXL_DIR --resolution 512
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from patch_quality.cli import maps_config

if __name__ == "__main__":
    maps_config()  # --help and a wrong flag answer before the imports below load torch

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from common.batching import batched
from common.checks import require_flags_in_range
from common.cli import exit_on_reported_error, quiet_libraries
from common.distributed import owning_output_dir
from common.errors import BadInputError
from common.images import load_rgb_image_and_sha256
from common.io import remove_stale_temp_files
from common.launch import check_launch
from common.outputs import check_output_dir, check_output_file
from patch_quality import layout
from patch_quality.cli import MAPS_PROG, TRANSFORMS
from patch_quality.config import MapsConfig
from patch_quality.features import PatchFeatureExtractor, center_square, describe
from patch_quality.latent_grid import latent_grid
from patch_quality.store import QualityMaps, SampleImages, hash_sample_images, save_quality_maps

INTERPOLATION = "bilinear, align_corners=False, antialias=False (patch grid -> latent grid, before the transform)"
PARTS_DIR_NAME = ".patch_quality_parts"


@dataclass(frozen=True)
class MapSettings:
    """How similarities become the stored weights; every field is a CLI flag of the same name."""

    transform: str = "raw"
    good_threshold: float = 0.5
    signed: bool = False
    foreground_mask: bool = True
    background_level: int = 240
    foreground_fraction: float = 0.05
    mask_reference_background: bool = True
    latent_size: int = 64

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise BadInputError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if not 0 <= self.background_level <= 255:
            raise BadInputError(f"background_level must be a pixel value in [0, 255], got {self.background_level}")
        if self.latent_size <= 0:
            raise BadInputError(f"latent_size must be positive, got {self.latent_size}")

    def metadata(self) -> dict[str, str]:
        meta = {name: json.dumps(value) for name, value in asdict(self).items()}
        meta["transform"] = self.transform
        meta["interpolation"] = INTERPOLATION
        return meta


def foreground_patch_mask(image: Image.Image, grid_size: int, background_level: int = 240, min_fraction: float = 0.05) -> torch.Tensor:
    """(grid, grid) bool mask of patches holding at least `min_fraction` non-background pixels.

    A pixel is background when all three channels are >= `background_level` (near white). An
    image with no foreground patch at all gets an all-True mask: nothing to restrict to.
    """
    square = np.asarray(center_square(image.convert("RGB")))
    foreground = torch.from_numpy((square < background_level).any(axis=-1).astype(np.float32))
    fraction = F.adaptive_avg_pool2d(foreground[None, None], grid_size)[0, 0]
    mask = fraction >= min_fraction
    return mask if mask.any() else torch.ones_like(mask)


def patch_similarities(
    reference: torch.Tensor, generated: torch.Tensor, reference_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-match cosine maps for L2-normalised grids (h, w, D) and (h2, w2, D).

    Returns (ref_sim (h, w): best match of each reference patch among generated patches,
    gen_sim (h2, w2): best match of each generated patch among (masked) reference patches).
    """
    h, w, dim = reference.shape
    h2, w2, _ = generated.shape
    similarity = reference.reshape(h * w, dim) @ generated.reshape(h2 * w2, dim).T
    ref_sim = similarity.max(dim=1).values.reshape(h, w)
    candidates = similarity if reference_mask is None else similarity[reference_mask.reshape(-1).to(similarity.device)]
    gen_sim = candidates.max(dim=0).values.reshape(h2, w2)
    return ref_sim, gen_sim


def resize_to_latent(grid: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(h, w) -> (latent_size, latent_size), bilinear, align_corners=False."""
    return F.interpolate(grid[None, None].float(), size=(latent_size, latent_size), mode="bilinear", align_corners=False)[0, 0]


def similarity_to_quality(
    similarity: torch.Tensor, transform: str, good_threshold: float, region: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarities -> qualities in [0, 1].

    raw: the cosine clamped to [0, 1] (the paper's quality); minmax: stretched to [0, 1] per image,
    using min and max inside `region` when given (all ones if the image is constant); threshold:
    1 where cosine >= `good_threshold`, else 0.
    """
    if transform == "raw":
        return similarity.clamp(0.0, 1.0)
    if transform == "threshold":
        return (similarity >= good_threshold).float()
    values = similarity[region] if region is not None and region.any() else similarity
    low, high = values.min(), values.max()
    if high - low <= 1e-6:
        return torch.ones_like(similarity)
    return ((similarity - low) / (high - low)).clamp(0.0, 1.0)


def quality_maps(
    reference: torch.Tensor, generated: torch.Tensor, reference_mask: torch.Tensor | None, settings: MapSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_map, generated_map) at the latent grid from one pair of feature grids."""
    mask = reference_mask if settings.foreground_mask else None
    ref_sim, gen_sim = patch_similarities(reference, generated, mask)
    ref_sim = resize_to_latent(ref_sim, settings.latent_size)
    gen_sim = resize_to_latent(gen_sim, settings.latent_size)
    soft_mask = None if mask is None else resize_to_latent(mask.float().to(ref_sim.device), settings.latent_size)
    ref_map = similarity_to_quality(ref_sim, settings.transform, settings.good_threshold, None if soft_mask is None else soft_mask > 0.5)
    gen_map = similarity_to_quality(gen_sim, settings.transform, settings.good_threshold)
    if soft_mask is not None and settings.mask_reference_background:
        # Weight (1 - ref_map) fades to 0 on the background.
        ref_map = 1.0 - (1.0 - ref_map) * soft_mask
    if settings.signed:
        gen_map = 2.0 * gen_map - 1.0
    return ref_map.cpu(), gen_map.cpu()


def _part_is_current(part: Path, run_tag: str, sample: str, images: SampleImages) -> bool:
    """A finished part of this run's settings, computed from these very images."""
    if not part.is_file():
        return False
    try:
        stored = QualityMaps.load(part)
        return stored.metadata.get("run") == run_tag and stored.sources == {sample: images}
    except BadInputError:
        return False


def estimate_quality_maps(
    data_root: str | Path,
    extractor: PatchFeatureExtractor,
    settings: MapSettings,
    feature_metadata: dict[str, str],
    output: str | Path | None = None,
    batch_size: int = 8,
    state: PartialState | None = None,
) -> Path:
    """Compute maps for every `sample*/` of `data_root` and write one quality-map file.

    Work is sharded by sample over the accelerate processes. Each finished sample is written
    atomically to `DATA/.patch_quality_parts/` tagged with the settings and bound to the SHA-256 of
    the image bytes its maps were computed from, so a killed run resumes where it stopped and a
    changed setting or image is recomputed; the main process merges the parts into `output`
    (atomically, bound to the same digests) and removes them. The output depends only on the
    images and settings, not on the number of processes or an interruption: a rerun writes the
    same bytes.
    """
    state = state or PartialState(cpu=True)
    data_root = Path(data_root)
    output = Path(output) if output is not None else data_root / layout.QUALITY_MAPS_NAME
    samples = layout.list_samples(data_root)
    if not samples:
        raise BadInputError(f"{data_root} holds no sample* folders")
    entries = [(sample, *layout.sample_files(sample)) for sample in samples]  # validate all first
    run_meta = {**feature_metadata, **settings.metadata()}
    run_tag = hashlib.sha256(json.dumps(run_meta, sort_keys=True).encode()).hexdigest()
    parts_dir = data_root / PARTS_DIR_NAME
    with owning_output_dir(state, parts_dir, flag="--data_root"):  # one run at a time on this DATA
        if state.is_main_process:  # orphans of a killed run; a live writer's files are kept
            remove_stale_temp_files(output.parent, ["."], ".safetensors")
            remove_stale_temp_files(data_root, [PARTS_DIR_NAME], ".safetensors")

        todo = _pending_samples(entries[state.process_index :: state.num_processes], parts_dir, run_tag)
        progress = tqdm(total=len(todo), desc=f"quality maps [{state.process_index}]", disable=not state.is_local_main_process)
        for chunk in batched(todo, batch_size):
            _write_parts(chunk, extractor, settings, parts_dir, run_tag)
            progress.update(len(chunk))
        progress.close()

        state.wait_for_everyone()
        if state.is_main_process:
            _merge_parts([sample for sample, *_ in entries], parts_dir, run_tag, output, run_meta)
        state.wait_for_everyone()
    return output


def _pending_samples(entries: list, parts_dir: Path, run_tag: str) -> list[tuple[Path, Path, dict[int, Path]]]:
    """(sample, reference, generated) of the samples without a current part file."""
    todo = []
    for sample, _prompt, reference, generated in entries:
        if not _part_is_current(parts_dir / f"{sample.name}.safetensors", run_tag, sample.name, hash_sample_images(reference, generated)):
            todo.append((sample, reference, generated))
    return todo


def _write_parts(
    chunk: Sequence[tuple[Path, Path, dict[int, Path]]],
    extractor: PatchFeatureExtractor,
    settings: MapSettings,
    parts_dir: Path,
    run_tag: str,
) -> None:
    """Maps of a few samples from one feature-extractor batch; one part file per sample, tagged with the run, bound to the bytes decoded."""
    images, masks, sources = [], [], []
    for _sample, reference, generated in chunk:
        reference_image, reference_sha256 = load_rgb_image_and_sha256(reference)
        masks.append(foreground_patch_mask(reference_image, extractor.grid_size, settings.background_level, settings.foreground_fraction))
        images.append(reference_image)
        generated_sha256 = {}
        for k, path in generated.items():
            image, generated_sha256[k] = load_rgb_image_and_sha256(path)
            images.append(image)
        sources.append(SampleImages(reference_sha256, generated_sha256))
    features = extractor(images)
    offset = 0
    for (sample, _reference, generated), mask, sample_images in zip(chunk, masks, sources):
        reference_features = features[offset]
        maps = {
            (sample.name, k): quality_maps(reference_features, features[offset + index], mask, settings)
            for index, k in enumerate(generated, start=1)
        }
        offset += 1 + len(generated)
        save_quality_maps(parts_dir / f"{sample.name}.safetensors", maps, {"run": run_tag}, {sample.name: sample_images})


def _merge_parts(samples: list[Path], parts_dir: Path, run_tag: str, output: Path, run_meta: dict[str, str]) -> None:
    """Merge every sample's part into `output` (float16, atomically, bound to the parts' image digests), then remove the parts."""
    merged: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    sources: dict[str, SampleImages] = {}
    for sample in samples:
        part = QualityMaps.load(parts_dir / f"{sample.name}.safetensors")
        if part.metadata.get("run") != run_tag:
            raise BadInputError(f"part file for {sample.name} in {parts_dir} was made with other settings; rerun")
        sources.update(part.sources)
        for key in part.keys():
            merged[key] = tuple(m.half() for m in part.get(*key))
    metadata = {**run_meta, "num_samples": str(len(samples)), "num_pairs": str(len(merged))}
    save_quality_maps(output, merged, metadata, sources)
    shutil.rmtree(parts_dir)


def check_map_args(config: MapsConfig) -> None:
    """Sizes >= 1, fractions in [0, 1], and writable outputs, before the backbone loads."""
    require_flags_in_range(config, ("resolution", "vae_scale_factor", "batch_size", "image_size"), minimum=1)
    require_flags_in_range(config, ("foreground_fraction",), minimum=0, maximum=1)
    require_flags_in_range(config, ("good_threshold",))
    check_output_file(config.output or config.data_root / layout.QUALITY_MAPS_NAME)
    check_output_dir(config.data_root / PARTS_DIR_NAME, "--data_root")


def run(config: MapsConfig, state: PartialState) -> Path:
    """Load the backbone and estimate the maps of `config.data_root`; returns the written file."""
    check_launch(state.num_processes, "-m patch_quality.maps")
    latent_size, vae_factor = latent_grid(config.resolution, config.base_model_path, config.vae_scale_factor)
    settings = MapSettings(
        transform=config.transform,
        good_threshold=config.good_threshold,
        signed=config.signed,
        foreground_mask=config.foreground_mask,
        background_level=config.background_level,
        foreground_fraction=config.foreground_fraction,
        mask_reference_background=config.mask_reference_background,
        latent_size=latent_size,
    )
    extractor = PatchFeatureExtractor.from_pretrained(
        config.backbone,
        layer=config.layer,
        image_size=config.image_size,
        finetuned=config.finetuned,
        device=state.device,
        dtype=getattr(torch, config.dtype),
    )
    feature_metadata = {
        **describe(extractor, config.backbone, config.finetuned),
        "resolution": str(config.resolution),
        "vae_scale_factor": str(vae_factor),
    }
    return estimate_quality_maps(config.data_root, extractor, settings, feature_metadata, config.output, config.batch_size, state)


def main(argv: list[str] | None = None) -> None:
    config = maps_config(argv)
    quiet_libraries()
    with exit_on_reported_error(MAPS_PROG):
        check_map_args(config)
    state = PartialState(cpu=config.cpu, timeout=timedelta(seconds=config.ddp_timeout))  # init_process_group's timeout
    with exit_on_reported_error(MAPS_PROG):
        output = run(config, state)
    if state.is_main_process:
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
