"""Will it fit my GPU? The peak memory of one training process, planned on a CPU without allocating it.

    python -m patchdpo.memory_plan --pretrained_model_name_or_path SG161222/RealVisXL_V1.0 \
        --image_encoder_path h94/IP-Adapter/models/image_encoder --mixed_precision fp16 --train_batch_size 4

Only the models' model_index.json (which family) and config.json files are read (a folder holding just those is enough). The real module
code (diffusers' UNet with our IP-Adapter layers, the frozen Resampler, the encoders, the training
loss) runs under `FakeTensorMode`, and `common.live_memory` counts the storages alive at each op: the
weights and optimizer state as the trainer places them, plus the peak of one micro-step's forward and
backward (activations and gradients), of the per-step encoding (without `--cache_dir`) and of
validation. Not counted: the CUDA context and kernels' workspaces (about 0.5-1 GB), allocator
fragmentation, and CUDA-only kernel choices (activations are counted with CPU kernels; SDPA saves
the same tensors on both); the plan keeps 10 % + 1 GiB of every card free for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.cli import ArgumentParser, exit_on_reported_error
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
    validation_size: int | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m patchdpo.memory_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL or SD 1.5 pipeline: folder or Hugging Face id (only model_index.json and config.json files are read)",
    )
    parser.add_argument("--image_encoder_path", required=True, help="CLIP ViT-H vision encoder: folder or Hugging Face id (config.json)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--train_batch_size", type=int, default=4, help="pairs per GPU per micro-batch")
    parser.add_argument("--mixed_precision", choices=tuple(PRECISIONS), default="fp16")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--cache_dir", action="store_true", help="plan a run with --cache_dir (the encoders are freed after the cache is built)"
    )
    parser.add_argument("--fp32_unet", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit: 1 byte per moment")
    parser.add_argument("--gpus", type=int, default=1, help="processes of the run (more than 1: DDP's gradient buckets)")
    parser.add_argument("--validation_size", type=int, default=None, help="plan validation during training at this image size")
    parser.add_argument("--json", type=Path, default=None, help="write {peak_bytes, components, ...} here")
    return parser


def read_config(model: str, sub: str, flag: str) -> dict[str, Any]:
    """`model/sub` (a local folder) or the file `sub` of Hugging Face repo `model`, nothing else downloaded."""
    from common.hub import is_local, resolve_file

    path = Path(model) / sub if is_local(model) else resolve_file(f"{model}/{sub}", flag)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{flag} {model}: cannot read {sub} ({type(error).__name__})") from None


def cast_floating_tensors(module: Any, dtype: Any, skip: set[int] = frozenset()) -> None:
    """`module.to(dtype)` for floating tensors, by replacing them (nn.Module.to cannot swap fake tensors in place)."""
    import torch

    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or id(tensor) in skip:
                    continue
                converted = tensor.detach().to(dtype)
                table[name] = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad) if table is owner._parameters else converted


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
    """The family's models built from their configs and placed as `patchdpo.models.load_training_models` places them."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ip_adapter.resampler import Resampler
    from patchdpo.models import IPAdapterTrainingModel

    unet, vae, text_encoders = family.plan_models(lambda sub: read_config(model, sub, "--pretrained_model_name_or_path"))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config))
    resampler = Resampler(**family.fresh_resampler, embedding_dim=vision_config["hidden_size"], output_dim=unet.config.cross_attention_dim)
    adapter = family.install_adapter(unet, resampler.num_queries)
    for module in (unet, vae, *text_encoders, image_encoder, resampler):
        module.requires_grad_(False)
    adapter_params = {id(p) for p in adapter.parameters()}
    cast_floating_tensors(unet, torch.float32 if settings.fp32_unet else weight_dtype, skip=adapter_params)
    adapter.requires_grad_(True)
    for module in (resampler, *text_encoders, image_encoder):
        cast_floating_tensors(module, weight_dtype)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    training_model = IPAdapterTrainingModel(family, unet, resampler, weight_dtype, image_proj_state={})
    return dict(unet=unet, vae=vae, text_encoders=text_encoders, image_encoder=image_encoder, resampler=resampler, adapter=adapter, training_model=training_model)  # fmt: skip


def _static_components(m: dict[str, Any], settings: PlanSettings) -> dict[str, int]:
    """Weights and optimizer state, alive for the whole run."""
    adapter_bytes = _nbytes(m["adapter"])
    return {
        "frozen UNet weights": _nbytes(m["unet"], lambda p: not p.requires_grad),
        "trainable adapter (fp32)": adapter_bytes,
        # AdamW8bit: uint8 moments plus one fp32 scale per 2048-value block of each
        "AdamW moments": int(2 * (adapter_bytes // 4) * (1 + 4 / 2048)) if settings.use_8bit_adam else 2 * adapter_bytes,
        "DDP gradient buckets": adapter_bytes if settings.gpus > 1 else 0,
        "frozen Resampler": _nbytes(m["resampler"]),
        # freed once the cache is built, unless validation samples with them
        "encoders (VAE fp32, text, CLIP image)": 0
        if settings.cache_dir and not settings.validation_size
        else sum(map(_nbytes, (m["vae"], *m["text_encoders"], m["image_encoder"]))),
    }


def _phases(family: Any, m: dict[str, Any], vision_config: dict, settings: PlanSettings, weight_dtype: Any) -> dict[str, int]:
    """The activation peak of each phase of a run: the training step, the per-step encoding, validation sampling."""
    import torch

    from patchdpo.method import patch_dpo_loss

    unet, vae, resampler = m["unet"], m["vae"], m["resampler"]
    batch, latent = settings.train_batch_size, settings.resolution // family.latent_scale(vae.config)
    autocast = torch.autocast("cpu", dtype=weight_dtype, enabled=settings.mixed_precision != "no")
    tokens = (vision_config["image_size"] // vision_config["patch_size"]) ** 2 + 1

    def step() -> None:
        inputs = (
            torch.randn(2 * batch, unet.config.in_channels, latent, latent),
            torch.randint(0, 1000, (2 * batch,)),
            torch.randn(batch, tokens, vision_config["hidden_size"], dtype=weight_dtype),
            torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=weight_dtype),
            family.example_added_conditioning(unet, 2 * batch, weight_dtype),
        )
        maps = torch.rand(batch, latent, latent)
        with autocast:
            pred = m["training_model"](*inputs)
        patch_dpo_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32), maps, maps).backward()

    def encode() -> None:
        with torch.no_grad():
            vae.encode(torch.randn(2 * batch, 3, settings.resolution, settings.resolution))
            ids = torch.randint(0, 49407, (batch, 77))
            for encoder in m["text_encoders"]:
                encoder(ids, output_hidden_states=True)
            m["image_encoder"](torch.randn(batch, 3, 224, 224, dtype=weight_dtype), output_hidden_states=True)

    def sample(size: int) -> None:
        grid = size // family.latent_scale(vae.config)
        with torch.no_grad(), autocast:
            unet(
                torch.randn(2, unet.config.in_channels, grid, grid, dtype=weight_dtype),
                torch.tensor([999, 999]),
                torch.randn(2, 77 + resampler.num_queries, unet.config.cross_attention_dim, dtype=weight_dtype),
                added_cond_kwargs=family.example_added_conditioning(unet, 2, weight_dtype),
            )
            vae.decode(torch.randn(1, vae.config.latent_channels, grid, grid))

    models = (unet, resampler, vae, *m["text_encoders"], m["image_encoder"])
    phases = {"training step (activations + gradients)": _peak(step, *models)}
    if not settings.cache_dir:
        phases["per-step encoding (VAE, text, CLIP image)"] = _peak(encode, *models)
    if settings.validation_size:  # dreambench.validation samples with the training models: activations only
        phases["validation sampling"] = _peak(lambda: sample(settings.validation_size), *models)
    return phases


def plan_training_memory(model: str, image_encoder: str, settings: PlanSettings, fake: bool = True) -> dict[str, Any]:
    """Bytes per component and the peak of one training process (see the module docstring); the family says what to build.

    `fake=False` runs the same code on real tensors (small models only): what the plan counts is then
    what is really allocated, which is how the plan is tested.
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
        components = _static_components(placed, settings)
        phases = _phases(family, placed, vision_config, settings, weight_dtype)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = PlanSettings(
        **{name: getattr(args, name) for name in PlanSettings.__dataclass_fields__},
    )
    with exit_on_reported_error(parser.prog):
        plan = plan_training_memory(args.pretrained_model_name_or_path, args.image_encoder_path, settings)
        if args.json is not None:
            from common.io import atomic_write_json

            atomic_write_json(args.json, plan)
    print(format_plan(plan))
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
