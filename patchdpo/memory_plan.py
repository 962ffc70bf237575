"""Will it fit my GPU? The peak memory of one training process, planned on a CPU without allocating it.

    python -m patchdpo.memory_plan --pretrained_model_name_or_path SG161222/RealVisXL_V1.0 \
        --image_encoder_path h94/IP-Adapter/models/image_encoder --mixed_precision fp16 --train_batch_size 4

Only the models' model_index.json (which family) and config.json files are read (a folder holding just those is enough). The real module
code (diffusers' UNet with our IP-Adapter layers, the frozen Resampler, the encoders, the training
loss) runs under `FakeTensorMode`, and `common.live_memory` counts the storages alive at each op: the
weights and optimizer state as the trainer places them, plus the peak of one micro-step's forward and
backward (activations and gradients), of the per-step encoding (without `--cache_dir`) and of
validation. The same phases then run once more on fake CUDA tensors (`common.fake_cuda`, forward
passes only): a tensor the code makes on the CPU fails there as it would on a first GPU run. Not counted: the CUDA context and kernels' workspaces (about 0.5-1 GB), allocator
fragmentation, and CUDA-only kernel choices (activations are counted with CPU kernels; SDPA saves
the same tensors on both); the plan keeps 10 % + 1 GiB of every card free for them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.cli import exit_on_reported_error
from common.errors import BadInputError

GIB = 2**30
CARDS_GIB = (24, 40, 48, 80, 141)
RESERVED = (0.10, 1.0)  # fraction of the card and GiB kept free for the CUDA context, workspaces and fragmentation
PRECISIONS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class PlanSettings:
    """The training flags memory depends on (their names are train_patchdpo.py's)."""

    resolution: int = 512
    train_batch_size: int = 4
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    cache_dir: bool = False
    fp32_unet: bool = False
    use_8bit_adam: bool = False
    gpus: int = 1
    shard_base: bool = False
    validation_size: int | None = None


def read_config(model: str, sub: str, flag: str) -> dict[str, Any]:
    """`model/sub` (a local folder) or the file `sub` of Hugging Face repo `model`, nothing else downloaded."""
    from common.hub import is_local, resolve_file

    path = Path(model) / sub if is_local(model) else resolve_file(f"{model}/{sub}", flag)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{flag} {model}: cannot read {sub} ({type(error).__name__})") from None


def _nbytes(module: Any, only: Any = None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if only is None or only(p))


def _peak(run: Any, *existing: Any) -> int:
    """The peak bytes `run()` adds to the storages of `existing` modules."""
    from common.live_memory import LiveStorageCounter

    tensors = [t for module in existing for t in (*module.parameters(), *module.buffers())]
    with LiveStorageCounter(tensors) as counter:
        run()
    return counter.peak


def _placed_models(family: Any, model: str, vision_config: dict, settings: PlanSettings, weight_dtype: Any) -> dict[str, Any]:
    """The family's models built from their configs and placed as `patchdpo.models.load_training_models` places them
    (the adapter fresh, as without `--pretrained_ip_adapter_path`: a checkpoint has the same shapes)."""
    import logging

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from common.fake_cuda import place
    from patchdpo.models import IPAdapterTrainingModel

    unet, vae, text_encoders = family.plan_models(lambda sub: read_config(model, sub, "--pretrained_model_name_or_path"))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config))
    logging.disable(logging.WARNING)  # the fresh adapter's start-up warning is the trainer's, not the plan's
    try:
        adapter = family.load_adapter(unet, image_encoder.config, None)
    finally:
        logging.disable(logging.NOTSET)
    frozen = [unet, vae, *text_encoders, image_encoder, *adapter.frozen]
    for module in frozen:
        module.requires_grad_(False)
    adapter_params = {id(p) for p in adapter.modules.parameters()}
    place(unet, dtype=torch.float32 if settings.fp32_unet else weight_dtype, skip=frozenset(adapter_params))
    adapter.modules.requires_grad_(True)
    for module in (*adapter.frozen, *text_encoders, image_encoder):
        place(module, dtype=weight_dtype)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    training_model = IPAdapterTrainingModel(family, unet, adapter, weight_dtype)
    return dict(
        unet=unet, vae=vae, text_encoders=text_encoders, image_encoder=image_encoder, adapter=adapter,
        training_model=training_model, frozen=frozen,
    )  # fmt: skip


def _static_components(family: Any, m: dict[str, Any], settings: PlanSettings) -> dict[str, int]:
    """Weights and optimizer state, alive for the whole run; with `shard_base`, this process's FSDP2 shards of the denoiser."""
    from patchdpo.sharding import planned_bytes

    frozen_name = f"frozen {family.denoiser_name} weights"
    if settings.shard_base:
        shards = planned_bytes(m["unet"], settings.gpus)
        frozen = {f"{frozen_name} (1/{settings.gpus} shard)": shards.frozen}
        adapter_bytes, gathered = shards.trainable, {"FSDP2 gathered blocks (root + running + prefetched)": shards.gathered}
    else:
        frozen, adapter_bytes, gathered = (
            {frozen_name: _nbytes(m["unet"], lambda p: not p.requires_grad)},
            _nbytes(m["adapter"].modules),
            {},
        )
    # freed once the cache is built, unless validation samples with them
    freed = settings.cache_dir and not settings.validation_size
    encoders = {"VAE (fp32)": m["vae"], **{f"text encoder {type(e).__name__}": e for e in m["text_encoders"]}, "CLIP image encoder": m["image_encoder"]}  # fmt: skip
    return {
        **frozen,
        "trainable adapter (fp32)": adapter_bytes,
        # AdamW8bit: uint8 moments plus one fp32 scale per 2048-value block of each
        "AdamW moments": int(2 * (adapter_bytes // 4) * (1 + 4 / 2048)) if settings.use_8bit_adam else 2 * adapter_bytes,
        "DDP gradient buckets": adapter_bytes if settings.gpus > 1 and not settings.shard_base else 0,
        **gathered,
        **{f"frozen {type(module).__name__}": _nbytes(module) for module in m["adapter"].frozen},
        **{name: 0 if freed else _nbytes(module) for name, module in encoders.items()},
    }


def _phase_runs(family: Any, m: dict[str, Any], settings: PlanSettings, weight_dtype: Any) -> dict[str, Any]:
    """The phases of a run by name, each a function of the device its inputs are made on: the training step, the
    per-step encoding (without the cache) and validation sampling (with `validation_size`)."""
    import torch

    from common.fake_cuda import cuda_autocast
    from patchdpo.method import patch_dpo_loss

    unet, vae = m["unet"], m["vae"]
    batch, latent, channels = settings.train_batch_size, settings.resolution // family.latent_scale(vae.config), vae.config.latent_channels
    half = weight_dtype if settings.mixed_precision != "no" else None

    def autocast(device: torch.device) -> Any:
        return cuda_autocast(half) if device.type == "cuda" else torch.autocast("cpu", dtype=weight_dtype, enabled=half is not None)

    def clip_pixels(device: torch.device) -> torch.Tensor:
        return torch.randn(batch, 3, 224, 224, dtype=weight_dtype, device=device)

    features: dict[str, torch.Tensor] = {}

    def image_features(device: torch.device) -> torch.Tensor:
        """What the adapter reads of the references (cached or encoded per step), made before any phase counts."""
        if device.type not in features:
            with torch.no_grad():
                features[device.type] = family.image_features(m["image_encoder"], clip_pixels(device))
        return features[device.type]

    image_features(torch.device("cpu"))

    def step(device: torch.device) -> None:
        """One micro-step; on fake CUDA without the backward pass (torch's autograd asks the CUDA driver for its streams)."""
        inputs = (
            torch.randn(2 * batch, channels, latent, latent, device=device),
            torch.randint(0, 1000, (2 * batch,), device=device),
            image_features(device),
            family.example_prompt_embeds(unet, batch, weight_dtype, device),
            family.example_added_conditioning(unet, 2 * batch, weight_dtype, device),
        )
        maps = torch.rand(batch, latent, latent, device=device)
        with autocast(device):
            pred = m["training_model"](*inputs)
        loss = patch_dpo_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32), maps, maps)
        if device.type == "cpu":
            loss.backward()

    def encode(device: torch.device) -> None:
        with torch.no_grad():
            family.encode_latents(vae, torch.randn(2 * batch, 3, settings.resolution, settings.resolution, device=device))
            family.encode_prompts(m["text_encoders"], family.example_token_ids(batch, device))
            family.image_features(m["image_encoder"], clip_pixels(device))

    def sample(device: torch.device) -> None:
        """One image with classifier-free guidance (2 rows) through the adapter, then its decoding."""
        grid = settings.validation_size // family.latent_scale(vae.config)
        prompt, added = (
            family.example_prompt_embeds(unet, 1, weight_dtype, device),
            family.example_added_conditioning(unet, 2, weight_dtype, device),
        )
        with torch.no_grad(), autocast(device):
            hidden, added = m["adapter"].condition(prompt, image_features(device)[:1], added, weight_dtype)
            timesteps = torch.tensor([999, 999], device=device)
            family.denoise(unet, torch.randn(2, channels, grid, grid, dtype=weight_dtype, device=device), timesteps, hidden, added)
            vae.decode(torch.randn(1, channels, grid, grid, device=device))

    runs = {"training step (activations + gradients)": step}
    if not settings.cache_dir:
        runs["per-step encoding (VAE, text, CLIP image)"] = encode
    if settings.validation_size:  # dreambench.validation samples with the training models: activations only
        runs["validation sampling"] = sample
    return runs


def _phases(runs: dict[str, Any], m: dict[str, Any]) -> dict[str, int]:
    """The activation peak of each phase, counted on the CPU."""
    import torch

    cpu = torch.device("cpu")
    return {name: _peak(lambda run=run: run(cpu), *m["frozen"]) for name, run in runs.items()}


def _rehearse_on_cuda(runs: dict[str, Any], m: dict[str, Any]) -> None:
    """The phases again with the models and inputs on fake CUDA: a tensor made on the CPU inside them fails as on a GPU."""
    from common.fake_cuda import CUDA, place

    for module in m["frozen"]:
        place(module, CUDA)
    for run in runs.values():
        run(CUDA)


def plan_training_memory(
    model: str, image_encoder: str, settings: PlanSettings, fake: bool = True, rehearse: bool = False
) -> dict[str, Any]:
    """Bytes per component and the peak of one training process (see the module docstring); the family says what to build.

    `fake=False` runs the same code on real tensors (small models only): what the plan counts is then
    what is really allocated, which is how the plan is tested. `rehearse` then runs the phases' forward
    passes again on fake CUDA tensors (`common.fake_cuda`), failing where a first GPU run would on a
    tensor made on the CPU; the bytes are counted on the CPU, where the backward pass runs.
    """
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from base_models import family_of

    weight_dtype = getattr(torch, PRECISIONS[settings.mixed_precision])
    family = family_of(model)
    vision_config = read_config(image_encoder, "config.json", "--image_encoder_path")
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        placed = _placed_models(family, model, vision_config, settings, weight_dtype)
        components = _static_components(family, placed, settings)
        runs = _phase_runs(family, placed, settings, weight_dtype)
        phases = _phases(runs, placed)
        if fake and rehearse:
            _rehearse_on_cuda(runs, placed)
    static = sum(components.values())
    peak_phase = max(phases, key=phases.get)
    peak_bytes = static + phases[peak_phase]
    return {
        "settings": asdict(settings),
        "components": {**components, **phases},
        "static_bytes": static,
        "peak_phase": peak_phase,
        "peak_bytes": peak_bytes,
        "smallest_card_gib": smallest_card(peak_bytes),
    }


def usable_bytes(card_gib: int) -> float:
    return card_gib * GIB * (1 - RESERVED[0]) - RESERVED[1] * GIB


def smallest_card(peak_bytes: int) -> int | None:
    return next((card for card in CARDS_GIB if peak_bytes <= usable_bytes(card)), None)


def format_plan(plan: dict[str, Any]) -> str:
    rows = [f"{name:<52} {value / GIB:>8.2f} GiB" for name, value in plan["components"].items()]
    card = plan["smallest_card_gib"]
    fits = (
        f"fits a {card} GB card ({usable_bytes(card) / GIB - plan['peak_bytes'] / GIB:.1f} GiB headroom after keeping "
        f"{RESERVED[0]:.0%} + {RESERVED[1]:.0f} GiB free)"
        if card
        else f"fits none of the {'/'.join(map(str, CARDS_GIB))} GB cards"
    )
    return "\n".join(
        [
            *rows,
            f"{'peak = weights and optimizer state + ' + plan['peak_phase']:<52} {plan['peak_bytes'] / GIB:>8.2f} GiB",
            fits,
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from patchdpo.cli import MEMORY_PLAN_PROG, memory_plan_config

    config = memory_plan_config(argv)
    settings = PlanSettings(**{name: getattr(config, name) for name in PlanSettings.__dataclass_fields__})
    with exit_on_reported_error(MEMORY_PLAN_PROG):
        plan = plan_training_memory(config.pretrained_model_name_or_path, config.image_encoder_path, settings, rehearse=True)
        if config.json is not None:
            from common.io import atomic_write_json

            atomic_write_json(config.json, plan)
    print(format_plan(plan))
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
