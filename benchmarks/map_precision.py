"""What storing quality maps as float16 (the maps file) instead of float32 (the official pickle) costs training.

    python benchmarks/map_precision.py --dreambench /work/shared/dreambench/dataset --out map_precision_out

Maps: the stand-in maps (uniform in [0, 1], `stand_ins.pairs`) and maps from `patch_quality.maps` on
DreamBench photos (reference: a subject's first photo; generated: each of its other photos) with the
tiny random ViT and DINOv2 backbones, `--transform raw` and `minmax`, at the 64x64 latent grid of
512 px. Weights are what `patchdpo.method.patch_weights` makes of them: `1 - reference_map` and
`generated_map`. Reported: the relative weight error |w16 - w32| / w32 over weights > 0 (max, mean,
and sum |w16 - w32| / sum w32), and the relative change of `patch_dpo_loss` and of its gradient on
batches of 4 pairs whose prediction error is standard normal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patch_quality.features import PatchFeatureExtractor  # noqa: E402
from patch_quality.maps import MapSettings, foreground_patch_mask, quality_maps  # noqa: E402
from patchdpo.method import patch_dpo_loss, patch_weights  # noqa: E402
from stand_ins.vit_models import save_tiny_dinov2, save_tiny_vit  # noqa: E402

LATENT = 64
BATCH = 4


def stand_in_maps(pairs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    return [tuple(torch.from_numpy(rng.random((LATENT, LATENT), dtype=np.float32)) for _ in range(2)) for _ in range(pairs)]


def dreambench_maps(dreambench: Path, backbone: Path, transform: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from common.images import load_rgb_image

    extractor = PatchFeatureExtractor.from_pretrained(backbone, layer=-1)
    settings = MapSettings(transform=transform, latent_size=LATENT)
    maps = []
    for subject in sorted(path for path in dreambench.iterdir() if path.is_dir()):
        photos = [load_rgb_image(path) for path in sorted(subject.glob("*.jpg"))]
        features = extractor(photos)
        mask = foreground_patch_mask(photos[0], extractor.grid_size)
        maps += [quality_maps(features[0], features[index], mask, settings) for index in range(1, len(photos))]
    return maps


def figures(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    reference, generated = (torch.stack(part) for part in zip(*maps))
    w32 = patch_weights(reference, generated)
    w16 = patch_weights(reference.half().float(), generated.half().float())
    positive = w32 > 0
    error = (w16 - w32).abs()
    relative = error[positive] / w32[positive]
    generator = torch.Generator().manual_seed(0)
    loss_changes, grad_changes = [], []
    for start in range(0, len(maps) - BATCH + 1, BATCH):
        target = torch.randn(2 * BATCH, 4, LATENT, LATENT, generator=generator)
        pred = (target + torch.randn(target.shape, generator=generator)).requires_grad_()
        losses, grads = [], []
        for ref, gen in ((reference, generated), (reference.half().float(), generated.half().float())):
            loss = patch_dpo_loss(pred, target, ref[start : start + BATCH], gen[start : start + BATCH])
            losses.append(loss.item())
            grads.append(torch.autograd.grad(loss, pred)[0])
        loss_changes.append(abs(losses[1] - losses[0]) / losses[0])
        grad_changes.append(((grads[1] - grads[0]).norm() / grads[0].norm()).item())
    return {
        "pairs": len(maps),
        "weights_zero_share": 1 - positive.float().mean().item(),
        "weights_rounded_to_zero_share": ((w16 == 0) & positive).float().mean().item(),
        "relative_weight_error_max": relative.max().item(),
        "relative_weight_error_mean": relative.mean().item(),
        "weight_error_sum_over_weight_sum": (error.sum() / w32.sum()).item(),
        "absolute_weight_error_max": error.max().item(),
        "loss_relative_change_max": max(loss_changes),
        "loss_relative_change_mean": float(np.mean(loss_changes)),
        "gradient_relative_change_max": max(grad_changes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dreambench", type=Path, required=True, help="DreamBench dataset folder (one folder of photos per subject)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {"stand-in (uniform)": figures(stand_in_maps(400))}
    with tempfile.TemporaryDirectory() as work:
        for name, save in (("tiny ViT", save_tiny_vit), ("tiny DINOv2", save_tiny_dinov2)):
            backbone = save(Path(work) / name.replace(" ", "_"))
            for transform in ("raw", "minmax"):
                rows[f"DreamBench, {name}, {transform}"] = figures(dreambench_maps(args.dreambench, backbone, transform))
                print(name, transform, json.dumps(rows[f"DreamBench, {name}, {transform}"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        "| maps | pairs | weights = 0 | > 0 but 0 in fp16 | rel. weight error max | mean | sum abs err / sum w | loss change max | mean | grad change max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['pairs']} | {row['weights_zero_share']:.1%} | {row['weights_rounded_to_zero_share']:.3%} | {row['relative_weight_error_max']:.2e} "
            f"| {row['relative_weight_error_mean']:.2e} | {row['weight_error_sum_over_weight_sum']:.2e} "
            f"| {row['loss_relative_change_max']:.2e} | {row['loss_relative_change_mean']:.2e} | {row['gradient_relative_change_max']:.2e} |"
        )


if __name__ == "__main__":
    main()
