"""DreamBench generation speed: our inference path against the reference inference loop.

    python benchmarks/inference_benchmark.py                 # CPU proxy: mid-size random SDXL, 128 px
    python benchmarks/inference_benchmark.py --shape full    # GPU: the SDXL / ViT-H configs, 1024 px, 30 steps
    python benchmarks/inference_benchmark.py --base_model flux   # FLUX CPU proxy (`stand_ins.flux` mid, 128 px)

Both paths run in one process on the same random-weight models (`stand_ins.sdxl`) and the
same (subject, prompt) items:

- reference: a straight re-implementation of the official `inference_dreambooth.py` loop: batches
  of 2 prompts, each batch re-encoding all reference photos of its subjects through CLIP and the
  Resampler and averaging the tokens, one generator seeded 42 per batch.
  (Its generator lives on the CPU so that its noise is comparable with ours; the speed is unchanged.)
- ours: `dreambench.generation.generate_batch` as `inference_dreambooth.py` runs it (same pipeline
  loading, VAE slicing included, for both paths): image tokens
  computed once per subject and cached, `--batch_size` images per denoising batch (subjects mixed),
  one generator per image.

FLUX (`--base_model flux`): reference is diffusers' own path (`flux_reference.reference_generate`:
`FluxPipeline` + `load_ip_adapter`, batches of 2 prompts of one subject, the reference image given
as `ip_adapter_image`, so CLIP runs in every call); ours is `FluxIPAdapter` through the same
`generate_batch`. Both use one reference image per subject (diffusers takes one per call).

Speed never comes from changed results: our path is also run with every item seeded 42, and the
first image of each reference batch (whose noise is then identical) must match ours to a level or
two of 255 (batch-size float rounding), or the benchmark fails.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmark_cli, also when not run as a script

from benchmark_cli import inference_parser  # noqa: E402

if __name__ == "__main__":
    inference_parser(__doc__.split("\n\n")[0]).parse_args()  # --help answers before the imports below load torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flux_reference import load_reference_pipeline, reference_generate  # noqa: E402
from PIL import Image  # noqa: E402

from base_models.generation import load_generation_pipeline  # noqa: E402
from common.batching import batched  # noqa: E402
from common.io import atomic_write_json  # noqa: E402
from dreambench.benchmark import prompts_for  # noqa: E402
from dreambench.data import load_conditioning_images  # noqa: E402
from ip_adapter import DEFAULT_NEGATIVE_PROMPT, IPAdapterPlusXL  # noqa: E402
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch  # noqa: E402
from ip_adapter.flux_generation import FluxIPAdapter  # noqa: E402
from ip_adapter.ip_adapter import ImagePromptAdapter  # noqa: E402
from stand_ins import flux  # noqa: E402
from stand_ins.sdxl import SHAPES, save_sdxl_models  # noqa: E402

REFERENCE_SEED = 42
REFERENCE_BATCH = 2


def reference_loop(
    ip_model: IPAdapterPlusXL,
    items: Sequence[GenerationItem],
    references: dict[str, list[Image.Image]],
    scale: float,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """The official loop: per batch of 2, encode every reference photo, average, one seeded generator."""
    images: list[Image.Image] = []
    for batch in batched(items, REFERENCE_BATCH):
        cond, uncond = ip_model.get_image_embeds([references[item.subject] for item in batch])
        images += ip_model.generate_from_tokens(
            cond,
            uncond,
            [item.prompt for item in batch],
            [DEFAULT_NEGATIVE_PROMPT] * len(batch),
            torch.Generator("cpu").manual_seed(REFERENCE_SEED),
            scale=scale,
            **pipeline_kwargs,
        )
    return images


def our_path(
    ip_model: ImagePromptAdapter,
    items: Sequence[GenerationItem],
    references: dict[str, list[Image.Image]],
    batch_size: int,
    scale: float,
    **pipeline_kwargs,
) -> list[Image.Image]:
    tokens = SubjectTokens(ip_model, references.__getitem__)
    images: list[Image.Image] = []
    for batch in batched(items, batch_size):
        images += generate_batch(ip_model, tokens, batch, scale=scale, **pipeline_kwargs)
    return images


def load_paths(
    base_model: str, shape: str, folder: Path, dtype: torch.dtype, device: torch.device, references: dict[str, list[Image.Image]]
) -> tuple[ImagePromptAdapter, Callable[..., list[Image.Image]]]:
    """Our adapter wrapper and the reference path (items, **pipeline kwargs -> images) on stand-ins saved in `folder`."""
    if base_model == "flux":
        paths = flux.save_flux_models(folder, flux.SHAPES[shape])
        ip_model = FluxIPAdapter(load_generation_pipeline(paths.flux_dir, dtype), paths.image_encoder_dir, paths.ip_ckpt, device)
        pipe = load_reference_pipeline(folder, dtype).to(device)
        return ip_model, lambda items, **kwargs: reference_generate(pipe, items, references, **kwargs)
    paths = save_sdxl_models(folder, SHAPES[shape])
    ip_model = IPAdapterPlusXL(load_generation_pipeline(paths.sdxl_dir, dtype), paths.image_encoder_dir, paths.ip_ckpt, device)
    return ip_model, lambda items, **kwargs: reference_loop(ip_model, items, references, **kwargs)


def timed(device: torch.device, run: Callable[[], list[Image.Image]]) -> tuple[list[Image.Image], float, float | None]:
    """Images, wall seconds and peak accelerator memory (GiB) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return images, seconds, peak


def pixel_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def main(argv: list[str] | None = None) -> dict:
    args = inference_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    defaults = dict(shape="full" if cuda else "mid", size=1024 if cuda else 128, num_inference_steps=30 if cuda else 10)
    for name, value in dict(defaults, dtype="float16" if cuda else "float32").items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    references = {name: load_conditioning_images(args.data_root, name, kosmosg=False) for name in args.subjects}
    items = [
        GenerationItem(name, prompt, REFERENCE_SEED) for name in args.subjects for prompt in prompts_for(name)[: args.prompts_per_subject]
    ]
    if args.base_model == "flux":  # diffusers' FLUX path takes one reference image per call
        references = {name: images[:1] for name, images in references.items()}
    with tempfile.TemporaryDirectory() as folder:
        ip_model, reference = load_paths(args.base_model, args.shape, Path(folder), dtype, device, references)
    common = dict(num_inference_steps=args.num_inference_steps, scale=args.scale, height=args.size, width=args.size)
    warmup = dict(common, num_inference_steps=1)
    reference(items[:REFERENCE_BATCH], **warmup)
    our_path(ip_model, items[:REFERENCE_BATCH], references, args.batch_size, **warmup)

    ref_images, ref_seconds, ref_peak = timed(device, lambda: reference(items, **common))
    our_images, our_seconds, our_peak = timed(device, lambda: our_path(ip_model, items, references, args.batch_size, **common))
    differences = [pixel_difference(ref_images[i], our_images[i]) for i in range(0, len(items), REFERENCE_BATCH)]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": device_name,
        "base_model": args.base_model,
        "shape": args.shape,
        "size": args.size,
        "steps": args.num_inference_steps,
        "dtype": args.dtype,
        "images": len(items),
        "batch_size": args.batch_size,
        "reference_images_per_s": len(items) / ref_seconds,
        "ours_images_per_s": len(items) / our_seconds,
        "speedup": ref_seconds / our_seconds,
        "reference_peak_gib": ref_peak,
        "ours_peak_gib": our_peak,
        "max_pixel_difference_where_seeds_agree": max(differences),
    }
    print(
        f"{device_name}: {args.shape} {args.base_model} config, {args.size}px, {args.num_inference_steps} steps, {args.dtype}, {len(items)} images"
    )
    for label, seconds, peak in (("reference loop", ref_seconds, ref_peak), ("ours", our_seconds, our_peak)):
        memory = f", peak {peak:.2f} GiB" if peak is not None else ""
        print(f"  {label:<15} {len(items) / seconds:8.3f} images/s ({seconds:.1f} s{memory})")
    print(f"  speedup {result['speedup']:.2f}x; max pixel difference where seeds agree: {max(differences)}")
    if args.output is not None:
        atomic_write_json(args.output, result)
    if max(differences) > args.tolerance:
        raise SystemExit(f"outputs differ by {max(differences)} > {args.tolerance} levels where the seeds agree")
    return result


if __name__ == "__main__":
    main()
