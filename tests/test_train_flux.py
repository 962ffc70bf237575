"""train_patchdpo.py on FLUX.1 + XLabs' IP-Adapter: the same command, the family read from the folder's model_index.json.

Tiny FLUX stand-ins (`stand_ins.flux`, XLabs' file layout) and a tiny pair folder whose quality maps
sit on FLUX's 8x8 latent grid (64 px). Each behaviour the SDXL and SD 1.5 tests check is checked
here on FLUX: the three losses, bf16, accumulation and process layout, `--cache_dir` (T5 freed),
gradient checkpointing, resume after SIGTERM, and `--shard_base` under torchrun (equal to the
unsharded run, resuming exactly).
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_patchdpo
from base_models.flux import FluxFamily
from common.stop_signals import STOPPED_EXIT_CODE
from common.training_state import TRAINING_STATE_DIR
from ip_adapter.xlabs import read_xlabs_file
from patchdpo import method as method_module
from patchdpo.models import ADAPTER_STATE_NAME
from stand_ins.pairs import save_pair_data
from tests.kit.cli import bad_input_message
from tests.kit.flux import *  # noqa: F401,F403
from tests.kit.train_runs import launch_under_torchrun, train_stopped_by_sigterm, train_with_own_precision
from tests.test_train_patchdpo import logged
from tests.test_two_nodes import launch_two_nodes
from tests.test_validation import GRID_TAG, events, validation_args

RESOLUTION, LATENT = 64, 8  # FLUX's VAE downsamples by 8
STEPS = 2
LR = 1e-3


@pytest.fixture(scope="module")
def flux_pairs(tmp_path_factory):
    return save_pair_data(tmp_path_factory.mktemp("flux_pairs"), num_samples=4, image_size=RESOLUTION, latent_size=LATENT)


def flux_args(models, data, out: Path, *extra: str, steps: int = STEPS, batch: int = 2, accumulate: int = 2) -> list[str]:
    """2 pairs x 2 accumulated micro-batches = the 4 pairs of one step (one epoch) by default."""
    return [
        "--pretrained_model_name_or_path", str(models.flux_dir), "--image_encoder_path", str(models.image_encoder_dir),
        "--pretrained_ip_adapter_path", str(models.ip_ckpt), "--data_root_path", str(data.root),
        "--patch_quality_file", str(data.quality_file), "--resolution", str(RESOLUTION), "--train_batch_size", str(batch),
        "--gradient_accumulation_steps", str(accumulate), "--stop_step", str(steps), "--save_steps", str(steps),
        "--checkpointing_steps", str(steps), "--output_dir", str(out), "--logging_steps", "1", "--learning_rate", str(LR), *extra,
    ]  # fmt: skip


def adapter(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))


def deviation(a: Path, b: Path, step: int = STEPS) -> torch.Tensor:
    weights_a, weights_b = adapter(a, step), adapter(b, step)
    assert weights_a.keys() == weights_b.keys()
    return torch.cat([(weights_a[k] - weights_b[k]).abs().flatten() for k in weights_a])


def assert_same_training(out: Path, reference: Path) -> None:
    """The same losses and the same adapter up to float noise (the SD 1.5 tests' tolerance; a control below)."""
    assert logged(out, "loss")[:STEPS] == pytest.approx(logged(reference, "loss"), rel=1e-5)
    assert deviation(out, reference).mean().item() < LR * 1e-3


@pytest.fixture(scope="module")
def baseline(tiny_flux_models, flux_pairs, tmp_path_factory) -> Path:
    """PatchDPO's loss in fp32, 2 pairs x 2 accumulated, one process: what the other layouts must reproduce."""
    out = tmp_path_factory.mktemp("flux_runs") / "baseline"
    train_patchdpo.main(flux_args(tiny_flux_models, flux_pairs, out, "--loss", "patch_dpo"))
    return out


@pytest.mark.parametrize("loss", ["mse", "image_dpo"])
def test_each_loss_trains_the_projection_and_kv_and_saves_xlabs_layout(tiny_flux_models, flux_pairs, baseline, tmp_path, loss):
    out = tmp_path / loss
    train_patchdpo.main(flux_args(tiny_flux_models, flux_pairs, out, "--loss", loss, "--weight_decay", "0"))  # moves only by gradient
    start = read_xlabs_file(tiny_flux_models.ip_ckpt)
    for run in (out, baseline):
        saved = read_xlabs_file(run / f"checkpoint-{STEPS}" / "ip_adapter.safetensors")  # XLabs' keys, as diffusers loads them
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}
        assert all(v.dtype == torch.bfloat16 for v in saved.values())
    trained = adapter(out)  # the training state: XLabs' keys, full precision
    moved = {key for key in start if not torch.equal(trained[key], start[key])}
    assert moved == set(start)  # the projection (Linear + LayerNorm) and every block's k/v all train
    losses = logged(out, "loss")
    assert len(losses) == STEPS and all(math.isfinite(value) for value in losses)
    if loss == "image_dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # trained adapter == frozen reference at step 0


def test_a_fresh_adapter_starts_at_zero_kv(tiny_flux_models, flux_pairs, tmp_path):
    out = tmp_path / "fresh"
    argv = flux_args(tiny_flux_models, flux_pairs, out, "--loss", "mse", steps=1)
    train_patchdpo.main(argv[:4] + argv[6:])  # without --pretrained_ip_adapter_path
    trained = adapter(out, 1)
    values = [v for k, v in trained.items() if "_v_proj" in k]
    keys = [v for k, v in trained.items() if "_k_proj" in k]
    assert all(v.abs().max() > 0 for v in values)  # the values moved at the first step...
    assert all(torch.equal(k, torch.zeros_like(k)) for k in keys)  # ...the keys wait for non-zero values


def test_cache_frees_t5_and_with_accumulation_and_checkpointing_trains_the_same(
    tiny_flux_models, flux_pairs, baseline, tmp_path, monkeypatch
):
    """--cache_dir: T5, CLIP and VAE outputs cached and T5 freed before the first step; 1x4 accumulation with gradient
    checkpointing is the baseline's 2x2."""
    t5, real_load_text, real_loss = [], FluxFamily.load_text, method_module.compute_loss

    def load_text(self, folder, variant):
        tokenizers, encoders = real_load_text(self, folder, variant)
        t5.append(weakref.ref(encoders[1]))
        return tokenizers, encoders

    def loss_without_t5(*args, **kwargs):
        gc.collect()
        assert t5[-1]() is None, "T5 is still alive during training with --cache_dir"
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(FluxFamily, "load_text", load_text)
    monkeypatch.setattr(method_module, "compute_loss", loss_without_t5)
    cached = tmp_path / "cached"
    train_patchdpo.main(flux_args(tiny_flux_models, flux_pairs, cached, "--loss", "patch_dpo", "--cache_dir", str(tmp_path / "cache")))
    monkeypatch.setattr(method_module, "compute_loss", real_loss)
    (sample,) = [path for path in (tmp_path / "cache").rglob("sample0*.safetensors")]
    assert {"prompt_embeds", "pooled_prompt_embeds", "image_features", "reference_latents"} <= set(load_file(str(sample)))
    accumulated = tmp_path / "accumulated"
    train_patchdpo.main(
        flux_args(tiny_flux_models, flux_pairs, accumulated, "--loss", "patch_dpo", "--gradient_checkpointing", batch=1, accumulate=4)
    )
    assert_same_training(cached, baseline)
    assert_same_training(accumulated, baseline)
    seed7 = tmp_path / "seed7"  # control: another draw is far outside the tolerance
    train_patchdpo.main(flux_args(tiny_flux_models, flux_pairs, seed7, "--loss", "patch_dpo", "--seed", "7"))
    assert deviation(seed7, baseline).mean().item() > 10 * LR * 1e-3


def test_bf16_trains_the_same_adapter_in_fp32(tiny_flux_models, flux_pairs, baseline, tmp_path):
    bf16 = tmp_path / "bf16"
    train_with_own_precision(flux_args(tiny_flux_models, flux_pairs, bf16, "--loss", "patch_dpo", "--mixed_precision", "bf16"))
    assert all(tensor.dtype == torch.float32 for tensor in adapter(bf16).values())
    assert logged(bf16, "loss") == pytest.approx(logged(baseline, "loss"), rel=2e-2)  # bf16 rounding, not another training


def test_sigterm_saves_and_the_resumed_run_equals_an_uninterrupted_one(tiny_flux_models, flux_pairs, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_patchdpo.main(flux_args(tiny_flux_models, flux_pairs, straight, "--loss", "patch_dpo", steps=3, accumulate=1))
    exit_code = train_stopped_by_sigterm(  # SIGTERM arrives in the middle of step 2
        monkeypatch, flux_args(tiny_flux_models, flux_pairs, stopped, "--loss", "patch_dpo", steps=3, accumulate=1)
    )
    assert exit_code == STOPPED_EXIT_CODE
    assert sorted(path.name for path in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    resume = flux_args(tiny_flux_models, flux_pairs, stopped, "--loss", "patch_dpo", steps=3, accumulate=1)
    train_patchdpo.main([*resume, "--resume_from_checkpoint", "latest"])
    resumed, uninterrupted = adapter(stopped, 3), adapter(straight, 3)
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


def test_two_processes_and_the_sharded_base_train_the_baselines_adapter(tiny_flux_models, flux_pairs, baseline, tmp_path):
    """One torchrun launch (2 processes x 1 pair x 2 accumulated): unsharded; --shard_base (FSDP2) 4 steps with a state
    at step 2; --shard_base resumed from that state to step 4."""

    def argv(name: str, *extra: str, steps: int = STEPS) -> list[str]:
        return flux_args(tiny_flux_models, flux_pairs, tmp_path / name, "--loss", "patch_dpo", *extra, steps=steps, batch=1, accumulate=2)

    sharded = [*argv("sharded", "--shard_base", steps=4), "--checkpointing_steps", "2"]
    resumed = [*argv("resumed", "--shard_base", steps=4), "--resume_from_checkpoint", str(tmp_path / "sharded" / "checkpoint-2")]
    runs = [{"name": "two", "argv": argv("two")}, {"name": "sharded", "argv": sharded}, {"name": "resumed", "argv": resumed}]
    result = launch_under_torchrun(runs, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_training(tmp_path / "two", baseline)
    sharded = deviation(tmp_path / "sharded", baseline)
    print(f"FLUX --shard_base vs one process after {STEPS} steps: max |dw| {sharded.max():.2e}, mean {sharded.mean():.2e}")
    assert_same_training(tmp_path / "sharded", baseline)
    resumed, straight = adapter(tmp_path / "resumed", 4), adapter(tmp_path / "sharded", 4)
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)  # a sharded run resumes exactly
    # gathered on every process: the main one writes the whole adapter in XLabs' layout, as an unsharded run does
    written = read_xlabs_file(tmp_path / "sharded" / "checkpoint-4" / "ip_adapter.safetensors")
    assert written.keys() == straight.keys() and all(torch.equal(written[k], straight[k].bfloat16()) for k in straight)


def test_two_nodes_train_the_baselines_adapter_with_the_cache_and_with_the_sharded_base(tiny_flux_models, flux_pairs, baseline, tmp_path):
    """`torchrun --nnodes 2` on 127.0.0.1, one process per node (each its node's local main process): with
    `--cache_dir` (both nodes fill one shared cache, T5 then freed) and with `--shard_base` (FSDP2 across the nodes)."""

    def argv(name: str, *extra: str) -> list[str]:
        return flux_args(tiny_flux_models, flux_pairs, tmp_path / name, "--loss", "patch_dpo", *extra, batch=1, accumulate=2)

    runs = [
        {"name": "cached", "argv": argv("cached", "--cache_dir", str(tmp_path / "cache"))},
        {"name": "sharded", "argv": argv("sharded", "--shard_base")},
    ]
    nodes = launch_two_nodes({"record_dir": str(tmp_path / "record"), "runs": runs}, tmp_path / "spec.json")
    assert [node["code"] for node in nodes] == [0, 0], nodes[0]["output"][-4000:] + nodes[1]["output"][-2000:]
    assert_same_training(tmp_path / "cached", baseline)
    assert_same_training(tmp_path / "sharded", baseline)


def test_flow_matching_flags_are_refused_for_a_unet_model(tiny_flux_models, flux_pairs, tmp_path):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    argv = flux_args(tiny_flux_models, flux_pairs, tmp_path / "out", "--guidance_scale", "3.5")
    message = bad_input_message(train_patchdpo.main, [*argv, "--pretrained_model_name_or_path", str(sdxl)])
    assert "--guidance_scale" in message and "SDXL" in message


def test_validation_samples_with_the_flux_training_models(tiny_flux_models, flux_pairs, tiny_clip_path, tiny_dino_dir, tmp_path):
    out = tmp_path / "validated"
    train_patchdpo.main(
        flux_args(
            tiny_flux_models,
            flux_pairs,
            out,
            "--loss",
            "patch_dpo",
            *validation_args(tiny_clip_path, tiny_dino_dir, "--validation_size", "64"),
        )
    )
    logs = events(out)
    assert [event.step for event in logs.Images(GRID_TAG)] == [0, 2]
    assert [event.step for event in logs.Scalars("validation/clipi_score")] == [0, 2]
