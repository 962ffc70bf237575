"""Overlay quality maps on their images, because people check quality maps by looking at them.

For every (sample, k) in the quality-map file one PNG strip is written:
reference | reference quality | generated k | generated quality. Quality is coloured red (bad,
0) -> yellow -> green (good, 1); signed maps ([-1, 1]) are shown on the same scale. Maps are
enlarged with nearest-neighbour so each latent cell stays visible, over the same centred square
of the image that training and the maps use.

    accelerate launch -m patch_quality.visualize --data_root DATA --output_dir DATA_viz
"""

from __future__ import annotations

from pathlib import Path

from patch_quality.cli import visualize_config

if __name__ == "__main__":
    visualize_config()  # --help and a wrong flag answer before the imports below load torch

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common.checks import require_flags_in_range
from common.cli import exit_on_reported_error, quiet_libraries
from common.images import load_rgb_image
from common.io import atomic_save_image
from common.outputs import check_output_dir
from patch_quality import layout
from patch_quality.cli import VISUALIZE_PROG
from patch_quality.features import center_square
from patch_quality.store import QualityMaps

CAPTION_HEIGHT = 14


def quality_colors(quality: torch.Tensor) -> np.ndarray:
    """(H, W) qualities in [0, 1] -> (H, W, 3) uint8, red -> yellow -> green."""
    q = quality.clamp(0.0, 1.0).numpy()
    red = np.clip(2.0 * (1.0 - q), 0.0, 1.0)
    green = np.clip(2.0 * q, 0.0, 1.0)
    rgb = np.stack([red, green, np.zeros_like(q)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: Image.Image, quality: torch.Tensor, size: int, alpha: float = 0.5) -> Image.Image:
    """Blend the coloured map over the centred square of `image`, both shown at `size`."""
    base = center_square(image.convert("RGB")).resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(quality_colors(quality)).resize((size, size), Image.NEAREST)
    return Image.blend(base, heat, alpha)


def pair_panel(
    reference: Image.Image,
    generated: Image.Image,
    reference_map: torch.Tensor,
    generated_map: torch.Tensor,
    k: int,
    signed: bool = False,
    size: int = 256,
    alpha: float = 0.5,
) -> Image.Image:
    if signed:
        generated_map = (generated_map + 1.0) / 2.0
    tiles = [
        ("reference", center_square(reference.convert("RGB")).resize((size, size), Image.BICUBIC)),
        ("reference quality", overlay(reference, reference_map, size, alpha)),
        (f"generated {k}", center_square(generated.convert("RGB")).resize((size, size), Image.BICUBIC)),
        ("generated quality", overlay(generated, generated_map, size, alpha)),
    ]
    panel = Image.new("RGB", (size * len(tiles), size + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(panel)
    for column, (caption, tile) in enumerate(tiles):
        panel.paste(tile, (column * size, CAPTION_HEIGHT))
        draw.text((column * size + 2, 1), caption, fill=(0, 0, 0))
    return panel


def visualize(
    data_root: str | Path,
    output_dir: str | Path,
    maps_path: str | Path | None = None,
    max_samples: int | None = None,
    size: int = 256,
    alpha: float = 0.5,
    overwrite: bool = False,
    state: PartialState | None = None,
) -> list[Path]:
    """Write one panel per stored (sample, k); existing panels are kept unless `overwrite`."""
    state = state or PartialState(cpu=True)
    data_root, output_dir = Path(data_root), Path(output_dir)
    stored = QualityMaps.load(maps_path or data_root / layout.QUALITY_MAPS_NAME)
    signed = stored.metadata.get("signed") == "true"
    samples = list(dict.fromkeys(sample for sample, _ in stored.keys()))  # keys() is in index order
    samples = samples[:max_samples] if max_samples is not None else samples
    written = []
    for sample in tqdm(samples[state.process_index :: state.num_processes], desc="overlays", disable=not state.is_local_main_process):
        _prompt, reference_path, generated_paths = layout.sample_files(data_root / sample)
        reference = load_rgb_image(reference_path)
        for k, generated_path in generated_paths.items():
            if (sample, k) not in stored:
                continue
            target = output_dir / f"{sample}_gen_{k}.png"
            if target.exists() and not overwrite:
                continue
            reference_map, generated_map = stored.get(sample, k)
            panel = pair_panel(reference, load_rgb_image(generated_path), reference_map, generated_map, k, signed, size, alpha)
            written.append(atomic_save_image(panel, target))
    state.wait_for_everyone()
    return written


def main(argv: list[str] | None = None) -> None:
    config = visualize_config(argv)
    quiet_libraries()
    with exit_on_reported_error(VISUALIZE_PROG):
        require_flags_in_range(config, ("size",), minimum=1)
        require_flags_in_range(config, ("alpha",), minimum=0, maximum=1)
        check_output_dir(config.output_dir)
        written = visualize(
            config.data_root, config.output_dir, config.maps, config.max_samples, config.size, config.alpha, config.overwrite
        )
    print(f"wrote {len(written)} panels to {config.output_dir}")


if __name__ == "__main__":
    main()
