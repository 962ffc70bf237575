"""Training speed: our PatchDPO loop against a straight re-implementation of the reference loop.

Both run on the same random-weight models (`stand_ins.sdxl`: `mid` on CPU, the full
SDXL / ViT-H / IP-Adapter-Plus shapes on GPU) and the same synthetic pairs, each in its own
process so peak memory is measured cleanly, and the ratio is printed at the end:

    python benchmarks/train_benchmark.py                      # CPU proxy (mid shape, 128 px)
    python benchmarks/train_benchmark.py --device cuda        # full SDXL config, 512 px, 4 pairs, fp16
    python benchmarks/train_benchmark.py --base_model flux    # FLUX CPU proxy (`stand_ins.flux` mid, 128 px)

On CPU the primary number is pairs per CPU-second of the (single-threaded) process, which other
jobs on a shared machine barely disturb; wall-clock pairs/s is printed next to it. On GPU it is
wall-clock pairs/s between synchronisations.

reference: the official `train_patchdpo.py` step: every step encodes the pixels with the fp32 VAE,
  the CLIP image encoder and both text encoders; the UNet keeps fp32 weights under autocast; the
  Resampler runs inside autograd (its weights require grad though the optimizer never sees
  them); the loss is gathered and synchronised every step. Its noise and timesteps are drawn as
  ours draws them (one generator per pair, seeded by the dataset), which costs the same and makes the losses comparable.
ours: `patchdpo.method` as `train_patchdpo.py --cache_dir` runs it: the frozen encoders' outputs
  are read from the feature cache (built once before timing; its build time is reported), the
  UNet's frozen weights are held in the compute dtype, the Resampler runs without autograd.
ours_no_cache: the same step with the frozen encoders run every step (what non-square
  references need), to separate the cache's share of the speed-up.

FLUX (`--base_model flux`): reference is the diffusers-style loop of `flux_reference.py`
(`FluxPipeline` + `load_ip_adapter`, text, image and latents encoded at every step); ours and
ours_no_cache are the same `patchdpo` step as above on the FLUX family (XLabs adapter, flow matching).

Speed never comes from a different computation: every variant starts from the same weights, and
the loss of its first step (same pairs, noise, timesteps and the official time ids) must match the
reference's to `loss_tolerance` (float rounding), or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_cli, also when not run as a script

from benchmark_cli import VARIANTS, train_parser  # noqa: E402

if __name__ == "__main__":
    train_parser(__doc__.splitlines()[0]).parse_args()  # --help answers before the imports below load torch

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from flux_reference import reference_train_loop  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from base_models import SDXL  # noqa: E402
from base_models.unet_family import DDPMObjective  # noqa: E402
from common.precision import mixed_precision_dtype  # noqa: E402
from common.sampling import EpochSampler  # noqa: E402
from ip_adapter.attention_processor import install_ip_adapter  # noqa: E402
from ip_adapter.checkpoint import load_ip_adapter_checkpoint, load_strict  # noqa: E402
from ip_adapter.image_encoder import load_image_encoder  # noqa: E402
from ip_adapter.loading import vae_scale_factor  # noqa: E402
from ip_adapter.resampler import Resampler  # noqa: E402
from ip_adapter.speed import channels_last_helps, speed_up_unet  # noqa: E402
from patch_quality.store import QualityMaps  # noqa: E402
from patchdpo.feature_cache import CachedEncoderOutputs, FeatureCache, build_feature_cache, cache_key  # noqa: E402
from patchdpo.method import EncodedPairs, Method, training_step  # noqa: E402
from patchdpo.models import load_training_models  # noqa: E402
from patchdpo.pair_dataset import EncoderInputs, PairDataset, index_pairs  # noqa: E402
from stand_ins import flux  # noqa: E402
from stand_ins.pairs import save_pair_data  # noqa: E402
from stand_ins.sdxl import SHAPES, save_sdxl_models  # noqa: E402

#: Per base model: the pipeline sub-folder of the saved stand-ins, their adapter file, and how to save them.
STAND_INS = {
    "sdxl": ("sdxl", "ip-adapter-plus.bin", lambda root, shape: save_sdxl_models(root, SHAPES[shape])),
    "flux": ("flux", "ip_adapter.safetensors", lambda root, shape: flux.save_flux_models(root, flux.SHAPES[shape])),
}


def model_paths(args) -> tuple[Path, Path, Path]:
    """(pipeline folder, image-encoder folder, adapter file) of the saved stand-ins."""
    folder, adapter, _ = STAND_INS[args.base_model]
    return Path(args.models) / folder, Path(args.models) / "image_encoder", Path(args.models) / adapter


LOGGING_STEPS = 10  # ours synchronises for the loss only when it logs, as train_patchdpo.py


def loss_tolerance(mixed_precision: str) -> float:
    """Relative difference allowed between first-step losses: float32 rounding, or half-precision's."""
    return 1e-4 if mixed_precision == "no" else 2e-2


class ReferenceIPAdapter(nn.Module):
    """The official wrapper: the Resampler runs inside the autograd graph of every step."""

    def __init__(self, unet: UNet2DConditionModel, image_proj_model: Resampler) -> None:
        super().__init__()
        self.unet = unet
        self.image_proj_model = image_proj_model

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs, image_embeds):
        ip_tokens = self.image_proj_model(image_embeds)
        encoder_hidden_states = torch.cat([encoder_hidden_states, ip_tokens], dim=1)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample


def reference_loop(args, accelerator: Accelerator, weight_dtype: torch.dtype, dataset_kwargs: dict):
    """Set up the official script's models; return a closure that runs one of its steps."""
    model_dir, device, local = Path(args.models) / "sdxl", accelerator.device, dict(local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **local)
    tokenizers = tuple(CLIPTokenizer.from_pretrained(model_dir, subfolder=s, **local) for s in ("tokenizer", "tokenizer_2"))
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **local).requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", **local).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **local).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **local).requires_grad_(False)
    image_encoder = load_image_encoder(Path(args.models) / "image_encoder", device, weight_dtype)
    checkpoint = load_ip_adapter_checkpoint(Path(args.models) / "ip-adapter-plus.bin")
    image_proj_model = Resampler.from_state_dict(
        checkpoint["image_proj"], Path(args.models) / "ip-adapter-plus.bin"
    )  # requires_grad stays True, as there
    adapter_modules = install_ip_adapter(unet)
    load_strict(adapter_modules, checkpoint["ip_adapter"], "ip_adapter", Path(args.models) / "ip-adapter-plus.bin")
    vae.to(device)  # fp32
    text_encoder.to(device, dtype=weight_dtype)
    text_encoder_2.to(device, dtype=weight_dtype)
    ip_adapter = ReferenceIPAdapter(unet, image_proj_model)  # the UNet keeps fp32 weights
    optimizer = torch.optim.AdamW(adapter_modules.parameters(), lr=3e-5, weight_decay=0.01)
    dataset = PairDataset(source=EncoderInputs(args.resolution, SDXL(), tokenizers), **dataset_kwargs)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=EpochSampler(len(dataset), 0), num_workers=args.num_workers)
    ip_adapter, optimizer, loader = accelerator.prepare(ip_adapter, optimizer, loader)

    def step(batch) -> torch.Tensor:
        with torch.no_grad():
            images = torch.cat([batch["reference_pixels"], batch["generated_pixels"]]).to(device, torch.float32)
            latents = (vae.encode(images).latent_dist.mean * vae.config.scaling_factor).to(weight_dtype)
        b = batch["reference_size"].shape[0]
        noise, timesteps = DDPMObjective(scheduler, model_dir).draw(batch["noise_seed"], latents.shape[1:], device, None)
        noise = noise.to(weight_dtype)
        timesteps, noise = timesteps.repeat(2), noise.repeat(2, 1, 1, 1)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            image_embeds = image_encoder(batch["clip_pixels"].to(device, weight_dtype), output_hidden_states=True).hidden_states[-2]
            image_embeds = image_embeds.repeat(2, 1, 1)
            text = text_encoder(batch["input_ids"], output_hidden_states=True).hidden_states[-2]
            output_2 = text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
            text_embeds = torch.cat([text, output_2.hidden_states[-2]], dim=-1).repeat(2, 1, 1)
            pooled = output_2.text_embeds.repeat(2, 1)
        original = torch.stack([batch["reference_size"], batch["generated_size"]], dim=1)
        target_size = torch.full((b, 2, 2), float(args.resolution), device=device)
        time_ids = torch.cat([original, torch.zeros(b, 2, 2, device=device), target_size], 1).to(weight_dtype)  # (B, 6, 2)
        pred = ip_adapter(noisy_latents, timesteps, text_embeds, {"text_embeds": pooled, "time_ids": time_ids}, image_embeds)
        weight = torch.cat([1 - batch["reference_map"], batch["generated_map"]]).unsqueeze(1)
        loss = (weight * (pred.float() - noise.float()) ** 2).mean()
        accelerator.gather(loss.repeat(b)).mean().item()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return loader, step, {}


def our_loop(args, accelerator: Accelerator, weight_dtype: torch.dtype, dataset_kwargs: dict):
    """Set up `train_patchdpo.py`'s pieces (with `--cache_dir` for variant "ours"); return one step."""
    model_dir, image_encoder_dir, adapter_file = model_paths(args)
    # SDXL: the time ids the reference loop feeds, the same cost as per-image ids; other families: read from the folder
    family = SDXL(official_time_ids=True) if args.base_model == "sdxl" else None
    models = load_training_models(model_dir, image_encoder_dir, adapter_file, accelerator.device, weight_dtype, family=family)
    encoders, tokenizers, cache, extras = models.encoders, models.encoders.tokenizers, None, {}
    if args.variant == "ours":
        key = cache_key(args.resolution, model_dir, image_encoder_dir, weight_dtype)
        cache_dir = Path(args.work_dir) / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)  # time a cold build
        cache = FeatureCache.for_key(cache_dir, key, models.family.prompt_fields)
        started = time.perf_counter()
        build_feature_cache(cache, dataset_kwargs["pairs"], encoders, args.resolution, show_progress=False)
        extras["cache_build_s"] = time.perf_counter() - started
        encoders = models.encoders.kept_with_cache(clip_per_step=False)  # the benchmark's references are square
        models.encoders = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    source = (
        EncoderInputs(args.resolution, models.family, tokenizers) if cache is None else CachedEncoderOutputs(cache, clip_per_step=False)
    )
    dataset = PairDataset(source=source, **dataset_kwargs)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=EpochSampler(len(dataset), 0), num_workers=args.num_workers)
    model = models.model
    speed_up_unet(  # as train_patchdpo.py (--compile)
        model.unet, compile=args.compile, channels_last=channels_last_helps(model.unet.device), backend=args.compile_backend
    )
    optimizer = torch.optim.AdamW(model.adapter_modules.parameters(), lr=3e-5, weight_decay=0.01)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    counter = {"step": 0}

    def step(batch) -> torch.Tensor:
        counter["step"] += 1
        cond = EncodedPairs.from_batch(batch, encoders)
        output = training_step(prepared, cond, Method("patch_dpo", models.objective, args.resolution))
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counter["step"] % LOGGING_STEPS == 0:
            accelerator.reduce(output.loss.detach(), "mean").item()
        return output.loss.detach()

    return loader, step, extras


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(args) -> dict:
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    weight_dtype = mixed_precision_dtype(accelerator.mixed_precision)
    latent_size = args.resolution // vae_scale_factor(AutoencoderKL.load_config(model_paths(args)[0], subfolder="vae"))
    maps = QualityMaps.load(Path(args.data) / "patch_quality.safetensors")
    dataset_kwargs = dict(pairs=index_pairs(args.data, maps, 1, latent_size), latent_size=latent_size, seed=0, quality_maps=maps)
    reference = reference_loop if args.base_model == "sdxl" else reference_train_loop
    setup = reference if args.variant == "reference" else our_loop
    loader, step, extras = setup(args, accelerator, weight_dtype, dataset_kwargs)
    batches = iter(loader)
    for index in range(args.warmup):
        started = time.perf_counter()
        loss = step(next(batches))
        if index == 0:  # the loss before any update is comparable across variants; the time includes --compile's
            first_loss = loss.item()
            _synchronize()
            extras["first_step_s"] = time.perf_counter() - started
    if args.count_flops:  # one more step, counted: model FLOPs of a training step (forward + backward)
        with FlopCounterMode(display=False) as flop_counter:
            step(next(batches))
        extras["flops_per_step"] = flop_counter.get_total_flops()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        extras["peak_gpu_gib_setup_and_warmup"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step(next(batches))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = {
        "variant": args.variant,
        "pairs_per_s": args.steps * args.batch_size / seconds,
        "pairs_per_cpu_s": args.steps * args.batch_size / cpu_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_loss": first_loss,
        **extras,
    }
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30  # the timed training steps
        result["device_name"] = torch.cuda.get_device_name()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = train_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    defaults = dict(
        shape="full" if gpu else "mid",
        resolution=512 if gpu else 128,
        batch_size=4 if gpu else 2,
        mixed_precision="fp16" if gpu else "no",
        num_workers=4 if gpu else 0,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        models, data = work / f"models-{args.base_model}-{args.shape}", work / f"data-{args.resolution}"
        folder, adapter, save = STAND_INS[args.base_model]
        if not (models / adapter).is_file():
            print(f"building random {args.shape} {args.base_model} models in {models} ...", flush=True)
            save(models, args.shape)
        factor = vae_scale_factor(AutoencoderKL.load_config(models / folder, subfolder="vae"))
        num_samples = (args.warmup + args.steps + args.count_flops) * args.batch_size
        shutil.rmtree(data, ignore_errors=True)
        save_pair_data(data, num_samples, args.resolution, args.resolution // factor)
        results = {}
        for variant in VARIANTS:
            command = [
                sys.executable,
                __file__,
                *(argv if argv is not None else sys.argv[1:]),
                "--variant",
                variant,
                "--models",
                str(models),
                "--data",
                str(data),
                "--work_dir",
                str(work),
            ]
            for name in ("base_model", "device", "shape", "resolution", "batch_size", "mixed_precision", "num_workers", "threads"):
                command += [f"--{name}", str(getattr(args, name))]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"variant {variant} failed:\n{child.stderr[-3000:]}")
            results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps(results[variant]), flush=True)
    ref, ours = results["reference"], results["ours"]
    gpu = "peak_gpu_gib" in ref
    memory, speed = ("peak_gpu_gib", "pairs_per_s") if gpu else ("peak_rss_gib", "pairs_per_cpu_s")
    device = ref["device_name"] if gpu else f"CPU, {args.threads} torch thread(s)"
    print(
        f"\n{device}: {args.base_model} shape={args.shape} resolution={args.resolution} pairs/step={args.batch_size} "
        f"mixed_precision={args.mixed_precision} timed steps={args.steps} (after {args.warmup} warm-up)"
    )
    print(f"| loop | {speed} | wall pairs/s | {memory} |\n|---|---|---|---|")
    for name, result in (("reference", ref), ("ours without --cache_dir", results["ours_no_cache"]), ("ours (--cache_dir)", ours)):
        print(f"| {name} | {result[speed]:.3f} | {result['pairs_per_s']:.3f} | {result[memory]:.2f} |")
    no_cache = results["ours_no_cache"]
    print(
        f"speed-up {ours[speed] / ref[speed]:.2f}x with the cache, {no_cache[speed] / ref[speed]:.2f}x without ({speed}); "
        f"memory ratio {ours[memory] / ref[memory]:.2f} ({memory}); "
        f"one-off cache build {ours['cache_build_s']:.1f} s for {(args.warmup + args.steps) * args.batch_size} samples"
    )
    check_losses_agree(results, loss_tolerance(args.mixed_precision))


def check_losses_agree(results: dict[str, dict], tolerance: float) -> None:
    """Fail unless every variant's first-step loss matches the reference loop's (relative `tolerance`)."""
    reference = results["reference"]["first_loss"]
    losses = ", ".join(f"{name} {result['first_loss']:.6g}" for name, result in results.items())
    print(f"first-step losses: {losses}")
    for name, result in results.items():
        if abs(result["first_loss"] - reference) > tolerance * abs(reference):
            raise SystemExit(f"the loops disagree: first-step loss of {name} is {result['first_loss']:.6g}, reference {reference:.6g}")


if __name__ == "__main__":
    main()
