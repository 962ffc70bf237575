"""train_patchdpo.py's scale options: accumulation arithmetic, LR schedule, clipping, state limit, fused AdamW, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train_patchdpo
from common.checkpoints import prune_training_states
from common.errors import BadInputError
from common.sampling import EpochSampler
from common.training_state import SETTINGS_NAME, TRAINING_STATE_DIR
from patch_quality.store import QualityMaps
from patchdpo.method import EncodedPairs, Method, training_step
from patchdpo.models import ADAPTER_STATE_NAME, load_training_models
from patchdpo.optimization import StepPlan, adamw
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import LR, RESOLUTION, collate, logged, make_dataset, train_args


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate fixes the mixed precision once per process; these tests need another one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------------------
# Optimizer-step arithmetic


def test_epochs_hold_whole_global_batches_only():
    sampler = EpochSampler(10, seed=0, global_batch=4)
    epoch0 = list(sampler)
    assert len(sampler) == len(epoch0) == 8 and all(epoch == 0 for _, epoch in epoch0)
    assert len({index for index, _ in epoch0}) == 8
    sampler.set_epoch(1)
    assert [index for index, _ in sampler] != [index for index, _ in epoch0]
    with pytest.raises(BadInputError, match="do not fill one optimizer step of 4 pairs"):
        EpochSampler(3, seed=0, global_batch=4)


def test_step_plan_counts_optimizer_steps_and_finds_the_resume_micro_batch():
    plan = StepPlan.create(micro_batches_per_epoch=6, accumulation=2, stop_step=100, num_train_epochs=3)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)
    assert plan.position(4) == (1, 2)  # epoch 1, after its first optimizer step = 2 micro-batches
    assert StepPlan.create(6, 2, stop_step=5, num_train_epochs=3).total_steps == 5


def test_learning_rate_schedule_counts_optimizer_steps_not_micro_batches(tiny_models, tiny_pair_data, tmp_path):
    extra = ("--gradient_accumulation_steps", "2", "--lr_scheduler", "linear", "--lr_warmup_steps", "2")
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, *extra, steps=4, batch=1))
    # Logged after each step: the LR of the next one (diffusers' convention). Warmup 2 steps, then linear to 0 at step 4.
    assert logged(tmp_path, "lr") == pytest.approx([0.5 * LR, LR, 0.5 * LR, 0.0])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--lr_warmup_steps", "10"), "needs a schedule with warmup"),
        (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be >= 1"),
        (("--checkpoints_total_limit", "0"), "--checkpoints_total_limit must be >= 1"),
        (("--max_grad_norm", "0"), "--max_grad_norm must be > 0"),
    ],
)
def test_bad_scale_flags_are_parser_errors(tiny_models, tiny_pair_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as raised:
        train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, *extra))
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Clipping, fused AdamW, training-state limit


def test_max_grad_norm_clips_what_the_fused_optimizer_steps_with(tiny_models, tiny_pair_data, tmp_path):
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        seen.append(
            (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item(), optimizer.defaults["fused"])
        )

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, "--max_grad_norm", "1e-4", "--fused_adamw"))
    finally:
        handle.remove()
    assert len(seen) == 2
    assert all(norm <= 1e-4 * (1 + 1e-4) and fused for norm, fused in seen), seen
    assert all(norm > 1e-4 for norm in logged(tmp_path, "grad_norm"))  # the norm before clipping


def test_fused_adamw_takes_the_default_adamw_step():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, 32, generator=generator)
    grads = [torch.randn(64, 32, generator=generator) for _ in range(3)]
    results = []
    for fused in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = adamw([param], lr=LR, weight_decay=0.01, fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    assert not torch.equal(results[0], start)


def test_checkpoints_total_limit_deletes_the_oldest_training_states_only(tiny_models, tiny_pair_data, tmp_path):
    extra = ("--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--save_steps", "2")  # the last --save_steps wins
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, *extra, steps=4, batch=1))
    contents = {p.name: sorted(q.name for q in p.iterdir()) for p in tmp_path.glob("checkpoint-*")}
    assert contents == {
        "checkpoint-2": ["model.bin", "model.safetensors"],  # its training state went; the weights stay
        "checkpoint-3": [TRAINING_STATE_DIR],
        "checkpoint-4": ["model.bin", "model.safetensors", TRAINING_STATE_DIR],
    }


def test_pruning_never_deletes_the_newest_complete_state(tmp_path):
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / TRAINING_STATE_DIR).mkdir(parents=True)
    (tmp_path / "checkpoint-3" / f"{TRAINING_STATE_DIR}.partial").mkdir(parents=True)  # a save killed midway
    assert [p.name for p in prune_training_states(tmp_path, keep=1)] == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-2" / TRAINING_STATE_DIR).is_dir()
    assert not (tmp_path / "checkpoint-1").exists()


# ----------------------------------------------------------------------------------------------
# Precision paths


def test_weight_dtype_places_frozen_parts_low_and_trainable_and_vae_in_fp32(tiny_models):
    models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.bfloat16)
    adapter = {id(p) for p in models.model.adapter_modules.parameters()}
    unet = [p for p in models.model.unet.parameters() if id(p) not in adapter]
    assert {p.dtype for p in unet} == {torch.bfloat16}
    assert {p.dtype for p in models.model.adapter_modules.parameters()} == {torch.float32}
    assert {p.dtype for p in models.encoders.vae.parameters()} == {torch.float32}
    for frozen in (models.model.image_proj_model, models.encoders.image_encoder, *models.encoders.text_encoders):
        assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}


def test_bf16_trains_on_cpu_and_saves_the_official_fp16_checkpoint(tiny_models, tiny_pair_data, tmp_path, fresh_accelerate_state):
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, "--mixed_precision", "bf16", "--checkpointing_steps", "2"))
    assert all(math.isfinite(v) for v in logged(tmp_path, "loss")) and len(logged(tmp_path, "loss")) == 2
    state = load_file(str(tmp_path / "checkpoint-2" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))
    assert {t.dtype for name, t in state.items() if name.startswith("ip_adapter.")} == {torch.float32}  # trained in fp32
    checkpoint = torch.load(tmp_path / "checkpoint-2" / "model.bin", map_location="cpu", weights_only=True)
    assert {t.dtype for section in checkpoint.values() for t in section.values()} == {torch.float16}


def test_fp16_step_as_on_cuda_autocast_and_grad_scaler(tiny_models, tiny_pair_data):
    """What `--mixed_precision fp16` runs on CUDA (fp16 weights, fp16 autocast, GradScaler), here under CPU autocast."""
    models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float16)
    model = models.model
    before = [p.detach().clone() for p in model.adapter_modules.parameters()]
    optimizer = adamw(model.adapter_modules.parameters(), LR, 0.01)
    scaler = torch.amp.GradScaler("cpu")
    dataset = make_dataset(models, tiny_pair_data, QualityMaps.load(tiny_pair_data.quality_file))
    dtypes = {}
    model.unet.conv_in.register_forward_hook(lambda module, inputs, output: dtypes.update(unet=output.dtype))
    for step in range(2):
        cond = EncodedPairs.from_batch(collate(dataset, [2 * step, 2 * step + 1]), models.encoders)
        assert cond.latents.dtype == torch.float32  # the VAE encodes in fp32
        with torch.autocast("cpu", dtype=torch.float16):
            output = training_step(model, cond, Method("patch_dpo", models.objective, RESOLUTION))
        assert output.loss.dtype == torch.float32 and math.isfinite(output.loss.item())
        scaler.scale(output.loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.adapter_modules.parameters()]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    assert dtypes["unet"] == torch.float16
    after = list(model.adapter_modules.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # the scaler did not skip the steps


def test_fp16_without_cuda_is_a_one_line_error_before_any_model_loads(tiny_pair_data, tmp_path, fresh_accelerate_state):
    argv = [
        *("--pretrained_model_name_or_path", str(tmp_path / "no_sdxl"), "--image_encoder_path", str(tmp_path / "no_encoder")),
        *("--data_root_path", str(tiny_pair_data.root), "--output_dir", str(tmp_path / "out"), "--mixed_precision", "fp16"),
    ]
    error = bad_input_message(train_patchdpo.main, argv)
    assert "fp16 needs a CUDA GPU" in error and "bf16 or no" in error, error


def test_the_lr_scheduler_flag_lists_diffusers_schedules():
    from diffusers.optimization import SchedulerType

    from common.flags import LR_SCHEDULERS

    assert LR_SCHEDULERS == tuple(kind.value for kind in SchedulerType)


# ----------------------------------------------------------------------------------------------
# --fp32_unet: the official script's frozen fp32 UNet under autocast


def test_fp32_unet_keeps_the_frozen_unet_as_loaded(tiny_models):
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tiny_models.sdxl_dir, subfolder="unet").state_dict()
    official = load_training_models(
        tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.bfloat16, unet_dtype=torch.float32
    )
    default = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.bfloat16)
    frozen = {name: tensor for name, tensor in official.model.unet.state_dict().items() if name in loaded}
    assert len(frozen) == len(loaded) and all(
        tensor.dtype == torch.float32 and torch.equal(tensor, loaded[name]) for name, tensor in frozen.items()
    )
    rounded = default.model.unet.state_dict()
    assert all(rounded[name].dtype == torch.bfloat16 for name in loaded)
    assert any(not torch.equal(rounded[name].float(), loaded[name]) for name in loaded)  # what the switch avoids


def test_fp32_unet_changes_the_trained_adapter_and_is_a_recorded_setting(tiny_models, tiny_pair_data, tmp_path, fresh_accelerate_state):
    runs = {}
    for name, extra in (("default", ()), ("fp32_unet", ("--fp32_unet",))):
        out = tmp_path / name
        train_patchdpo.main(
            train_args(tiny_models, tiny_pair_data, out, "--mixed_precision", "bf16", "--checkpointing_steps", "1", *extra, steps=1)
        )
        AcceleratorState._reset_state(reset_partial_state=True)
        runs[name] = out / "checkpoint-1" / TRAINING_STATE_DIR
    default, official = (load_file(str(state / ADAPTER_STATE_NAME)) for state in runs.values())
    assert all(torch.isfinite(tensor).all() for tensor in official.values())
    assert any(not torch.equal(default[name], official[name]) for name in default)
    assert json.loads((runs["fp32_unet"] / SETTINGS_NAME).read_text())["fp32_unet"] is True


def test_8bit_adam_without_cuda_is_one_line_before_any_model_loads(tiny_models, tiny_pair_data, tmp_path, monkeypatch):
    monkeypatch.setattr("patchdpo.loop.load_training_models", lambda *a, **k: pytest.fail("models loaded before the optimizer check"))
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, tiny_pair_data, tmp_path / "out", "--use_8bit_adam"))
    assert "--use_8bit_adam needs a CUDA GPU" in message


# ----------------------------------------------------------------------------------------------
# A data set smaller than one optimizer step, and an epoch cap below --stop_step: the line names the flag to pass


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--train_batch_size", "8"),
            "5 training pairs do not fill one optimizer step of 8 pairs (--train_batch_size 8 x 1 process x "
            "--gradient_accumulation_steps 1): pass --train_batch_size 5 or fewer",
        ),
        (("--train_batch_size", "4", "--gradient_accumulation_steps", "2"), "of 8 pairs (--train_batch_size 4 x 1 process x "),
        (
            ("--train_batch_size", "4", "--gradient_accumulation_steps", "2"),
            "--gradient_accumulation_steps 2): pass --train_batch_size 2 or",
        ),
    ],
)
def test_too_few_pairs_for_one_step_names_the_batch_that_fits(tiny_models, tiny_pair_data, tmp_path, extra, message):
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", *extra)
    error = bad_input_message(train_patchdpo.main, argv)
    assert message in error, error


@pytest.mark.parametrize(
    "pairs, processes, accumulation, fix",
    [
        (3, 2, 1, "pass --train_batch_size 1 or fewer"),
        (3, 2, 4, "pass --train_batch_size 1 --gradient_accumulation_steps 1 or fewer"),
        (5, 1, 8, "pass --train_batch_size 1 --gradient_accumulation_steps 5 or fewer"),
        (3, 8, 1, "launch at most 3 process(es) with --train_batch_size 1 --gradient_accumulation_steps 1"),
    ],
)
def test_the_fix_for_too_few_pairs_fits_the_layout(pairs, processes, accumulation, fix):
    from patchdpo.optimization import require_one_step

    with pytest.raises(BadInputError) as error:
        require_one_step(pairs, 4, processes, accumulation)
    assert f": {fix}, or make more pairs" in str(error.value)
    require_one_step(pairs * 4 * processes * accumulation, 4, processes, accumulation)


def test_an_epoch_cap_below_stop_step_names_the_last_checkpoint_and_the_epochs_to_pass(tiny_models, tiny_pair_data, tmp_path, capsys):
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", "--num_train_epochs", "2", steps=3, batch=5)
    train_patchdpo.main(argv)
    assert "the last checkpoint is checkpoint-2, pass --num_train_epochs 3 to reach --stop_step" in capsys.readouterr().out
    assert (tmp_path / "out" / "checkpoint-2" / "model.bin").is_file()
