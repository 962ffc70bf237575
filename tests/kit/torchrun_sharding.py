"""Train the tiny SDXL UNet's IP-Adapter sharded (FSDP2, `patchdpo.sharding`) and unsharded (DDP), recording both.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.kit.torchrun_sharding OUT_DIR

The UNet is the tiny SDXL stand-in with the IP-Adapter installed, held as the trainer holds it: a
frozen base (fp32, or bf16 under bf16 autocast), fp32 adapter layers; the loss is `patchdpo.method.patch_dpo_loss` on
pairs whose latents, maps, conditioning, noise and timestep are drawn from the pair's index. Each
step trains 4 pairs (2 processes x 2). Runs, one after the other in one process group:

* `ddp`: the model through `accelerator.prepare_model` (DDP), batch 2; a training state at step 2;
* `sharded`: `shard_frozen_base`, batch 2; a training state at step 2 (gathered, same format);
* `accumulated`: sharded, batch 1 x 2 micro-batches, the gradient sync only on the second;
* `sharded_from_ddp` / `ddp_from_sharded`: each layout resumed from the other's step-2 state;
* `ddp_image_dpo` / `sharded_image_dpo`: 2 steps of `image_dpo_loss` against the starting adapter
  (`functional_call` unsharded, `swapped_weights` sharded);
* `ddp_bf16` (1 step), `sharded_bf16` and `resumed_bf16` (a fresh sharded model resumed from
  `sharded_bf16`'s step-2 state): the same with the base in bf16 under bf16 autocast.

Rank 0 writes OUT_DIR/{run}.safetensors (the gathered adapter after each step, `step{n}.{key}`) and
OUT_DIR/{run}/model.safetensors (the public fp16 checkpoint after the last step); every rank writes
OUT_DIR/rank{r}.json (gradient norms per step, bytes held and planned, what the accumulation saw).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from common.training_state import (
    TRAINING_STATE_DIR,
    CheckedState,
    Resumable,
    TrainedWeights,
    check_training_state,
    load_training_state,
    save_training_state,
)
from ip_adapter.attention_processor import adapter_modules_of, install_ip_adapter
from ip_adapter.checkpoint import load_ip_adapter_checkpoint, save_ip_adapter
from patchdpo.method import image_dpo_loss, patch_dpo_loss
from patchdpo.sharding import (
    GatheredOptimizer,
    clip_grad_norm,
    full_state_dict,
    gradient_sync,
    held_bytes,
    load_full_state_dict,
    planned_bytes,
    shard_frozen_base,
    swapped_weights,
    trainable_parameters,
)
from stand_ins.components import NUM_TOKENS, build_resampler
from stand_ins.sdxl import TINY

STEPS, STATE_AT, PAIRS_PER_PROCESS = 3, 2, 2
DPO_STEPS = 2  # image_dpo's reference equals the policy at step 1; from step 2 on it is the starting adapter
LR, MAX_GRAD_NORM = 1e-3, 0.05  # the norm is clipped at every step, so the sharded norm is what moves the weights
LATENT, TEXT_TOKENS = 8, 8
DPO_BETA = 50.0
WEIGHTS_NAME = "ip_adapter_state.safetensors"


def build_model(dtype: torch.dtype) -> UNet2DConditionModel:
    """The tiny UNet with a random (far from identity) adapter: base frozen in `dtype`, adapter trainable in fp32."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY.unet)
    adapter = install_ip_adapter(unet, num_tokens=NUM_TOKENS)
    unet.requires_grad_(False).to(dtype)
    adapter.to(torch.float32).requires_grad_(True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return unet


def pair_batch(indices: list[int], scheduler: DDPMScheduler) -> dict:
    """Everything about pair i is drawn from a generator seeded with i (so no layout changes what a pair is)."""
    cross_dim, pooled_dim = (
        TINY.unet["cross_attention_dim"],
        TINY.unet["projection_class_embeddings_input_dim"] - 6 * TINY.unet["addition_time_embed_dim"],
    )
    rows = []
    for index in indices:
        g = torch.Generator().manual_seed(index)
        rows.append(
            dict(
                latents=torch.randn(2, 4, LATENT, LATENT, generator=g),
                noise=torch.randn(4, LATENT, LATENT, generator=g),
                timestep=torch.randint(0, 1000, (), generator=g),
                tokens=torch.randn(TEXT_TOKENS + NUM_TOKENS, cross_dim, generator=g),
                pooled=torch.randn(pooled_dim, generator=g),
                time_ids=torch.tensor([32.0, 32, 0, 0, 32, 32]),
                maps=torch.rand(2, LATENT, LATENT, generator=g),
            )
        )
    stack = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    latents = torch.cat([stack["latents"][:, 0], stack["latents"][:, 1]])  # [references; generated]
    noise, timesteps = stack["noise"].repeat(2, 1, 1, 1), stack["timestep"].repeat(2)
    return dict(
        noisy=scheduler.add_noise(latents, noise, timesteps),
        noise=noise,
        timesteps=timesteps,
        tokens=stack["tokens"].repeat(2, 1, 1),
        added={"text_embeds": stack["pooled"].repeat(2, 1), "time_ids": stack["time_ids"].repeat(2, 1)},
        reference_map=stack["maps"][:, 0],
        generated_map=stack["maps"][:, 1],
    )


def predict(model: torch.nn.Module, batch: dict, dtype: torch.dtype, weights: dict | None = None) -> torch.Tensor:
    """The trainer's forward: inputs in the base's dtype, autocast to it (bf16: accelerate's `autocast()`); `weights`
    replace the model's own through `torch.func.functional_call` (image_dpo's reference on an unsharded model)."""
    added = {key: value.to(dtype) for key, value in batch["added"].items()}
    args = (batch["noisy"].to(dtype), batch["timesteps"], batch["tokens"].to(dtype))
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        if weights is None:
            return model(*args, added_cond_kwargs=added).sample
        return torch.func.functional_call(model, weights, args, {"added_cond_kwargs": added}).sample


class Run:
    """One training run of one layout on this process: FSDP2 (`sharded`) or DDP, base held in `dtype`."""

    def __init__(self, accelerator: Accelerator, sharded: bool, dtype: torch.dtype, accumulation: int = 1, loss: str = "patch_dpo") -> None:
        self.accelerator, self.sharded, self.dtype, self.accumulation = accelerator, sharded, dtype, accumulation
        self.model = build_model(dtype)
        self.bytes_unsharded = held_bytes(self.model)
        self.planned = planned_bytes(self.model, accelerator.num_processes)
        self.model = shard_frozen_base(self.model) if sharded else accelerator.prepare_model(self.model)
        self.adapter = adapter_modules_of(accelerator.unwrap_model(self.model))
        self.params = trainable_parameters(self.model)
        named = accelerator.unwrap_model(self.model).named_parameters()
        # image_dpo's frozen reference: the adapter as it starts (sharded copies when the model is sharded)
        self.reference = {name: p.detach().clone() for name, p in named if p.requires_grad} if loss == "image_dpo" else None
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-2)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.image_proj = build_resampler(TINY).state_dict()
        self.norms: list[float] = []
        self.unsynced_grads_absent: list[bool] = []

    def step(self, step: int) -> None:
        """Optimizer step `step` (1-based): this process's pairs, in `accumulation` micro-batches."""
        rank, first = self.accelerator.process_index, (step - 1) * 2 * PAIRS_PER_PROCESS
        mine = list(range(first + rank * PAIRS_PER_PROCESS, first + (rank + 1) * PAIRS_PER_PROCESS))
        size = PAIRS_PER_PROCESS // self.accumulation
        for micro in range(self.accumulation):
            last = micro == self.accumulation - 1
            loss = self.loss(pair_batch(mine[micro * size : (micro + 1) * size], self.scheduler))
            with self._sync(last):
                (loss / self.accumulation).backward()
            if not last:
                self.unsynced_grads_absent.append(all(param.grad is None for param in self.params))
        clip = clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        self.norms.append(float(clip(self.params, MAX_GRAD_NORM)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self, batch: dict) -> torch.Tensor:
        """patch_dpo, or image_dpo against the reference adapter (as the trainer: policy forward first)."""
        pred = predict(self.model, batch, self.dtype)
        if self.reference is None:
            return patch_dpo_loss(pred, batch["noise"], batch["reference_map"], batch["generated_map"])
        with torch.no_grad():
            if self.sharded:
                with swapped_weights(self.model, self.reference):
                    reference_pred = predict(self.model, batch, self.dtype)
            else:
                reference_pred = predict(self.accelerator.unwrap_model(self.model), batch, self.dtype, self.reference)
        return image_dpo_loss(pred, reference_pred, batch["noise"], DPO_BETA).loss

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        if self.sharded:
            return gradient_sync(self.model, last)
        return contextlib.nullcontext() if last else self.model.no_sync()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's full tensors on every process (a collective when sharded)."""
        if self.sharded:
            return full_state_dict(self.adapter)
        return {key: value.detach().cpu().clone() for key, value in self.adapter.state_dict().items()}

    def resumable(self, for_saving: bool) -> Resumable:
        """What a training state saves and restores; gathered first (on every process) when saving a sharded run,
        so that the main process writes the files an unsharded run writes."""
        adapter = self.adapter_state() if for_saving else None

        def load(path: Path) -> None:
            load_full_state_dict(self.adapter, load_ip_adapter_checkpoint(path)["ip_adapter"])

        weights = TrainedWeights(WEIGHTS_NAME, lambda path: save_ip_adapter(path, self.image_proj, adapter, dtype=None), load)
        if not self.sharded:
            return Resumable(weights, self.optimizer)
        optimizer = GatheredOptimizer(self.optimizer)
        return Resumable(weights, optimizer.gather() if for_saving else optimizer)


def train(run: Run, out: Path, name: str, steps: range, state_at: int | None = None) -> None:
    """Train `steps`, recording the gathered adapter before and after each, and a training state after `state_at`."""
    recorded = {f"step{steps.start - 1}.{key}": value for key, value in run.adapter_state().items()}
    for step in steps:
        run.step(step)
        recorded.update({f"step{step}.{key}": value for key, value in run.adapter_state().items()})
        if step == state_at:
            save_training_state(run.accelerator, out / name / f"checkpoint-{step}", run.resumable(for_saving=True), step)
    adapter = run.adapter_state()
    if run.accelerator.is_main_process:
        save_file(recorded, str(out / f"{name}.safetensors"))
        save_ip_adapter(out / name / "model.safetensors", run.image_proj, adapter)
    held = held_bytes(run.model)
    record = dict(norms=run.norms, unsynced_grads_absent=run.unsynced_grads_absent)
    record.update(frozen_bytes=held.frozen, trainable_bytes=held.trainable, frozen_bytes_unsharded=run.bytes_unsharded.frozen)
    record.update(planned_frozen_bytes=run.planned.frozen, planned_trainable_bytes=run.planned.trainable)
    path = out / f"rank{run.accelerator.process_index}.json"
    records = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**records, name: record}))


def resume(accelerator: Accelerator, checkpoint: Path, dtype: torch.dtype, sharded: bool = True) -> Run:
    """A fresh run restored from `checkpoint` through `common.training_state`."""
    run = Run(accelerator, sharded=sharded, dtype=dtype)
    load_training_state(CheckedState(checkpoint, check_training_state(checkpoint / TRAINING_STATE_DIR)), run.resumable(for_saving=False))
    return run


def main(out_dir: str) -> None:
    out, steps, after_state = Path(out_dir), range(1, STEPS + 1), range(STATE_AT + 1, STEPS + 1)
    accelerator = Accelerator(cpu=True)  # autocast is the runs' own (`pair_loss`), so each picks its precision
    fp32, bf16 = torch.float32, torch.bfloat16
    train(Run(accelerator, sharded=False, dtype=fp32), out, "ddp", steps, state_at=STATE_AT)
    train(Run(accelerator, sharded=True, dtype=fp32), out, "sharded", steps, state_at=STATE_AT)
    train(Run(accelerator, sharded=True, dtype=fp32, accumulation=2), out, "accumulated", steps)
    state = f"checkpoint-{STATE_AT}"
    train(resume(accelerator, out / "ddp" / state, fp32, sharded=True), out, "sharded_from_ddp", after_state)
    train(resume(accelerator, out / "sharded" / state, fp32, sharded=False), out, "ddp_from_sharded", after_state)
    for sharded, name in ((False, "ddp_image_dpo"), (True, "sharded_image_dpo")):
        train(Run(accelerator, sharded=sharded, dtype=fp32, loss="image_dpo"), out, name, range(1, DPO_STEPS + 1))
    train(Run(accelerator, sharded=False, dtype=bf16), out, "ddp_bf16", range(1, 2))
    train(Run(accelerator, sharded=True, dtype=bf16), out, "sharded_bf16", steps, state_at=STATE_AT)
    train(resume(accelerator, out / "sharded_bf16" / state, bf16), out, "resumed_bf16", after_state)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
